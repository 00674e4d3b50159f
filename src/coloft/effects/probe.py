"""The active probe: ICMP echo from the primary host's LAN side to the guest.

The guest's kernel answers by itself (nothing runs inside the guest for us). In
COLO the primary guest's reply is held by colo-compare until the secondary's
identical reply arrives, so an answer on time proves the whole comparison path
works: mirror channel in, both guests, compare-in channel back. Measured in the
lab (README): healthy replies take a few ms, 20 ms at most outside checkpoints;
with the mirror channel dropped they come only when a checkpoint flushes
colo-compare. A reply a checkpoint flushed is still an answer (COLO released it
with the state behind it on its way to the secondary) but not a match: the probe
counts both, and how long it went without a match. Under heavy load, miscompares
force checkpoints so often that a healthy pair can go over 2 s without one
(measured in the 10-minute soak), so a lack of matches alone does not degrade;
a dead channel whose flushes keep the probe answered shows on its socket instead.

A checkpoint stops the guest, and colo-compare releases what it holds only once
both guests run again: a reply's wait includes the pause of each checkpoint it
crossed. Under a checkpoint storm that pause alone took a healthy pair's reply past
the budget (the 10-minute soak, README). Time stopped for a checkpoint is the stall
verdict's to judge (core.health), so the probe's clock leaves it out, up to
PAUSE_ALLOWANCE_S: enough for a storm's pauses, short enough that a broken path
still shows well within the second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from coloft.core.pace import until_beat

log = logging.getLogger(__name__)

ECHO_REQUEST, ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"coloft-probe"
    head = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, _checksum(head + payload), ident, seq) + payload


# A reply is judged this long after it came, so the STOP event of a checkpoint that
# flushed it (sent by QEMU's monitor, a little behind the packet) is in by then.
SETTLE_S = 0.02
# Python does not name it; 35 on Linux's generic ABI (x86, arm, riscv...).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
STAMP_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
# The most checkpoint pause a probe's wait is spared (see the module's docstring).
PAUSE_ALLOWANCE_S = 0.25


_idents = itertools.count(os.getpid())


class _SharedSocket:
    """One raw ICMP socket per source address for all probes of this process.

    A raw socket is handed every ICMP packet the host receives: with a socket per
    probe, each of N probes would read the replies of all N. Here each reply is read
    once and given to the probe its echo identifier names, if it came from that
    probe's target.
    """

    sockets: ClassVar[dict[str | None, _SharedSocket]] = {}

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        if source:
            self.sock.bind((source, 0))
        # The kernel stamps each reply as it arrives, so the socket is read on the
        # probes' beat instead of on every reply: a wakeup per reply and pair was most
        # of what a pair added to its agent's CPU.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # Replies wait up to a beat: room for many pairs' (the kernel caps it at rmem_max).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.probes: dict[int, IcmpProbe] = {}

    @classmethod
    def join(cls, probe: IcmpProbe) -> _SharedSocket:
        shared = cls.sockets.get(probe.source)
        if shared is None:
            shared = cls.sockets[probe.source] = cls(probe.source)
        for _ in range(1 << 16):
            ident = next(_idents) & 0xFFFF
            if ident not in shared.probes:
                break
        else:
            raise RuntimeError("every ICMP echo identifier is in use")
        probe.ident = ident
        shared.probes[ident] = probe
        return shared

    def leave(self, probe: IcmpProbe) -> None:
        if self.probes.get(probe.ident) is probe:
            del self.probes[probe.ident]
        if not self.probes:
            self.sock.close()
            if self.sockets.get(self.source) is self:
                del self.sockets[self.source]

    def drain(self) -> None:
        """Hand every reply waiting in the socket to its probe, stamped with when it
        arrived (the kernel's wall-clock stamp, moved onto the monotonic clock)."""
        drained_at = time.monotonic()
        to_monotonic = drained_at - time.time()
        while True:
            try:
                data, ancillary, _flags, (sender, _port) = self.sock.recvmsg(2048, STAMP_SPACE)
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("probe recv: %s", e)
                return
            header = (data[0] & 0x0F) * 4
            if len(data) < header + 8:
                continue
            kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", data[header : header + 8])
            probe = self.probes.get(ident)
            if kind == ECHO_REPLY and probe is not None and sender == probe.target:
                # Never after now, whatever the wall clock did since the reply came.
                probe.replied(seq, min(arrival(ancillary, to_monotonic), drained_at))


def arrival(ancillary: list[tuple[int, int, bytes]], to_monotonic: float) -> float:
    """A datagram's kernel arrival stamp (SO_TIMESTAMPNS), moved onto the monotonic clock."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("@qq", data[:16])
            return float(sec + nsec / 1e9 + to_monotonic)
    return time.monotonic()  # no stamp: now is an upper bound


class IcmpProbe:
    """Sends an echo every `every_s`. A probe is *answered* when its reply came within
    `budget_s`, *proven* when, besides, no checkpoint began in between. `late_s` is
    how long the oldest probe sent after the last answered one has waited;
    `unproven_s` the same for proof. `paused(since, until)` tells how long
    checkpoints stopped the guest in between: that time (up to PAUSE_ALLOWANCE_S)
    does not count against the budget."""

    def __init__(
        self,
        target: str,
        source: str | None,
        every_s: float = 0.1,
        budget_s: float = 0.35,
        paused: Callable[[float, float], float] | None = None,
    ) -> None:
        self.target = target
        self.source = source
        self.every_s = every_s
        self.budget_s = budget_s
        self.paused = paused
        self.ident = 0  # given by the shared socket when the probe runs
        self.shared: _SharedSocket | None = None
        self.seq = 0
        self.outstanding: dict[int, float] = {}
        # Replies not judged for proof yet: (sent, replied), in arrival order.
        self.answers: deque[tuple[float, float]] = deque(maxlen=1000)
        # Send times of the probes after the last answered / proven one, oldest first.
        self.unanswered: deque[float] = deque(maxlen=1000)
        self.unproven: deque[float] = deque(maxlen=1000)
        self.on_time_streak = 0
        self.flushed = 0  # replies a checkpoint may have released: no proof
        self.rtts_ms: deque[float] = deque(maxlen=600)
        self.matched = 0  # all matched replies so far (rtts_ms keeps the last ones)
        self.sent = 0

    def waited_s(self, sent: float, until: float) -> float:
        """The wait of a probe sent at `sent`, as of `until`, checkpoint pauses spared."""
        spared = 0.0 if self.paused is None else self.paused(sent, until)
        return until - sent - min(spared, PAUSE_ALLOWANCE_S)

    def expire(self, now: float) -> None:
        """A probe unanswered past the budget breaks the on-time streak, once: its reply,
        should it still come, is late and proves nothing. (Kept waiting instead, one lost
        reply held the streak at 0, and the pair DEGRADED, for as long as it was kept.)"""
        for seq, sent in list(self.outstanding.items()):
            if self.waited_s(sent, now) > self.budget_s:
                del self.outstanding[seq]
                self.on_time_streak = 0

    def collect(self) -> None:
        """Take in the replies that arrived since the socket was last read: before
        judging, so a reply that came is never counted as missing."""
        if self.shared is not None:
            self.shared.drain()

    def replied(self, seq: int, now: float) -> None:
        sent_at = self.outstanding.pop(seq, None)
        if sent_at is not None:
            self.answered(sent_at, max(sent_at, now))

    def answered(self, sent: float, replied: float) -> None:
        """A reply came: it counts at once as an answer, later (settle) as proof."""
        self.answers.append((sent, replied))
        if self.waited_s(sent, replied) > self.budget_s:
            self.on_time_streak = 0
            return
        self.on_time_streak += 1
        while self.unanswered and self.unanswered[0] <= sent:
            self.unanswered.popleft()

    def settle(self, now: float, checkpoint_starts: tuple[float, ...]) -> None:
        """Judge the replies old enough to know whether a checkpoint crossed them."""
        while self.answers and self.answers[0][1] + SETTLE_S <= now:
            sent, replied = self.answers.popleft()
            if self.waited_s(sent, replied) > self.budget_s:
                continue
            if any(sent <= t <= replied + SETTLE_S for t in checkpoint_starts):
                self.flushed += 1
                continue
            self.rtts_ms.append((replied - sent) * 1000.0)
            self.matched += 1
            while self.unproven and self.unproven[0] <= sent:
                self.unproven.popleft()

    def late_s(self, now: float) -> float:
        """How long the oldest probe since the last answered one has waited."""
        return self.waited_s(self.unanswered[0], now) if self.unanswered else 0.0

    def unproven_s(self, now: float) -> float:
        """How long the oldest probe since the last proven one has waited for proof."""
        return now - self.unproven[0] if self.unproven else 0.0

    def overdue(self, now: float) -> bool:
        return self.late_s(now) > self.budget_s

    async def run(self) -> None:
        shared = self.shared = _SharedSocket.join(self)
        try:
            while True:
                shared.drain()
                now = time.monotonic()
                self.expire(now)
                self.seq = (self.seq + 1) & 0xFFFF
                try:
                    shared.sock.sendto(echo_request(self.ident, self.seq), (self.target, 0))
                    self.outstanding[self.seq] = now
                    self.unanswered.append(now)
                    self.unproven.append(now)
                    self.sent += 1
                except OSError as e:
                    log.debug("probe send: %s", e)
                await asyncio.sleep(until_beat(self.every_s, time.monotonic()))
        finally:
            self.shared = None
            shared.leave(self)
