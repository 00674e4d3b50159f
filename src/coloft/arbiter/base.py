"""The arbiter contract: who may be the active side of a COLO pair.

Both nodes of a pair can see each other's disks and network, so "the peer looks
dead" is never enough to take over: a partition looks the same. The arbiter is
the third party that breaks the tie. Leadership is a key bound to a lease
(Patroni's discipline): a leader acts as leader only while its lease is valid
on its own monotonic clock, and demotes/fences the moment a renewal fails.

The leader key's create revision is the fencing *epoch*: it only grows, so every
write a leader makes (the sync record) is guarded by "my epoch is still the
current one", and a deposed leader's late writes are rejected by the backend.
"""

from __future__ import annotations

from typing import Protocol

from coloft.errors import ConfigError, TransientError
from coloft.model.leader import Leader as Leader  # re-exported for backends
from coloft.model.leader import PairRecord as PairRecord

DEFAULT_DEADLINE_S = 1.0


class ArbiterUnavailable(TransientError):
    """The arbiter backend did not answer within the call's deadline.

    Transient on purpose: the caller treats it as "no lease renewal this tick",
    which for a leader means the lease clock keeps running down.
    """


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (an http:// prefix is tolerated) into its parts."""
    bare = endpoint.removeprefix("http://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"etcd endpoint {endpoint!r}: expected host:port")
    return host.strip("[]"), int(port)


def leader_key(pair: str) -> str:
    return f"/coloft/{pair}/leader"


def sync_key(pair: str) -> str:
    return f"/coloft/{pair}/sync"


def protection_key(pair: str) -> str:
    return f"/coloft/{pair}/protection"


def source_key(pair: str) -> str:
    return f"/coloft/{pair}/source"


def members_key(pair: str) -> str:
    return f"/coloft/{pair}/members"


def pair_prefix(pair: str) -> str:
    """The prefix of every key of one pair (the slash keeps vm1 apart from vm10)."""
    return f"/coloft/{pair}/"


class Arbiter(Protocol):
    """Async access to one arbiter; every call is bounded by a deadline.

    A call either returns an answer the backend committed to or raises
    ArbiterUnavailable; it never blocks much longer than its deadline.
    """

    async def acquire(
        self, pair: str, node: str, ttl_s: float, members: tuple[str, str] | None = None
    ) -> Leader | None:
        """Become leader iff no live leader key exists and the recorded members are
        still `members` (None: never recorded), with a fresh lease of ttl_s.

        Returns None if another node leads or the members changed. If `node`
        already holds the key (an earlier attempt whose answer was lost), returns
        that leadership as is. Winning also names `node` the pair's source, in the
        same write: whoever leads serves the guest from its own disk, so after it
        no other disk may start the guest until it leads again (the source
        outlives every lease).
        """
        ...

    async def renew(self, pair: str, node: str, epoch: int) -> bool:
        """Keep our lease alive; False once our leadership of that epoch is gone."""
        ...

    async def leader(self, pair: str) -> Leader | None:
        """The current live leader, if any."""
        ...

    async def resign(self, pair: str, node: str, epoch: int) -> None:
        """Drop our key and lease, but only if they are still ours (same epoch)."""
        ...

    async def set_sync(self, pair: str, node: str, leader_epoch: int) -> bool:
        """Name `node` the only automatic successor, iff leader_epoch is current."""
        ...

    async def clear_sync(self, pair: str, leader_epoch: int) -> bool:
        """Remove the sync record, iff leader_epoch is current."""
        ...

    async def set_protection(self, pair: str, on: bool, leader_epoch: int) -> bool:
        """The operator's protection switch (`coloft protect/unprotect`), iff
        leader_epoch is current; it outlives leaders like the sync record."""
        ...

    async def set_members(self, pair: str, members: tuple[str, str], leader_epoch: int) -> bool:
        """Record the two nodes that run the pair from now on (a spare replacing a
        lost node) and clear sync in the same write, iff leader_epoch is current:
        a node outside the members never runs the guest, and the new one may take
        over only once it is named sync after its first checkpoint."""
        ...

    async def record(self, pair: str) -> PairRecord:
        """Leader, sync (the node allowed to take over automatically), switch (None:
        never set, the spec decides), source and members, in one read."""
        ...

    async def close(self) -> None:
        """Release connections; the arbiter is unusable afterwards."""
        ...
