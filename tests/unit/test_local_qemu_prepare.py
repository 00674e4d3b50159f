"""A QEMU whose set-up fails leaves nothing behind (qemu-img faked, `ip` real)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from coloft.effects import local_qemu
from coloft.effects.local_qemu import LocalQemu
from coloft.effects.qemu_binary import QemuChoice
from coloft.errors import FatalError
from coloft.lab.setup import lab_spec
from coloft.model.spec import Accel
from coloft.model.steps import Role


def test_a_secondary_whose_tap_cannot_be_made_leaves_no_overlays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    spec = lab_spec()
    b = replace(
        spec.node("b"), netns=None, bridge="coloftnobr0", disk=disk, run_dir=tmp_path / "run"
    )
    spec = replace(spec, nodes=tuple(b if n.name == "b" else n for n in spec.nodes))
    monkeypatch.setattr(local_qemu, "_qemu_img_create", lambda path, size: path.write_bytes(b"x"))
    choice = QemuChoice(Path("/nonexistent/qemu"), Accel.TCG, "never launched")
    qemu = LocalQemu(spec, b, Role.SECONDARY, choice)

    with pytest.raises(FatalError, match="bridge 'coloftnobr0' does not exist"):
        asyncio.run(qemu.prepare())

    assert (tmp_path / "run").is_dir()
    assert not qemu.paths.active.exists() and not qemu.paths.hidden.exists()
    assert not qemu.prepared
