"""The host side of the replication link: which interface carries it, and that
interface's own counters (bytes, packets, drops, errors in each direction).

A passive signal beside the channels' sockets: a link whose receive counters stand
still, or whose drop counters climb, shows here before any socket times out.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

# Many pairs of one agent share the host's link: one reading serves them all.
MAX_AGE_S = 1.0
_readings: dict[tuple[Path, str], tuple[float, dict[str, int]]] = {}

COUNTERS = (
    "rx_bytes",
    "tx_bytes",
    "rx_packets",
    "tx_packets",
    "rx_dropped",
    "tx_dropped",
    "rx_errors",
    "tx_errors",
)


def iface_of(address: str) -> str | None:
    """The interface that holds `address` in this network namespace."""
    done = subprocess.run(
        ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=False, timeout=5
    )
    if done.returncode != 0:
        return None
    try:
        links = json.loads(done.stdout)
    except ValueError:
        return None
    for link in links:
        for a in link.get("addr_info", []):
            if a.get("local") == address:
                return str(link.get("ifname"))
    return None


def counters(iface: str, root: Path = Path("/sys/class/net")) -> dict[str, int]:
    """The interface's counters, read at most once per MAX_AGE_S in this process."""
    now = time.monotonic()
    at, found = _readings.get((root, iface), (None, {}))
    if at is None or now - at >= MAX_AGE_S:
        found = _read(iface, root)
        _readings[(root, iface)] = (now, found)
    return found


def _read(iface: str, root: Path) -> dict[str, int]:
    found = {}
    for name in COUNTERS:
        try:
            found[name] = int((root / iface / "statistics" / name).read_text())
        except (OSError, ValueError):
            continue
    return found
