"""Arbiters: the tie-breaker deciding which node of a pair may be active."""

from coloft.arbiter.base import (
    DEFAULT_DEADLINE_S,
    Arbiter,
    ArbiterUnavailable,
    Leader,
    PairRecord,
    leader_key,
    sync_key,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "Arbiter",
    "ArbiterUnavailable",
    "Leader",
    "PairRecord",
    "leader_key",
    "sync_key",
]
