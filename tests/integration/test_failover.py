"""Failover under client load, against real QEMU: the three oracles of the issue.

Every acknowledged write reads back from the survivor; the client connection
opened before the fault keeps working without a reset; the two hosts never put
the VM's frames on the LAN at the same time (frame counters of both taps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from coloft.agent.pair import HUNG_AFTER_S, OOB_PROBE_S, QUERY_DEADLINE_S, TICK_S, Pair
from coloft.lab import faults
from coloft.lab.rounds import FaultRound, fault_round
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from tests.integration.conftest import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# Silence limit, plus a supervisor tick, a QMP deadline and the out-of-band probe.
STOP_DETECT_MS = (HUNG_AFTER_S + TICK_S + QUERY_DEADLINE_S + OOB_PROBE_S) * 1000 + 500


def run_fault(make_pair: Callable[[PairSpec], Pair], tmp_path: Path, fault: str) -> FaultRound:
    pair = make_pair(lab_spec(interval_ms=2000))
    return run_scenario(pair, lambda: fault_round(pair, fault, tmp_path))


def assert_oracles(found: FaultRound) -> None:
    result, checked = found.result, found.checked
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
    assert result["acked_writes"] > 100, result
    assert result["requests_failed"] == 0, result["errors"]
    assert result["reconnects"] == 0, "the client connection was reset"
    assert found.overlap_ms == 0.0, "both hosts sent the VM's frames at once"


@pytest.mark.parametrize(
    ("fault", "survivor", "action", "detect_within_ms", "gap_within_ms"),
    [
        ("kill-primary", "b", "secondary-takes-over", 150, 1000),
        ("kill-secondary", "a", "primary-continues-alone", 150, 1000),
        # A stopped QEMU is found by its QMP silence, then fenced (killed).
        ("stop-primary", "b", "secondary-takes-over", STOP_DETECT_MS, STOP_DETECT_MS + 1000),
        ("stop-secondary", "a", "primary-continues-alone", STOP_DETECT_MS, STOP_DETECT_MS + 1000),
    ],
)
def test_fault_under_load(
    make_pair: Callable[[PairSpec], Pair],
    tmp_path: Path,
    fault: str,
    survivor: str,
    action: str,
    detect_within_ms: float,
    gap_within_ms: float,
) -> None:
    found = run_fault(make_pair, tmp_path, fault)
    assert len(found.failovers) == 1, found.failovers
    record = found.failovers[0]
    assert (record.action, record.survivor, record.error) == (action, survivor, None)
    assert found.detected_ms is not None, "no detection"
    assert found.detected_ms < detect_within_ms, f"detected after {found.detected_ms:.0f} ms"
    assert_oracles(found)
    # The survivor served the second part of the run: its tap carried frames.
    assert found.frames[survivor] > 0
    assert found.result["max_reply_gap_ms"] < gap_within_ms, found.result["max_reply_gap_ms"]


def test_unsynced_secondary_refuses_to_take_over(make_pair: Callable[[PairSpec], Pair]) -> None:
    """A primary lost before the first checkpoint: the secondary has no state to serve."""
    pair = make_pair(lab_spec(interval_ms=60_000))

    async def scenario() -> str:
        await pair.up()
        assert pair.checkpoints.count == 0
        faults.inject(pair, "kill-primary")
        async with asyncio.timeout(5):
            await pair.wake.wait()
        await pair.handle_failures()
        status = await pair.observe()
        assert status.phase == "failed" and not status.protected
        return status.reason

    reason = run_scenario(pair, scenario)
    assert "never completed a checkpoint" in reason
    assert pair.failovers == [] and pair.alone is None
