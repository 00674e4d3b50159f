"""Loops on a shared beat."""

from __future__ import annotations

import pytest

from coloft.core.pace import MIN_WAIT_S, new_beat, until_beat


@pytest.mark.parametrize(
    ("now", "left"), [(10.0, 0.1), (10.03, 0.07), (10.0995, 0.1005), (10.1, 0.1)]
)
def test_the_wait_ends_on_the_next_multiple_of_the_period(now: float, left: float) -> None:
    assert until_beat(0.1, now) == pytest.approx(left)


def test_loops_started_apart_wake_together() -> None:
    wakes = {round(start + until_beat(0.05, start), 6) for start in (3.001, 3.017, 3.049)}
    assert wakes == {3.05}


def test_a_loop_right_on_a_beat_waits_a_whole_period_not_a_moment() -> None:
    assert until_beat(0.2, 4.0 - MIN_WAIT_S / 2) > MIN_WAIT_S


def test_once_per_period_work_falls_on_one_tick_whatever_each_did_last() -> None:
    # Two pairs that last renewed at different moments of one period are both due on
    # the first tick of the next, and not before.
    for last in (7.01, 7.38, 7.49):
        assert not new_beat(0.5, last, 7.4999)
        assert new_beat(0.5, last, 7.5)
    assert new_beat(0.5, float("-inf"), 0.0), "never done: due at once"


def test_a_calm_tick_lands_on_the_steady_arbiter_reads_and_the_heartbeat_beat() -> None:
    from coloft.agent.daemon import CALM_TICK_S
    from coloft.core.lease import STEADY_READ_S
    from coloft.model.spec import HeartbeatSpec

    heartbeat_s = HeartbeatSpec().interval_ms / 1000
    for whole in (STEADY_READ_S / CALM_TICK_S, CALM_TICK_S / heartbeat_s):
        assert whole == pytest.approx(round(whole))


def test_only_what_the_verdicts_read_in_a_qemu_answer_wakes_a_calm_tick() -> None:
    from coloft.agent.daemon import _moved
    from coloft.model.status import SideStatus

    colo = SideStatus("a", "primary", 7, True, "running", "primary", None, "colo", 3.0)
    assert not _moved(
        colo, SideStatus("a", "primary", 7, True, "running", "primary", None, "colo", 9.0)
    )
    assert _moved(
        colo, SideStatus("a", "primary", 7, True, "running", "none", None, "completed", 3.0)
    )
    assert _moved(None, colo) and not _moved(None, None)
