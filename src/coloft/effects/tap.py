"""The VM's tap device on a host's client-side bridge."""

from __future__ import annotations

import subprocess

from coloft.errors import FatalError


def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise FatalError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def ensure_tap(netns: str | None, tap: str, bridge: str) -> None:
    """Create the tap (if missing) on the bridge, up; QEMU then attaches with script=no."""
    if _ip(netns, "link", "show", "dev", bridge, check=False).returncode != 0:
        where = f"namespace {netns}" if netns else "this host"
        raise FatalError(f"bridge {bridge!r} does not exist in {where}")
    if _ip(netns, "link", "show", "dev", tap, check=False).returncode != 0:
        _ip(netns, "tuntap", "add", "dev", tap, "mode", "tap")
    _ip(netns, "link", "set", "dev", tap, "master", bridge)
    _ip(netns, "link", "set", "dev", tap, "up")


def remove_tap(netns: str | None, tap: str) -> None:
    _ip(netns, "link", "del", "dev", tap, check=False)
