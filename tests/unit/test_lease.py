"""Lease arithmetic and the timing invariants."""

from __future__ import annotations

from coloft.core.lease import (
    STEADY_READ_S,
    LeaseTiming,
    fence_at,
    may_act,
    must_fence,
    problems,
    read_due,
)


def test_default_timing_is_safe() -> None:
    assert problems(LeaseTiming()) == []


def test_renewals_that_cannot_fit_in_the_ttl_are_rejected() -> None:
    found = problems(LeaseTiming(ttl_s=2.0, renew_every_s=1.0, call_deadline_s=0.5))
    assert any("must stay below ttl_s - fence_margin_s" in p for p in found), found


def test_ttl_must_be_whole_seconds_and_at_least_two() -> None:
    assert any("whole number" in p for p in problems(LeaseTiming(ttl_s=1.0)))
    assert any("whole number" in p for p in problems(LeaseTiming(ttl_s=2.5)))
    assert any(
        "fence_margin_s must be positive" in p for p in problems(LeaseTiming(fence_margin_s=0.0))
    )


def test_fencing_point_counts_from_when_the_renewal_was_sent() -> None:
    t = LeaseTiming(ttl_s=2.0, fence_margin_s=0.4)
    assert fence_at(100.0, t) == 101.6
    assert not must_fence(101.59, 100.0, t)
    assert must_fence(101.6, 100.0, t)


def test_may_act_only_with_a_known_valid_lease() -> None:
    t = LeaseTiming()
    assert not may_act(5.0, None, t)
    assert may_act(5.0, 4.0, t)
    assert not may_act(10.0, 4.0, t)


def test_a_steady_pair_reads_its_arbiter_less_often_and_any_other_every_tick() -> None:
    assert read_due(5.0, None, steady=True), "the first tick always reads"
    assert not read_due(5.0 + STEADY_READ_S - 0.01, 5.0, steady=True)
    assert read_due(5.0 + STEADY_READ_S, 5.0, steady=True)
    assert read_due(5.01, 5.0, steady=False)


def test_steady_pairs_that_read_apart_read_again_on_one_tick() -> None:
    for last in (5.01, 5.2, 5.45):
        assert not read_due(5.49, last, steady=True)
        assert read_due(5.0 + STEADY_READ_S + 0.001, last, steady=True)
