"""Shared fixtures for tests against real QEMU in the lab (root, namespaces, TCG)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from coloft.agent.pair import Pair, publish, remove_run_dirs
from coloft.effects import qemu_binary
from coloft.effects.process import pid_alive
from coloft.lab import net, setup
from coloft.model.spec import PairSpec

T = TypeVar("T")
EXAMPLE = setup.EXAMPLE_SPEC


def lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("coloft-")]


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    """The lab's namespaces and fresh guest disks for one test module; removed after it."""
    assert os.geteuid() == 0, "integration tests need root (namespaces, taps)"
    with net.lab_lock():
        setup.lab_up(fresh_disks=True)
        try:
            yield
        finally:
            net.lab_down()
            assert lab_namespaces() == [], "lab namespaces left behind"


@pytest.fixture
def make_pair(lab: None) -> Iterator[Callable[[PairSpec], Pair]]:
    """Pairs built by a test are torn down (QEMUs killed by pid) after it, pass or fail."""
    pairs: list[Pair] = []

    def make(spec: PairSpec) -> Pair:
        setup.reset_disks()
        pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pids = [p.pid for p in pair.procs.values()]
        pair.cleanup()
        publish(pair.spec, None)
        remove_run_dirs(pair.spec)
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"QEMU pids still alive after teardown: {alive}"


def run_scenario(pair: Pair, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run a test's async scenario; the pair's QMP sessions close in the same event loop."""

    async def main() -> T:
        try:
            return await scenario()
        finally:
            await pair.down()

    return asyncio.run(main())
