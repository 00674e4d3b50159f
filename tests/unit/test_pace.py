"""Loops on a shared beat."""

from __future__ import annotations

import pytest

from coloft.core.pace import MIN_WAIT_S, until_beat


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
