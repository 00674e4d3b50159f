"""The demo's `protection` summary, from agents' time-stamped events (no lab)."""

from __future__ import annotations

from typing import Any

from coloft.lab.rounds import PathWatch


def ev(unix: float, kind: str, **extra: Any) -> dict[str, Any]:
    return {"unix": unix, "kind": kind, "text": "", **extra}


def test_reason_is_the_code_naming_the_link_and_its_policy_counts() -> None:
    w = PathWatch(100.0, hold_s=5.0)
    assert not w.due(104.0) and w.due(105.0) and not w.due(106.0)
    events = [
        ev(99.0, "protection", code="probe-timeout"),  # before the fault: ignored
        ev(100.4, "protection", code="probe-timeout"),
        ev(100.4, "policy", code="probe-timeout", policy="alert", applied=True),
        ev(100.6, "protection", code="mirror-disconnected"),
        ev(100.6, "policy", code="mirror-disconnected", policy="re-establish", applied=False),
        ev(100.9, "policy", code="mirror-disconnected", policy="re-establish", applied=True),
        ev(106.2, "protection", code=""),
    ]
    found = w.summary(events)
    assert found == {
        "degraded_after_ms": 400.0,
        "reason": "mirror-disconnected",
        "policy": "re-establish",
        "policy_applied_ms": 900.0,
        "protected_again_ms": 1200.0,
    }


def test_a_run_alone_is_the_policy_when_the_naming_reason_had_none() -> None:
    w = PathWatch(100.0)
    events = [
        ev(100.3, "protection", code="probe-timeout"),
        ev(100.3, "policy", code="probe-timeout", policy="alert", applied=True),
        ev(100.5, "protection", code="secondary-not-in-colo"),
        ev(100.9, "protection", code="secondary-stalled"),
        ev(101.0, "policy", code="secondary-lost", policy="run-alone", applied=True),
        ev(101.0, "protection", code="running-alone"),
    ]
    found = w.summary(events)
    assert (found["reason"], found["policy"], found["policy_applied_ms"]) == (
        "secondary-stalled",
        "run-alone",
        1000.0,
    )
    assert found["protected_again_ms"] is None


def test_a_fault_the_pair_ends_itself_counts_protected_again_from_the_fault() -> None:
    events = [
        ev(100.5, "protection", code="secondary-stalled"),
        ev(101.0, "protection", code="running-alone"),
        ev(101.2, "protection", code="reprotecting"),
        ev(102.5, "protection", code=""),  # re-protected before the demo's lift at 105
    ]
    frozen = PathWatch(100.0, lifted=False)
    assert frozen.due(105.0)
    assert frozen.summary(events)["protected_again_ms"] == 2500.0
    cut = PathWatch(100.0)
    assert cut.due(105.0)
    assert cut.summary(events)["protected_again_ms"] is None
