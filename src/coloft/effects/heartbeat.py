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

All pairs of an agent share one Hub: one socket per local address and port, and one
sender on the beat. Pairs that share a heartbeat port (`[heartbeat] port`) share its
sockets, and their messages for the same peer address go out in one datagram (one
message per line, each sealed with its own pair's key): a host with N pairs on
another host sends and receives one datagram per path per beat, not N.

The Hub's sender also watches for silence: when a path that carried the peer goes
quiet for a pair's limit, that pair is told at once. Each datagram moves that
moment, so a pair timing it itself wakes about once a beat for nothing; the
sender wakes on its beat anyway and only needs an extra wake when a silence
falls between two beats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coloft.core.pace import until_beat
from coloft.errors import ConfigError

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4096  # one pair's message
# A bundle stays below this: a few IP fragments at most on a 1500-byte MTU.
MAX_BUNDLE = 8192
MAC_LEN = 64  # hex SHA-256
# A beat's sender wakes on the clock; timers may fire this much before it.
BEAT_SLACK_S = 0.001
# A path counts as silent once older than its limit: looked at just past that moment.
SILENCE_SLACK_S = 0.002
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
    # Set once the path went silent and the pair was told; cleared by the next datagram.
    told_silent: bool = False


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


class _Endpoint(asyncio.DatagramProtocol):
    """One local (address, port) socket and the pairs' heartbeats listening on it."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.members: dict[str, Heartbeat] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.unreadable = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        for item in data.split(b"\n"):
            # A sealed message starts with its MAC (hex), a plain one with its JSON.
            mac, body = (None, item) if item[:1] == b"{" else (item[:MAC_LEN], item[MAC_LEN:])
            if not self._deliver(mac, body, addr[0]):
                self.unreadable += 1
                if _worth_a_line(self.unreadable):
                    log.warning(
                        "heartbeat: %d unreadable messages, last from %s", self.unreadable, addr[0]
                    )

    def _deliver(self, mac: bytes | None, body: bytes, sender: str) -> bool:
        """False when the body is no heartbeat message."""
        message = _parsed(body)
        if message is None:
            return False
        member = self.members.get(str(message.get("pair")))
        if member is None:  # another pair's: not ours to judge
            return True
        try:
            member.accept(self.address, mac, body, message, sender)
        except (TypeError, ValueError):  # a field of the wrong kind
            return False
        return True

    def send(self, there: tuple[str, int], items: list[bytes]) -> None:
        chunk: list[bytes] = []
        size = 0
        for item in items:
            if chunk and size + len(item) > MAX_BUNDLE:
                self._sendto(there, chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item) + 1
        if chunk:
            self._sendto(there, chunk)

    def _sendto(self, there: tuple[str, int], chunk: list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.sendto(b"\n".join(chunk), there)
        except OSError as e:  # e.g. no route while a link is down: that is the signal
            log.debug("heartbeat from %s: %s", self.address, e)


class Hub:
    """An agent's heartbeat sockets and its one sender, shared by all its pairs."""

    def __init__(self) -> None:
        self._endpoints: dict[tuple[str, int], _Endpoint] = {}
        self._beating: list[Heartbeat] = []
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attaching = asyncio.Lock()

    async def attach(self, hb: Heartbeat, address: str, port: int) -> _Endpoint:
        # Pairs starting together must not both open the socket they are to share.
        async with self._attaching:
            ep = self._endpoints.get((address, port))
            if ep is None:
                ep = await self._open(address, port)
            # A pair's restarted loop takes its place from the old one.
            ep.members[hb.pair] = hb
            return ep

    async def _open(self, address: str, port: int) -> _Endpoint:
        ep = _Endpoint(address, port)
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: ep, local_addr=(address, port)
            )
        except OSError as e:
            raise ConfigError(
                f"heartbeat port {port} on {address}: {e.strerror or e}; pairs share a "
                "[heartbeat] port within one agent only (one agent per pair: leave it 0)"
            ) from e
        ep.transport = transport
        self._endpoints[(address, port)] = ep
        return ep

    def detach(self, hb: Heartbeat, ep: _Endpoint) -> None:
        if ep.members.get(hb.pair) is hb:
            del ep.members[hb.pair]
        if not ep.members and ep.transport is not None:
            ep.transport.close()
            del self._endpoints[(ep.address, ep.port)]

    def start(self, hb: Heartbeat) -> None:
        self._beating.append(hb)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
            self._task.add_done_callback(self._ended)
        self.kick()

    def stop(self, hb: Heartbeat) -> None:
        if hb in self._beating:
            self._beating.remove(hb)
        if not self._beating and self._task is not None:
            self._task.cancel()
            self._task = None

    def kick(self) -> None:
        self._kick.set()

    def _ended(self, task: asyncio.Task[None]) -> None:
        # The sender failing silently would leave every pair unheard: their loops fail.
        if not task.cancelled() and (error := task.exception()) is not None:
            for hb in list(self._beating):
                hb.fail(error)
            self._beating.clear()

    async def _run(self) -> None:
        while self._beating:
            now = time.monotonic()
            bundles: dict[tuple[_Endpoint, tuple[str, int]], list[bytes]] = {}
            for hb in list(self._beating):
                if not (hb.kicked or now >= hb.next_at - BEAT_SLACK_S):
                    continue
                hb.kicked = False
                hb.next_at = now + until_beat(hb.interval_s, now)
                try:
                    outgoing = hb.outgoing()
                except Exception as e:  # that pair's loop fails, not every pair's heartbeats
                    hb.fail(e)
                    self.stop(hb)
                    continue
                for ep, there, item in outgoing:
                    bundles.setdefault((ep, there), []).append(item)
            for (ep, there), items in bundles.items():
                ep.send(there, items)
            if not self._beating:
                return
            now = time.monotonic()
            wake_at = min(hb.next_at for hb in self._beating)
            for hb in self._beating:
                wake_at = min(wake_at, hb.watch_silence(now))
            wait = wake_at - now
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._kick.wait()
            self._kick.clear()


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
        hub: Hub | None = None,
        silent_after_s: float | None = None,
        on_silent: Callable[[], None] | None = None,
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
        self.silent_after_s = silent_after_s
        self.on_silent = on_silent
        self.hub = hub or Hub()
        self.peer = PeerView(paths={p: PathState() for p in paths})
        self.others: dict[str, float] = {}  # another node -> when last heard
        self.since = time.monotonic()  # when we started listening for this peer
        self._endpoints: dict[str, _Endpoint] = {}  # path -> our socket for it
        self.rejected = 0  # messages turned away as unauthenticated
        self._seq = 0
        self.kicked = False
        self.next_at = 0.0
        self._failed: asyncio.Future[None] | None = None

    async def retarget(
        self, peer_node: str, paths: dict[str, tuple[str, str]], peer_port: int
    ) -> None:
        """Another node is the peer from now on: nothing heard from the old one counts.
        Our sockets stay (our addresses are the same), but for a path the new peer lacks."""
        for path in list(self._endpoints):
            if path not in paths or paths[path][0] != self.paths[path][0]:
                self.hub.detach(self, self._endpoints.pop(path))
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
        for path, (here, _there) in self.paths.items():
            if path not in self._endpoints:
                self._endpoints[path] = await self.hub.attach(self, here, self.port)

    def accept(
        self, address: str, mac: bytes | None, body: bytes, message: dict[str, Any], sender: str
    ) -> None:
        """A message for our pair that arrived at our `address`."""
        if self.key is not None:
            good = hmac.new(self.key, body, hashlib.sha256).hexdigest().encode()
            if mac is None or not hmac.compare_digest(mac, good):
                self.rejected += 1
                if _worth_a_line(self.rejected):
                    log.warning(
                        "heartbeat: %d unauthenticated datagrams, last from %s",
                        self.rejected,
                        sender,
                    )
                return
        for path, ep in self._endpoints.items():
            if ep.address == address:
                self._received(path, message)
                return

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
        p.told_silent = False
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

    def watch_silence(self, now: float) -> float:
        """Tell the pair of each path gone silent since the last look; returns when
        the next one would (inf: none is being watched)."""
        limit = self.silent_after_s
        if limit is None or self.on_silent is None:
            return math.inf
        next_at, gone = math.inf, False
        for p in self.peer.paths.values():
            if p.last_at is None or p.told_silent:
                continue
            at = p.last_at + limit + SILENCE_SLACK_S
            if now >= at:
                p.told_silent = gone = True
            else:
                next_at = min(next_at, at)
        if gone:
            self.on_silent()
        return next_at

    def send_now(self) -> None:
        self.kicked = True
        self.hub.kick()

    def outgoing(self) -> list[tuple[_Endpoint, tuple[str, int], bytes]]:
        """This beat's sealed message for each path, and where it goes."""
        self._seq += 1
        body = {"pair": self.pair, "node": self.node, "seq": self._seq, **self.state()}
        # Encoded once for all paths: each path's copy only appends its name and the
        # time (a state field of either name is overridden: the reader keeps the last).
        head = json.dumps(body)[:-1]
        out = []
        for path, ep in self._endpoints.items():
            stamped = f'{head}, "path": {json.dumps(path)}, "unix": {time.time()!r}}}'
            item = seal(self.key, stamped.encode())
            out.append((ep, (self.paths[path][1], self.peer_port), item))
        return out

    def fail(self, error: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(error)

    async def run(self) -> None:
        """Beat until cancelled; raises what building our message raised."""
        self._failed = asyncio.get_running_loop().create_future()
        self.hub.start(self)
        try:
            await self._failed
        finally:
            self.hub.stop(self)
            self._failed = None

    def close(self) -> None:
        for ep in self._endpoints.values():
            self.hub.detach(self, ep)
        self._endpoints.clear()


def _worth_a_line(count: int) -> bool:
    """Log the 1st, 10th, 100th and every 1000th of a kind of bad datagram, not each."""
    return count in (1, 10, 100) or count % 1000 == 0


def _parsed(body: bytes) -> dict[str, Any] | None:
    if len(body) > MAX_DATAGRAM:
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _newer(stamp: tuple[str, int, float], newest: tuple[str, int, float] | None) -> bool:
    if newest is None:
        return True
    if stamp[0] == newest[0]:
        return stamp[1] > newest[1]
    return stamp[2] > newest[2]


# What the pair must judge at once when the peer reports it (a calm pair's tick waits
# for it): the ages and counters that move with every message are not among them.
NEWS = (
    "state",
    "qemu_alive",
    "qemu_hung",
    "ready",
    "in_colo",
    "colo_mode",
    "epoch",
    "boot",
    "channels",
    "reprotecting",
    "guest_stopped",
    "failed_starts",
)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if (old.get("stopped_for_s") is None) != (new.get("stopped_for_s") is None):
        return True  # a checkpoint began or ended there
    if _verdict(old) != _verdict(new):
        return True  # not its reason alone: that names the latest probe's time
    return any(old.get(k) != new.get(k) for k in NEWS)


def _verdict(message: dict[str, Any]) -> tuple[Any, ...]:
    p = message.get("protection")
    return (p.get("phase"), p.get("protected"), p.get("code")) if isinstance(p, dict) else (p,)
