"""Lease arithmetic for the active side (Patroni's discipline). Pure: time is passed in.

A leader counts its lease from the moment it *sent* the renewal that succeeded
(never from when the answer arrived), on the monotonic clock, and stops acting
(fences: kills its QEMU) a margin before that lease could expire anywhere. A
timing whose renewal attempts cannot all fit in one TTL is rejected up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coloft.core.pace import new_beat

# etcd rounds a lease TTL up to whole seconds, with 2 s at the least.
ETCD_MIN_TTL_S = 2.0


@dataclass(frozen=True)
class LeaseTiming:
    ttl_s: float = 2.0
    renew_every_s: float = 0.5
    call_deadline_s: float = 0.4
    fence_margin_s: float = 0.4


def problems(t: LeaseTiming) -> list[str]:
    """Why a timing is unsafe; empty when it is fine."""
    found = []
    if t.ttl_s < ETCD_MIN_TTL_S or t.ttl_s != math.ceil(t.ttl_s):
        found.append(
            f"ttl_s {t.ttl_s:g} must be a whole number of seconds >= "
            f"{ETCD_MIN_TTL_S:g} (etcd rounds it up otherwise)"
        )
    # One missed renewal plus a retry, each up to a call deadline, must still end
    # before the leader's own fencing point.
    budget = t.ttl_s - t.fence_margin_s
    worst = t.renew_every_s + 2 * t.call_deadline_s
    if worst >= budget:
        found.append(
            f"renew_every_s + 2 x call_deadline_s = {worst:g} s must stay below "
            f"ttl_s - fence_margin_s = {budget:g} s"
        )
    if t.fence_margin_s <= 0:
        found.append("fence_margin_s must be positive")
    return found


def fence_at(renew_sent_at: float, t: LeaseTiming) -> float:
    """When a leader whose last good renewal was sent at `renew_sent_at` must fence."""
    return renew_sent_at + t.ttl_s - t.fence_margin_s


def must_fence(now: float, renew_sent_at: float, t: LeaseTiming) -> bool:
    return now >= fence_at(renew_sent_at, t)


def may_act(now: float, renew_sent_at: float | None, t: LeaseTiming) -> bool:
    """A node acts as leader only on a lease it knows is still valid."""
    return renew_sent_at is not None and not must_fence(now, renew_sent_at, t)


# How often a steady pair reads its arbiter record (read_due).
STEADY_READ_S = 0.5


def read_due(now: float, last_read_at: float | None, steady: bool) -> bool:
    """Whether an agent reads the arbiter on this tick.

    In a steady pair (both settled in COLO, hearing each other on every path, no
    operator intent or long step under way) nothing an agent must act on at once can
    change in the arbiter unseen: the leader's renewals guard its own lease, and a
    peer that dies or is cut off goes silent here before its lease can expire. Such a
    pair reads once per STEADY_READ_S of the beat (for the operator's switch, shown
    state), on the same tick as the agent's other pairs; any other reads every tick.
    """
    return last_read_at is None or not steady or new_beat(STEADY_READ_S, last_read_at, now)
