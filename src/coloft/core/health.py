"""Checkpoint accounting and the protection verdict. Pure: time is passed in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from coloft.model.status import SideStatus

WINDOW_S = 60.0
MAX_PAUSES = 4096
MAX_STARTS = 64


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least ``pct`` % of values <= it.

    ``None`` for no values; ``pct`` 0 gives the minimum, 100 the maximum.
    """
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile out of range: {pct}")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Checkpoints:
    """Checkpoints seen as the secondary's STOP -> RESUME pairs (one per checkpoint)."""

    count: int = 0
    last_at: float | None = None
    stopped_at: float | None = None
    last_pause_ms: float | None = None
    recent: tuple[float, ...] = ()
    pauses_ms: tuple[float, ...] = ()
    # When the last few checkpoints began (STOP): a probe reply that crossed one may
    # have been released by its flush rather than matched (effects.probe).
    starts: tuple[float, ...] = ()
    # The last few pauses, (STOP, RESUME): time the guest could not answer anyone.
    spans: tuple[tuple[float, float], ...] = ()
    # Checkpoints that began well before the timer was due: asked for by
    # colo-compare (a miscompare or a compare timeout) or by an operator.
    forced: int = 0

    def per_minute(self, now: float) -> float:
        return float(sum(1 for t in self.recent if now - t <= WINDOW_S))

    def age(self, now: float) -> float | None:
        return None if self.last_at is None else now - self.last_at


# QEMU re-arms the checkpoint timer at each checkpoint's start, so one due by the
# timer begins a full interval after the one before; a forced one sooner.
FORCED_BEFORE = 0.8


def on_event(cp: Checkpoints, kind: str, now: float, interval_s: float = 0.0) -> Checkpoints:
    if kind == "STOP":
        early = bool(cp.starts) and now - cp.starts[-1] < FORCED_BEFORE * interval_s
        return replace(
            cp,
            stopped_at=now,
            starts=(*cp.starts, now)[-MAX_STARTS:],
            forced=cp.forced + early,
        )
    if kind == "RESUME" and cp.stopped_at is not None:
        pause = (now - cp.stopped_at) * 1000.0
        recent = (*tuple(t for t in cp.recent if now - t <= WINDOW_S), now)
        return Checkpoints(
            count=cp.count + 1,
            last_at=now,
            stopped_at=None,
            last_pause_ms=pause,
            recent=recent,
            pauses_ms=(*cp.pauses_ms, pause)[-MAX_PAUSES:],
            starts=cp.starts,
            spans=(*cp.spans, (cp.stopped_at, now))[-MAX_STARTS:],
            forced=cp.forced,
        )
    return cp


def paused_s(cp: Checkpoints, since: float, until: float) -> float:
    """How long checkpoints kept the guest stopped between `since` and `until`
    (the pause under way included)."""
    spans = cp.spans if cp.stopped_at is None else (*cp.spans, (cp.stopped_at, until))
    return sum(max(0.0, min(end, until) - max(start, since)) for start, end in spans)


@dataclass(frozen=True)
class Verdict:
    phase: str
    protected: bool
    reason: str
    # Machine-readable reason: "" while protected, else e.g. "mirror-disconnected".
    code: str = ""


# A checkpoint pauses the guests for tens of ms (p99 ~100 ms under load here); one
# that has not finished after this long is stuck, typically on a replication link
# that drops packets silently while every QMP status still reads "colo".
STALL_LIMIT_S = 1.0


def verdict(
    primary: SideStatus,
    secondary: SideStatus,
    cp: Checkpoints,
    interval_ms: int,
    now: float,
    primary_stopped_at: float | None = None,
) -> Verdict:
    """Protected only when both sides are in COLO and checkpoints keep completing.

    `primary_stopped_at` is the primary's STOP event of a checkpoint still without
    its RESUME (None while the primary runs); `cp.stopped_at` is the same for the
    secondary. Events, not sampled run states: under load checkpoints come several
    times a second, and samples would keep landing in different ones.
    """
    for side in (primary, secondary):
        if not side.alive:
            return Verdict(
                "failed",
                False,
                f"{side.role} {side.node}: QEMU is not running",
                f"{side.role}-down",
            )
        if side.error is not None:
            return Verdict(
                "degraded", False, f"{side.role} {side.node}: {side.error}", f"{side.role}-qmp"
            )
    if primary.colo_mode != "primary" or primary.migration != "colo":
        return Verdict(
            "degraded",
            False,
            f"primary {primary.node} not in COLO (mode {primary.colo_mode}, "
            f"migration {primary.migration})",
            "primary-not-in-colo",
        )
    if secondary.colo_mode != "secondary":
        return Verdict(
            "degraded",
            False,
            f"secondary {secondary.node} not in COLO (mode {secondary.colo_mode})",
            "secondary-not-in-colo",
        )
    if primary_stopped_at is not None and now - primary_stopped_at > STALL_LIMIT_S:
        return Verdict(
            "degraded",
            False,
            f"checkpoint stalled: primary guest frozen in a checkpoint for "
            f"{now - primary_stopped_at:.1f} s (replication link?)",
            "checkpoint-stalled",
        )
    if cp.stopped_at is not None and now - cp.stopped_at > STALL_LIMIT_S:
        return Verdict(
            "degraded",
            False,
            f"checkpoint stalled: secondary stopped for {now - cp.stopped_at:.1f} s "
            "without resuming",
            "secondary-stalled",
        )
    age = cp.age(now)
    limit = 2 * interval_ms / 1000.0
    if age is None:
        return Verdict(
            "starting", False, "in COLO, waiting for the first checkpoint", "first-checkpoint"
        )
    if age > limit:
        return Verdict(
            "degraded",
            False,
            f"no checkpoint for {age:.1f} s (limit {limit:.1f} s = 2 intervals)",
            "no-checkpoint",
        )
    return Verdict(
        "protected", True, f"in COLO, last checkpoint {age:.1f} s ago, {cp.count} so far"
    )
