"""systemd's notify protocol: READY once serving, WATCHDOG as the decision loop turns.

Under `Type=notify` with `WatchdogSec=`, systemd kills the whole unit (the agent
and the QEMU in its cgroup) when the loop stops turning: a hung agent cannot fence
its own QEMU, so the watchdog does it before the lease can pass to the peer. Does
nothing outside systemd (no NOTIFY_SOCKET).

An agent that runs several pairs has one decision loop per pair, and systemd hears
one process: WATCHDOG goes out only once every loop that is running has turned since
the last one, so a single hung pair loop (whose QEMU nobody else can fence) stops
the word as surely as a hung process. A loop that ended (a pair restarting) is
forgotten until it turns again.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    # Below the calm tick's 0.25 s, so each of its turns is told (at 0.25 a turn that
    # came a hair early was skipped, and the watchdog heard every 0.5 s).
    def __init__(self, every_s: float = 0.2) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        self.every_s = every_s
        self.last = float("-inf")
        self.turns: dict[str, float] = {}  # loop -> when it last turned

    def _send(self, message: str) -> None:
        if not self.address:
            return
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(message.encode(), target)
        except OSError:
            return  # the supervisor went away; nothing to tell

    def ready(self) -> None:
        self._send("READY=1")

    def alive(self, loop: str = "") -> None:
        """`loop` turned: WATCHDOG once every running loop turned since the last one."""
        now = time.monotonic()
        self.turns[loop] = now
        if now - self.last < self.every_s:
            return
        if all(t > self.last for t in self.turns.values()):
            self.last = now
            self._send("WATCHDOG=1")

    def forget(self, loop: str) -> None:
        self.turns.pop(loop, None)

    def stopping(self) -> None:
        self._send("STOPPING=1")
