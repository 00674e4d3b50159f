"""This host's TCP sockets, as the kernel lists them in /proc/net/tcp.

Read in the event loop: a procfs read never waits on a device, and handing it to a
thread cost more than the read itself. Every pair of an agent watches its channels
at the same pace, so one reading serves all callers for MAX_AGE_S.
"""

from __future__ import annotations

import time
from pathlib import Path

from coloft.core.channels import TcpSocket, parse_proc_net_tcp

MAX_AGE_S = 0.05
_reading: dict[Path, tuple[float, list[TcpSocket]]] = {}


def tcp_sockets(table: Path = Path("/proc/net/tcp")) -> list[TcpSocket]:
    """The IPv4 TCP sockets; OSError when the table cannot be read."""
    now = time.monotonic()
    at, found = _reading.get(table, (None, []))
    if at is None or now - at >= MAX_AGE_S:
        found = parse_proc_net_tcp(table.read_text())
        _reading[table] = (now, found)
    return found
