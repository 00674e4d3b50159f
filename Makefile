# coloft: `make demo` and `make test` do all set-up first; `make setup` alone leaves
# `coloft` on PATH. `make check` is the fast inner loop (lint, types, unit tests).
SHELL := /bin/bash
PY ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup apt venv qemu guest check lint types unit test contract integration demo bench bench-failover bench-detection bench-reprotect bench-workload bench-fleet clean

setup: apt venv qemu guest
	@ln -sf "$(CURDIR)/$(BIN)/coloft" /usr/local/bin/coloft
	@echo "setup done: $$(command -v coloft)"

apt:
	@bash scripts/setup-apt.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: apt $(STAMP)

qemu: apt
	@bash lab/qemu/build.sh >/dev/null

guest: venv
	@$(BIN)/python -m coloft.lab.guest >/dev/null
	@$(BIN)/python -m coloft.lab.guest --spec examples/guests/redis.toml >/dev/null

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

check: lint types unit

contract: setup
	$(BIN)/pytest -q tests/contract $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest -v --durations=20 tests/integration $(PYTEST_ARGS)

test: setup check contract integration

demo: setup
	coloft demo --duration 60

bench: setup
	$(BIN)/python bench/steady_state.py

bench-failover: setup
	$(BIN)/python bench/failover.py --rounds 30 --isolation-rounds 5

bench-detection: setup
	$(BIN)/python bench/detection.py --rounds 10 --soak-s 3600

bench-reprotect: setup
	$(BIN)/python bench/reprotect.py --rounds 10 --memory 128 256

bench-workload: setup
	$(BIN)/python bench/workload.py --duration 60

bench-fleet: setup
	$(BIN)/python bench/fleet.py --pairs 1 3 5

clean:
	-coloft lab down
	rm -rf $(VENV) src/*.egg-info
