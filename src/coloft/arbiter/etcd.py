"""The etcd v3 arbiter, over gRPC with the `aetcd` client.

Every public call is one bounded unit: all of its RPCs share one deadline
(asyncio.timeout, and the same value as the gRPC deadline so etcd can drop the
work too). Between calls an arbiter keeps its connection, one lease keep-alive
stream on it (opening a stream per renewal cost twice the renewal itself), and
the leader key each pair's last read found. A renewal that such a read, sent
within SEEN_FRESH_S, found naming this node and epoch only sends the keep-alive
(a steady leader reads its record every half second anyway); any other renewal
reads the key first, so an agent that restarts renews the leadership it held by
epoch alone. That is safe because nothing but its holder's resign or the lease's
expiry deletes a leader key: a keep-alive answered with a TTL proves the lease,
and so the key, still there (a key deleted by hand shows in the next read).

The pairs of one agent share a connection for their steady calls (SharedLink):
their ticks fall on the same beat, and the reads asked on one turn of the event
loop go out as one transaction (three pairs' reads: 0.41 ms of CPU together,
1.18 ms one by one), and the renewals due on one turn send their keep-alives on one
stream, all written before the first answer is read.

After a failed call the channel is thrown away and the next call dials the next
endpoint: a fresh channel connects at once, instead of waiting out gRPC's
reconnect backoff, which after a few failures exceeds any sane lease TTL.

Lease timing, as measured against etcd 3.4.23 (what the agent must allow for):
- TTLs are whole seconds with a 2 s minimum (a 1 s request is granted 2 s), and
  expiry is checked every 500 ms, so a key lingers up to ~0.5 s past its TTL.
- A restart of etcd (or a change of etcd leader) re-arms every lease for a
  full TTL: a dead leader's key can outlive its TTL by the outage plus a TTL.
  That delays a takeover but never allows two leaders, as long as a leader
  trusts only its own monotonic clock since its last successful renew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

# gRPC's fork handlers, read when gRPC loads: the agent forks only to exec QEMU at
# once, and a fork that met a call in flight aborted that QEMU before its exec
# (measured: three pairs launching on one beat, exit -6).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd  # type: ignore[import-untyped]
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.utils import prefix_range_end  # type: ignore[import-untyped]

from coloft.arbiter.base import (
    DEFAULT_DEADLINE_S,
    ArbiterUnavailable,
    Leader,
    PairRecord,
    leader_key,
    members_key,
    pair_prefix,
    parse_endpoint,
    protection_key,
    source_key,
    sync_key,
)
from coloft.errors import ConfigError, ProtocolError
from coloft.model.leader import members_of, members_text

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

# The answers that mean "could not reach a working etcd", as opposed to etcd
# rejecting what we asked (a bug on our side, not worth retrying).
_UNREACHABLE = (
    TimeoutError,
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
)


# How long a read's view of a leader key stands in for the check before a renewal.
SEEN_FRESH_S = 1.0


class EtcdArbiter:
    """Arbiter backed by an etcd v3 cluster (3.4 or newer)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        deadline_s: float = DEFAULT_DEADLINE_S,
        link: SharedLink | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigError("etcd arbiter: no endpoints given")
        if deadline_s <= 0:
            raise ConfigError(f"etcd arbiter: deadline must be positive, got {deadline_s}")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        self._deadline_s = deadline_s
        self._index = 0
        self._client: Any = None
        self._stream: Any = None  # the keep-alive stream on _client's channel
        # pair -> (node, epoch, lease) of its leader key, and when that read was sent
        self._seen: dict[str, tuple[tuple[str, int, int], float]] = {}
        self._link = link

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._index]
        return f"{host}:{port}"

    def _connect(self) -> Any:
        if self._client is None:
            host, port = self._endpoints[self._index]
            self._client = aetcd.Client(host=host, port=port, timeout=self._deadline_s)
        return self._client

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    async def _drop(self) -> None:
        self._drop_stream()
        client, self._client = self._client, None
        self._index = (self._index + 1) % len(self._endpoints)
        if client is not None:
            # Closing a gRPC channel is local, but bound it anyway: this runs on
            # the failure path, where nothing may block.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._deadline_s):
                    await client.close()

    async def _call(self, what: str, body: Callable[[Any], Awaitable[T]]) -> T:
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(self._deadline_s):
                return await body(self._connect())
        except _UNREACHABLE as exc:
            await self._drop()
            detail = str(exc) or type(exc).__name__
            raise ArbiterUnavailable(
                f"etcd {endpoint}: {what}: no answer within {self._deadline_s:g}s ({detail})"
            ) from exc
        except etcd_errors.ClientError as exc:
            raise ProtocolError(f"etcd {endpoint}: {what}: rejected: {exc}") from exc

    async def acquire(
        self, pair: str, node: str, ttl_s: float, members: tuple[str, str] | None = None
    ) -> Leader | None:
        key, members_k = leader_key(pair).encode(), members_key(pair).encode()
        # etcd leases are whole seconds; round up so we never hold less than asked.
        ttl = max(1, math.ceil(ttl_s))

        async def body(c: Any) -> Leader | None:
            sent = time.monotonic()
            lease = int((await c.lease(ttl)).id)
            tx = c.transactions
            same = (
                tx.version(members_k) == 0
                if members is None
                else tx.value(members_k) == members_text(members).encode()
            )
            won, responses = await c.transaction(
                compare=[tx.create(key) == 0, same],
                success=[
                    tx.put(key, node.encode(), lease=lease),
                    tx.put(source_key(pair).encode(), node.encode()),
                    tx.get(key),
                ],
                failure=[tx.get(key)],
            )
            if not won:
                # Free the unused lease now rather than letting it linger a TTL.
                with contextlib.suppress(etcd_errors.ClientError):
                    await c.revoke_lease(lease)
            kvs = responses[-1]
            if not kvs:
                if not won:
                    return None  # nobody leads, but the members are not the ones we read
                # The holder expired between compare and range: impossible in one txn.
                raise ProtocolError(f"etcd: acquire {pair}: txn returned no leader key")
            value, kv = kvs[0]
            holder = Leader(value.decode(), int(kv.create_revision))
            self._saw(pair, holder, int(kv.lease), sent)
            # Our own key from an earlier attempt whose answer was lost counts as ours.
            return holder if holder.node == node else None

        return await self._call(f"acquire {pair} for {node}", body)

    async def renew(self, pair: str, node: str, epoch: int) -> bool:
        key = leader_key(pair).encode()

        async def body(c: Any) -> bool:
            lease = self._lease_seen(pair, node, epoch, time.monotonic())
            if lease is None:
                sent = time.monotonic()
                kv = await c.get(key)
                if kv is None or kv.create_revision != epoch or kv.value != node.encode():
                    self._seen.pop(pair, None)
                    return False
                lease = int(kv.lease)
                self._saw(pair, Leader(node, epoch), lease, sent)
            # etcd answers a keepalive for an expired lease with TTL 0, not an error.
            if self._link is not None:
                ttl = await self._link.keep_alive(lease)
            else:
                ttl = await self._keep_alive(c, lease)
            if ttl > 0:
                return True
            self._seen.pop(pair, None)
            return False

        return await self._call(f"renew {pair} for {node} epoch {epoch}", body)

    def _saw(self, pair: str, leader: Leader, lease: int, sent: float) -> None:
        self._seen[pair] = ((leader.node, leader.epoch, lease), sent)

    def _lease_seen(self, pair: str, node: str, epoch: int, now: float) -> int | None:
        seen = self._seen.get(pair)
        if seen is None or now - seen[1] > SEEN_FRESH_S:
            return None
        (holder, held_epoch, lease), _ = seen
        return lease if (holder, held_epoch) == (node, epoch) else None

    async def _keep_alive(self, c: Any, lease: int) -> int:
        """One keep-alive on the arbiter's stream: the lease's TTL now, 0 if it is gone."""
        return (await self.keep_alive_all(c, [lease]))[lease]

    async def keep_alive_all(self, c: Any, leases: list[int]) -> dict[int, int]:
        """A keep-alive per lease on the arbiter's stream, all sent before the first
        answer is read (etcd answers each, TTL 0 for a lease it no longer has)."""
        await c.connect()
        if self._stream is None:
            self._stream = c.leasestub.LeaseKeepAlive(metadata=c.metadata)
        stream = self._stream
        try:
            for lease in leases:
                await stream.write(rpc.LeaseKeepAliveRequest(ID=lease))
            replies = [await stream.read() for _ in leases]
        except rpc.AioRpcError as e:
            self._drop_stream()
            raise etcd_errors.ConnectionFailedError(f"keep-alive stream: {e.details()}") from e
        except BaseException:
            # Cut off between request and answer: a later read would take this answer
            # for its own, so the stream goes.
            self._drop_stream()
            raise
        ttls = {}
        for reply in replies:
            # Anything but an answer (gRPC's end-of-stream marker) means the stream ended.
            if not isinstance(reply, rpc.LeaseKeepAliveResponse):
                break
            ttls[int(reply.ID)] = int(reply.TTL)
        if set(ttls) != set(leases):
            self._drop_stream()
            raise etcd_errors.ConnectionFailedError("keep-alive stream: ended or answered amiss")
        return ttls

    async def leader(self, pair: str) -> Leader | None:
        async def body(c: Any) -> Leader | None:
            kv = await c.get(leader_key(pair).encode())
            return None if kv is None else Leader(kv.value.decode(), int(kv.create_revision))

        return await self._call(f"read leader of {pair}", body)

    async def resign(self, pair: str, node: str, epoch: int) -> None:
        key = leader_key(pair).encode()

        async def body(c: Any) -> None:
            tx = c.transactions
            done, responses = await c.transaction(
                compare=[tx.create(key) == epoch, tx.value(key) == node.encode()],
                success=[tx.get(key), tx.delete(key)],
                failure=[],
            )
            self._seen.pop(pair, None)
            if not done or not responses[0]:
                return
            _, kv = responses[0][0]
            # The key is gone already; revoking only saves the lease's TTL of
            # bookkeeping in etcd, so a lease that expired meanwhile is fine.
            with contextlib.suppress(etcd_errors.ClientError):
                await c.revoke_lease(kv.lease)

        await self._call(f"resign {pair} for {node} epoch {epoch}", body)

    async def set_sync(self, pair: str, node: str, leader_epoch: int) -> bool:
        async def body(c: Any) -> bool:
            tx = c.transactions
            done, _ = await c.transaction(
                compare=[tx.create(leader_key(pair).encode()) == leader_epoch],
                success=[tx.put(sync_key(pair).encode(), node.encode())],
                failure=[],
            )
            return bool(done)

        return await self._call(f"set sync of {pair} to {node} epoch {leader_epoch}", body)

    async def clear_sync(self, pair: str, leader_epoch: int) -> bool:
        async def body(c: Any) -> bool:
            tx = c.transactions
            done, _ = await c.transaction(
                compare=[tx.create(leader_key(pair).encode()) == leader_epoch],
                success=[tx.delete(sync_key(pair).encode())],
                failure=[],
            )
            return bool(done)

        return await self._call(f"clear sync of {pair} epoch {leader_epoch}", body)

    async def set_protection(self, pair: str, on: bool, leader_epoch: int) -> bool:
        async def body(c: Any) -> bool:
            tx = c.transactions
            value = b"on" if on else b"off"
            done, _ = await c.transaction(
                compare=[tx.create(leader_key(pair).encode()) == leader_epoch],
                success=[tx.put(protection_key(pair).encode(), value)],
                failure=[],
            )
            return bool(done)

        return await self._call(f"switch protection of {pair} epoch {leader_epoch}", body)

    async def set_members(self, pair: str, members: tuple[str, str], leader_epoch: int) -> bool:
        async def body(c: Any) -> bool:
            tx = c.transactions
            done, _ = await c.transaction(
                compare=[tx.create(leader_key(pair).encode()) == leader_epoch],
                success=[
                    tx.put(members_key(pair).encode(), members_text(members).encode()),
                    tx.delete(sync_key(pair).encode()),
                ],
                failure=[],
            )
            return bool(done)

        return await self._call(f"set members of {pair} to {members} epoch {leader_epoch}", body)

    async def record(self, pair: str) -> PairRecord:
        if self._link is not None:
            try:
                async with asyncio.timeout(self._deadline_s):
                    kvs, sent = await self._link.read(pair)
            except TimeoutError as exc:
                raise ArbiterUnavailable(
                    f"etcd {self.endpoint}: read {pair}: no answer within {self._deadline_s:g}s"
                ) from exc
        else:
            found, sent = await self.records([pair])
            kvs = found[pair]
        return self._record_of(pair, kvs, sent)

    async def records(self, pairs: Sequence[str]) -> tuple[dict[str, dict[bytes, Any]], float]:
        """Every key of each pair, in one transaction, and when it was sent."""

        async def body(c: Any) -> tuple[dict[str, dict[bytes, Any]], float]:
            tx = c.transactions
            prefixes = [pair_prefix(p).encode() for p in pairs]
            sent = time.monotonic()
            _, responses = await c.transaction(
                compare=[],
                success=[tx.get(k, prefix_range_end(k)) for k in prefixes],
                failure=[],
            )
            found = {
                p: {kv.key: kv for _, kv in rows} for p, rows in zip(pairs, responses, strict=True)
            }
            return found, sent

        return await self._call(f"read {', '.join(pairs)}", body)

    def _record_of(self, pair: str, kvs: dict[bytes, Any], sent: float) -> PairRecord:
        lead = kvs.get(leader_key(pair).encode())
        sync, switch = kvs.get(sync_key(pair).encode()), kvs.get(protection_key(pair).encode())
        source, members = kvs.get(source_key(pair).encode()), kvs.get(members_key(pair).encode())
        leader = None
        if lead is None:
            self._seen.pop(pair, None)
        else:
            leader = Leader(lead.value.decode(), int(lead.create_revision))
            self._saw(pair, leader, int(lead.lease), sent)
        return PairRecord(
            leader,
            None if sync is None else str(sync.value.decode()),
            None if switch is None else switch.value == b"on",
            None if source is None else str(source.value.decode()),
            None if members is None else _members(pair, members.value.decode()),
        )

    async def close(self) -> None:
        self._drop_stream()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._deadline_s):
                    await client.close()


def _members(pair: str, text: str) -> tuple[str, str]:
    members = members_of(text)
    if members is None:
        # Only set_members writes the key: anything else is someone's hand edit.
        raise ProtocolError(f"etcd: {members_key(pair)} is {text!r}, not two node names")
    return members


class _PerTurn(Generic[K, V]):
    """Requests made on one turn of the event loop, sent together on the next by a task
    of its own: a requester that gives up (its deadline, its tick cancelled) never
    cancels the others' answer, and every requester bounds its own wait. A failed send
    fails its whole batch."""

    def __init__(self, send: Callable[[list[K]], Awaitable[V]]) -> None:
        self._send_batch = send
        self._keys: list[K] = []
        self._answer: asyncio.Future[V] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0  # sent

    async def ask(self, key: K) -> V:
        """The whole answer of the batch `key` joined."""
        if self._answer is None:
            self._answer = asyncio.get_running_loop().create_future()
            # Unread when every requester gave up: retrieved here, so nothing is logged.
            self._answer.add_done_callback(lambda f: f.cancelled() or f.exception())
            asyncio.get_running_loop().call_soon(self._send)
        if key not in self._keys:
            self._keys.append(key)
        return await asyncio.shield(self._answer)

    def _send(self) -> None:
        keys, answer = self._keys, self._answer
        self._keys, self._answer = [], None
        assert answer is not None
        task = asyncio.create_task(self._fetch(keys, answer))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _fetch(self, keys: list[K], answer: asyncio.Future[V]) -> None:
        self.batches += 1
        try:
            found = await self._send_batch(keys)
        except Exception as e:
            answer.set_exception(e)
        else:
            answer.set_result(found)
        finally:
            if not answer.done():  # cancelled by close(): its requesters are told at once
                answer.set_exception(ArbiterUnavailable("etcd: shared link closed"))

    def cancel(self) -> None:
        for task in list(self._sending):
            task.cancel()


class SharedLink:
    """An agent's one etcd connection for the steady calls of all its pairs, each kind
    gathered per turn of the event loop: record reads go out as one transaction, and
    lease keep-alives together on one stream. Every pair keeps a lease of its own (a
    pair whose loop stops renewing loses its leadership alone, as if its host had)."""

    def __init__(self, endpoints: Sequence[str], deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self._arbiter = EtcdArbiter(endpoints, deadline_s)  # a connection of its own
        self._reads: _PerTurn[str, tuple[dict[str, dict[bytes, Any]], float]] = _PerTurn(
            self._arbiter.records
        )
        self._alive: _PerTurn[int, dict[int, int]] = _PerTurn(self._keep_alive)
        # One round on the stream at a time: two would read each other's answers.
        self._streaming = asyncio.Lock()

    @property
    def batches(self) -> int:
        """Read transactions sent."""
        return self._reads.batches

    @property
    def keep_alives(self) -> int:
        """Rounds of keep-alives sent (one per lease asked on that turn in each)."""
        return self._alive.batches

    async def read(self, pair: str) -> tuple[dict[bytes, Any], float]:
        """The pair's keys, and when the read that found them was sent."""
        found, sent = await self._reads.ask(pair)
        return found[pair], sent

    async def keep_alive(self, lease: int) -> int:
        """The lease's TTL after a keep-alive sent no earlier than this call; 0: gone."""
        return (await self._alive.ask(lease))[lease]

    async def _keep_alive(self, leases: list[int]) -> dict[int, int]:
        arb = self._arbiter
        async with self._streaming:
            return await arb._call(
                f"keep-alive of {len(leases)} lease(s)", lambda c: arb.keep_alive_all(c, leases)
            )

    async def close(self) -> None:
        self._reads.cancel()
        self._alive.cancel()
        await self._arbiter.close()
