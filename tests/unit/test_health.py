"""Checkpoint accounting and the protection verdict."""

from __future__ import annotations

from coloft.core.health import Checkpoints, on_event, paused_s, verdict
from coloft.model.status import SideStatus

P = SideStatus("a", "primary", 1, True, "running", "primary", "none", "colo", 1.0)
S = SideStatus("b", "secondary", 2, True, "running", "secondary", "none", None, 1.0)


def checkpoints_at(*times: float) -> Checkpoints:
    cp = Checkpoints()
    for t in times:
        cp = on_event(on_event(cp, "STOP", t), "RESUME", t + 0.05)
    return cp


def test_stop_resume_pairs_count_checkpoints_and_pauses() -> None:
    cp = checkpoints_at(10.0, 12.0, 14.0)
    assert cp.count == 3
    assert cp.last_at == 14.05
    assert cp.last_pause_ms is not None and abs(cp.last_pause_ms - 50.0) < 1e-6
    assert len(cp.pauses_ms) == 3


def test_resume_without_stop_is_not_a_checkpoint() -> None:
    assert on_event(Checkpoints(), "RESUME", 1.0).count == 0


def test_paused_counts_only_the_pauses_inside_the_window_and_the_one_under_way() -> None:
    cp = checkpoints_at(10.0, 12.0)  # stopped 10.0-10.05 and 12.0-12.05
    assert round(paused_s(cp, 10.02, 12.03), 6) == 0.06
    assert paused_s(cp, 10.1, 11.9) == 0.0
    cp = on_event(cp, "STOP", 13.0)
    assert round(paused_s(cp, 12.9, 13.2), 6) == 0.2


def test_per_minute_window() -> None:
    cp = checkpoints_at(0.0, 30.0, 59.0, 61.0)
    assert cp.per_minute(61.1) == 3.0


def test_protected_when_in_colo_and_checkpoints_recent() -> None:
    v = verdict(P, S, checkpoints_at(10.0), 2000, 11.0)
    assert v.protected and v.phase == "protected"


def test_stale_checkpoint_is_degraded() -> None:
    v = verdict(P, S, checkpoints_at(10.0), 2000, 15.05)
    assert not v.protected and v.phase == "degraded"
    assert "no checkpoint for 5.0 s (limit 4.0 s" in v.reason


def test_no_checkpoint_yet_is_starting() -> None:
    assert verdict(P, S, Checkpoints(), 2000, 1.0).phase == "starting"


def test_dead_or_not_colo_sides() -> None:
    dead = SideStatus("b", "secondary", 2, False)
    v = verdict(P, dead, checkpoints_at(10.0), 2000, 10.5)
    assert v.phase == "failed" and "secondary b" in v.reason
    plain = SideStatus("a", "primary", 1, True, "running", "none", "none", "completed")
    assert verdict(plain, S, checkpoints_at(10.0), 2000, 10.5).phase == "degraded"
    hung = SideStatus("a", "primary", 1, True, error="query-status got no answer within 1 s")
    v = verdict(hung, S, checkpoints_at(10.0), 2000, 10.5)
    assert not v.protected and "no answer" in v.reason


def test_a_checkpoint_that_does_not_finish_is_degraded_within_a_second() -> None:
    cp = checkpoints_at(10.0)
    assert verdict(P, S, cp, 2000, 10.5, primary_stopped_at=10.2).protected
    v = verdict(P, S, cp, 2000, 11.3, primary_stopped_at=10.2)
    assert v.phase == "degraded" and "primary guest frozen in a checkpoint for 1.1 s" in v.reason
    stuck = on_event(cp, "STOP", 11.0)
    v = verdict(P, S, stuck, 2000, 12.1)
    assert v.phase == "degraded" and "secondary stopped for 1.1 s" in v.reason


def test_a_checkpoint_sooner_than_the_interval_counts_as_forced() -> None:
    cp = Checkpoints()
    # Timer-driven every 2 s, then two asked for by colo-compare in between.
    for start in (0.0, 2.01, 4.02, 4.5, 5.0, 7.0):
        cp = on_event(on_event(cp, "STOP", start, 2.0), "RESUME", start + 0.05, 2.0)
    assert (cp.count, cp.forced) == (6, 2)
    # Without an interval (callers that do not care) nothing is called forced.
    assert on_event(on_event(Checkpoints(), "STOP", 0.0), "STOP", 0.1).forced == 0
