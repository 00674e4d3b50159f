"""Agent-to-agent heartbeats: small JSON datagrams over two independent paths.

Each agent sends its state every interval (and at once when something changed)
from each of its addresses to the peer's matching address: the replication
network and the client LAN. Which path a datagram came in on is known from the
socket it arrived at, so losing one path (the replication link cut) is told apart
from losing the peer (no path at all).

With a pair key (replication security on), each datagram carries an HMAC-SHA256
of its body, and the body names the path it was sent on: a forged datagram, one
replayed from the other path, or an old one replayed on its own path (also one of
an earlier run of the peer's agent) never counts as the peer being heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coloft.core.pace import until_beat

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4096
MAC_LEN = 64  # hex SHA-256
CLOCK_SAMPLES = 20
REPLICATION = "replication"
LAN = "lan"


@dataclass
class PathState:
    last_at: float | None = None
    count: int = 0
    # The newest (boot, seq, sender's unix time) heard on this path: older ones are
    # replays; a datagram of another boot must also be newer by the sender's clock.
    newest: tuple[str, int, float] | None = None


@dataclass
class PeerView:
    """What the peer last said, and when each path last carried it (local monotonic time)."""

    message: dict[str, Any] | None = None
    paths: dict[str, PathState] = field(default_factory=dict)
    # Our wall clock minus the peer's at sending, per recent datagram: the clock
    # offset plus a one-way delay of a millisecond or so.
    clock_gaps: deque[float] = field(default_factory=lambda: deque(maxlen=CLOCK_SAMPLES))

    def clock_offset_s(self) -> float | None:
        """How far our wall clock runs ahead of the peer's (the smallest recent gap,
        the one with the least delay in it); None before any timestamped datagram."""
        return min(self.clock_gaps, key=abs) if self.clock_gaps else None

    def age(self, path: str, now: float) -> float | None:
        p = self.paths.get(path)
        return None if p is None or p.last_at is None else now - p.last_at

    def fresh(self, path: str, now: float, timeout_s: float) -> bool:
        age = self.age(path, now)
        return age is not None and age <= timeout_s

    def any_fresh(self, now: float, timeout_s: float) -> bool:
        return any(self.fresh(p, now, timeout_s) for p in self.paths)


def seal(key: bytes | None, body: bytes) -> bytes:
    if key is None:
        return body
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode() + body


def opened(key: bytes | None, data: bytes) -> bytes | None:
    """The body of an authentic datagram, else None."""
    if key is None:
        return data
    mac, body = data[:MAC_LEN], data[MAC_LEN:]
    good = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    return body if hmac.compare_digest(mac, good) else None


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, on_message: Callable[[dict[str, Any]], None], key: bytes | None) -> None:
        self.on_message = on_message
        self.key = key
        self.rejected = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        body = opened(self.key, data[: MAX_DATAGRAM + MAC_LEN])
        if body is None:
            self.rejected += 1
            if self.rejected in (1, 10, 100) or self.rejected % 1000 == 0:
                log.warning(
                    "heartbeat: %d unauthenticated datagrams, last from %s", self.rejected, addr[0]
                )
            return
        try:
            message = json.loads(body)
        except ValueError:
            log.warning("heartbeat: unreadable datagram from %s", addr[0])
            return
        if isinstance(message, dict):
            self.on_message(message)


class Heartbeat:
    """Sends our state to the peer on every path and records what the peer sends.

    Another node of the pair heard on our port (a spare standing by) is only noted
    as alive: its messages never count as the peer's."""

    def __init__(
        self,
        pair: str,
        node: str,
        peer_node: str,
        paths: dict[str, tuple[str, str]],  # path -> (our address, peer's address)
        ports: tuple[int, int],  # (ours, the peer's)
        interval_s: float,
        state: Callable[[], dict[str, Any]],
        on_peer: Callable[[], None],
        key: bytes | None = None,
    ) -> None:
        self.key = key
        self.pair = pair
        self.node = node
        self.peer_node = peer_node
        self.paths = paths
        self.port, self.peer_port = ports
        self.interval_s = interval_s
        self.state = state
        self.on_peer = on_peer
        self.peer = PeerView(paths={p: PathState() for p in paths})
        self.others: dict[str, float] = {}  # another node -> when last heard
        self.since = time.monotonic()  # when we started listening for this peer
        self._transports: dict[str, asyncio.DatagramTransport] = {}
        self._receivers: list[_Receiver] = []
        self._seq = 0
        self._kick = asyncio.Event()

    async def retarget(
        self, peer_node: str, paths: dict[str, tuple[str, str]], peer_port: int
    ) -> None:
        """Another node is the peer from now on: nothing heard from the old one counts.
        Our sockets stay (our addresses are the same), but for a path the new peer lacks."""
        for path in list(self._transports):
            if path not in paths or paths[path][0] != self.paths[path][0]:
                self._transports.pop(path).close()
        self.peer_node, self.paths, self.peer_port = peer_node, paths, peer_port
        self.peer = PeerView(paths={p: PathState() for p in paths})
        await self.open()
        self.send_now()

    def silent_s(self, now: float, timeout_s: float) -> float | None:
        """How long the peer has not been heard on any path (None: heard within
        timeout_s); counted from when we started listening if it never was."""
        if self.peer.any_fresh(now, timeout_s):
            return None
        heard = [p.last_at for p in self.peer.paths.values() if p.last_at is not None]
        return now - max(heard, default=self.since)

    def heard_from(self, node: str, now: float, within_s: float) -> bool:
        at = self.others.get(node)
        return at is not None and now - at <= within_s

    async def open(self) -> None:
        self.since = time.monotonic()
        loop = asyncio.get_running_loop()
        for path, (here, _there) in self.paths.items():
            if path in self._transports:
                continue

            def receive(message: dict[str, Any], path: str = path) -> None:
                self._received(path, message)

            receiver = _Receiver(receive, self.key)
            transport, _ = await loop.create_datagram_endpoint(
                lambda receiver=receiver: receiver,  # type: ignore[misc]
                local_addr=(here, self.port),
            )
            self._transports[path] = transport
            self._receivers.append(receiver)

    @property
    def rejected(self) -> int:
        """Datagrams turned away as unauthenticated, on all paths."""
        return sum(r.rejected for r in self._receivers)

    def _received(self, path: str, message: dict[str, Any]) -> None:
        sender = message.get("node")
        if message.get("pair") != self.pair or sender == self.node:
            return
        if sender != self.peer_node:
            if isinstance(sender, str):
                self.others[sender] = time.monotonic()
            return
        p = self.peer.paths[path]
        if self.key is not None:
            try:
                stamp = (str(message["boot"]), int(message["seq"]), float(message["unix"]))
            except (KeyError, TypeError, ValueError):
                return
            if message.get("path") != path or not _newer(stamp, p.newest):
                return
            p.newest = stamp
        p.last_at = time.monotonic()
        p.count += 1
        sent = message.get("unix")
        if isinstance(sent, int | float):
            self.peer.clock_gaps.append(time.time() - float(sent))
        old = self.peer.message
        # Datagrams on two paths arrive out of order: keep the newest per sender boot.
        if (
            old is None
            or old.get("boot") != message.get("boot")
            or int(message.get("seq", 0)) > int(old.get("seq", 0))
        ):
            self.peer.message = message
            if old is None or _changed(old, message):
                self.on_peer()

    def send_now(self) -> None:
        self._kick.set()

    def _send(self) -> None:
        self._seq += 1
        body = {"pair": self.pair, "node": self.node, "seq": self._seq, **self.state()}
        for path, transport in self._transports.items():
            _here, there = self.paths[path]
            stamped = {**body, "path": path, "unix": time.time()}
            data = seal(self.key, json.dumps(stamped).encode())
            try:
                transport.sendto(data, (there, self.peer_port))
            except OSError as e:  # e.g. no route while a link is down: that is the signal
                log.debug("heartbeat on %s: %s", path, e)

    async def run(self) -> None:
        while True:
            self._send()
            wait = until_beat(self.interval_s, time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._kick.wait()
            self._kick.clear()

    def close(self) -> None:
        for t in self._transports.values():
            t.close()
        self._transports.clear()


def _newer(stamp: tuple[str, int, float], newest: tuple[str, int, float] | None) -> bool:
    if newest is None:
        return True
    if stamp[0] == newest[0]:
        return stamp[1] > newest[1]
    return stamp[2] > newest[2]


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("state", "qemu_alive", "ready", "in_colo", "epoch", "boot")
    return any(old.get(k) != new.get(k) for k in keys)
