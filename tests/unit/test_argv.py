"""The QEMU command lines, against golden files (regenerate: COLOFT_UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coloft.config.load import load_spec
from coloft.core.argv import qemu_argv, tap_name
from coloft.model.spec import Accel
from coloft.model.steps import Role

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"
GOLDEN = Path(__file__).parent / "golden"
BINARY = Path("/opt/qemu/bin/qemu-system-x86_64")


@pytest.mark.parametrize("role", [Role.PRIMARY, Role.SECONDARY])
def test_argv_matches_golden(role: Role) -> None:
    spec = load_spec(EXAMPLE)
    node = spec.primary if role is Role.PRIMARY else spec.secondary
    text = "\n".join(qemu_argv(spec, node, role, BINARY, Accel.TCG)) + "\n"
    golden = GOLDEN / f"argv_{role.value}.txt"
    if os.environ.get("COLOFT_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"argv for {role.value} changed; review and regenerate"


def test_primary_starts_paused_with_a_quorum_and_secondary_waits_for_migration() -> None:
    spec = load_spec(EXAMPLE)
    primary = qemu_argv(spec, spec.primary, Role.PRIMARY, BINARY, Accel.TCG)
    secondary = qemu_argv(spec, spec.secondary, Role.SECONDARY, BINARY, Accel.KVM)
    assert "-S" in primary and "-incoming" not in primary
    assert secondary[secondary.index("-incoming") + 1] == "defer"
    assert any("driver=quorum" in a and "disk-a.raw" in a for a in primary)
    assert any("driver=replication,mode=secondary" in a for a in secondary)
    assert secondary[secondary.index("-accel") + 1] == "kvm"
    # Filters need the tap without vhost.
    assert any(a.startswith("tap,") and "vhost=off" in a for a in primary)


def test_auto_accel_must_be_resolved_first() -> None:
    spec = load_spec(EXAMPLE)
    with pytest.raises(ValueError, match="resolve the accelerator"):
        qemu_argv(spec, spec.primary, Role.PRIMARY, BINARY, Accel.AUTO)


def test_tap_name_fits_an_interface_name() -> None:
    spec = load_spec(EXAMPLE)
    assert len(tap_name(spec)) <= 15
