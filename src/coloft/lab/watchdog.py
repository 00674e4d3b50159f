"""systemd's end of the notify protocol, for the lab's agents.

The lab runs agents as plain processes, not systemd units; with NOTIFY_SOCKET
pointing here they send what they would send to systemd, and this listener keeps,
per sending process (the kernel's credentials on each datagram), whether it said
READY and the longest wait between two of its WATCHDOG messages, timed by the
kernel's arrival stamps (a busy test process reading late does not lengthen them).
A wait longer than the units' WatchdogSec is a kill systemd would have made on a
real host.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coloft.effects.probe import SO_TIMESTAMPNS, STAMP_SPACE, arrival

UNIT = Path(__file__).resolve().parents[3] / "deploy" / "coloft-agent.service"
CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def watchdog_s(unit: Path = UNIT) -> float:
    """The unit's WatchdogSec (plain seconds, as the project writes it)."""
    found = re.search(r"^WatchdogSec=(\d+(?:\.\d+)?)s?$", unit.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"{unit}: no WatchdogSec=")
    return float(found.group(1))


@dataclass
class Sender:
    ready: bool = False
    pings: int = 0
    last_at: float | None = None
    longest_wait_s: float = 0.0


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.senders: dict[int, Sender] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        space = socket.CMSG_SPACE(CREDENTIALS.size) + STAMP_SPACE
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(256, space)
            except TimeoutError:
                continue
            except OSError:
                return
            at = arrival(ancillary, time.monotonic() - time.time())
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = CREDENTIALS.unpack(value[: CREDENTIALS.size])[0]
                    self._heard(self.senders.setdefault(pid, Sender()), data, at)

    @staticmethod
    def _heard(s: Sender, data: bytes, now: float) -> None:
        for line in data.decode(errors="replace").splitlines():
            if line == "READY=1":
                s.ready = True
            elif line == "WATCHDOG=1":
                if s.last_at is not None:
                    s.longest_wait_s = max(s.longest_wait_s, now - s.last_at)
                s.last_at = now
                s.pings += 1
