"""An in-memory arbiter for unit tests of the decision core.

Time is injected so tests can expire leases by advancing a fake clock instead
of sleeping. Semantics follow the etcd backend (the contract suite runs both):
one revision counter for all writes, so epochs only grow; the sync record is
persistent and outlives the leader's lease, like etcd's /sync key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from coloft.arbiter.base import ArbiterUnavailable, Leader, PairRecord


@dataclass(frozen=True)
class _Lease:
    node: str
    epoch: int
    ttl_s: float
    expires_at: float


class MemoryArbiter:
    """Arbiter state held in one process; `available=False` simulates an outage."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._revision = 0
        self._leaders: dict[str, _Lease] = {}
        self._sync: dict[str, str] = {}
        self._protection: dict[str, bool] = {}
        self._source: dict[str, str] = {}
        self._members: dict[str, tuple[str, str]] = {}
        self.available = True

    def _check(self, op: str) -> None:
        if not self.available:
            raise ArbiterUnavailable(f"memory arbiter: {op}: marked unavailable")

    def _live(self, pair: str) -> _Lease | None:
        lease = self._leaders.get(pair)
        if lease is not None and self._clock() >= lease.expires_at:
            # Expiry is lazy: evaluated against the injected clock on each read.
            del self._leaders[pair]
            return None
        return lease

    def _bump(self) -> int:
        self._revision += 1
        return self._revision

    async def acquire(
        self, pair: str, node: str, ttl_s: float, members: tuple[str, str] | None = None
    ) -> Leader | None:
        self._check("acquire")
        current = self._live(pair)
        if current is not None:
            return Leader(current.node, current.epoch) if current.node == node else None
        if self._members.get(pair) != members:
            return None
        epoch = self._bump()
        self._leaders[pair] = _Lease(node, epoch, ttl_s, self._clock() + ttl_s)
        self._source[pair] = node
        return Leader(node, epoch)

    async def renew(self, pair: str, node: str, epoch: int) -> bool:
        self._check("renew")
        current = self._live(pair)
        if current is None or current.node != node or current.epoch != epoch:
            return False
        self._leaders[pair] = _Lease(node, epoch, current.ttl_s, self._clock() + current.ttl_s)
        return True

    async def leader(self, pair: str) -> Leader | None:
        self._check("leader")
        current = self._live(pair)
        return None if current is None else Leader(current.node, current.epoch)

    async def resign(self, pair: str, node: str, epoch: int) -> None:
        self._check("resign")
        current = self._live(pair)
        if current is not None and current.node == node and current.epoch == epoch:
            del self._leaders[pair]
            self._bump()

    async def set_sync(self, pair: str, node: str, leader_epoch: int) -> bool:
        self._check("set_sync")
        if not self._is_current(pair, leader_epoch):
            return False
        self._sync[pair] = node
        self._bump()
        return True

    async def clear_sync(self, pair: str, leader_epoch: int) -> bool:
        self._check("clear_sync")
        if not self._is_current(pair, leader_epoch):
            return False
        if self._sync.pop(pair, None) is not None:
            self._bump()
        return True

    async def set_protection(self, pair: str, on: bool, leader_epoch: int) -> bool:
        self._check("set_protection")
        if not self._is_current(pair, leader_epoch):
            return False
        self._protection[pair] = on
        self._bump()
        return True

    async def set_members(self, pair: str, members: tuple[str, str], leader_epoch: int) -> bool:
        self._check("set_members")
        if not self._is_current(pair, leader_epoch):
            return False
        self._members[pair] = members
        self._sync.pop(pair, None)
        self._bump()
        return True

    async def record(self, pair: str) -> PairRecord:
        self._check("record")
        current = self._live(pair)
        leader = None if current is None else Leader(current.node, current.epoch)
        return PairRecord(
            leader,
            self._sync.get(pair),
            self._protection.get(pair),
            self._source.get(pair),
            self._members.get(pair),
        )

    async def close(self) -> None:
        return None

    def _is_current(self, pair: str, epoch: int) -> bool:
        current = self._live(pair)
        return current is not None and current.epoch == epoch
