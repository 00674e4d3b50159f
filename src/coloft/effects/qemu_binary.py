"""Which QEMU binary and accelerator to use, and why."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from coloft.errors import ConfigError
from coloft.model.spec import Accel

LAB_QEMU_GLOB = "qemu/*/qemu-system-x86_64"


def cache_dir() -> Path:
    return Path(os.environ.get("COLOFT_CACHE", "/var/cache/coloft"))


@dataclass(frozen=True)
class QemuChoice:
    binary: Path
    accel: Accel
    why: str


def lab_qemu() -> Path | None:
    """The newest patched build made by lab/qemu/build.sh, if any."""
    found = sorted(cache_dir().glob(LAB_QEMU_GLOB), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def kvm_usable() -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if Path("/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is kvm_pvm, which hangs a stock guest kernel"
    if not (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()):
        return False, "no kvm_intel or kvm_amd module is loaded"
    return True, "/dev/kvm is backed by kvm_intel/kvm_amd"


def choose(accel: Accel, configured: Path | None) -> QemuChoice:
    if accel is Accel.AUTO:
        ok, reason = kvm_usable()
        accel = Accel.KVM if ok else Accel.TCG
        accel_why = f"accel auto -> {accel.value} ({reason})"
    else:
        accel_why = f"accel {accel.value} (from the spec)"
    if configured is not None:
        return QemuChoice(configured, accel, f"{accel_why}; binary from the spec")
    lab = lab_qemu()
    if accel is Accel.TCG:
        if lab is None:
            raise ConfigError(
                "no patched QEMU found under "
                f"{cache_dir() / 'qemu'}: stock QEMU deadlocks in COLO checkpoints under TCG; "
                "build it with `make setup` (or lab/qemu/build.sh)"
            )
        return QemuChoice(lab, accel, f"{accel_why}; TCG needs the patched lab build")
    system = shutil.which("qemu-system-x86_64")
    if system is not None:
        return QemuChoice(Path(system), accel, f"{accel_why}; system QEMU on PATH")
    if lab is not None:
        return QemuChoice(lab, accel, f"{accel_why}; no system QEMU, using the lab build")
    raise ConfigError("no qemu-system-x86_64 on PATH and no lab build; run `make setup`")
