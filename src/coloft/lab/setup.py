"""`coloft lab up`: namespaces, the guest image and one disk copy per lab host.

The files land at fixed paths under LAB_DIR so that examples/lab.toml works as is.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from coloft.config.load import load_spec
from coloft.errors import FatalError
from coloft.lab import guest, net
from coloft.model.spec import PairSpec

LAB_DIR = Path(os.environ.get("COLOFT_LAB_DIR", "/var/lib/coloft/lab"))
EXAMPLE_SPEC = Path(__file__).resolve().parents[3] / "examples" / "lab.toml"
NODES = ("a", "b")


def _link(target: Path, link: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def reset_disks(image: guest.GuestImage | None = None) -> None:
    """Give every lab host a fresh copy of the empty guest disk."""
    image = image or guest.build_guest()
    for node in NODES:
        dst = LAB_DIR / f"disk-{node}.raw"
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(image.disk_template, tmp)
        tmp.replace(dst)


def lab_up(fresh_disks: bool = False) -> Path:
    """Idempotent; returns the example spec that runs on this lab."""
    try:
        net.lab_up()
        image = guest.build_guest()
    except (net.LabError, guest.GuestBuildError) as e:
        raise FatalError(str(e)) from e
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    _link(image.kernel, LAB_DIR / "vmlinuz")
    _link(image.initrd, LAB_DIR / "initrd.gz")
    _link(image.disk_template, LAB_DIR / "disk.raw")
    if fresh_disks or not all((LAB_DIR / f"disk-{n}.raw").exists() for n in NODES):
        reset_disks(image)
    return EXAMPLE_SPEC


def lab_spec(interval_ms: int = 2000) -> PairSpec:
    """examples/lab.toml with the given checkpoint interval, as a file of its own
    (agents read the spec from its file); the lab must be up to run it."""
    text = EXAMPLE_SPEC.read_text()
    changed, n = re.subn(
        r"(?m)^checkpoint_interval_ms = \d+", f"checkpoint_interval_ms = {interval_ms}", text
    )
    if n != 1:
        raise FatalError(f"{EXAMPLE_SPEC}: no single checkpoint_interval_ms line to set")
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    path = LAB_DIR / f"lab-{interval_ms}ms.toml"
    path.write_text(changed)
    return load_spec(path)
