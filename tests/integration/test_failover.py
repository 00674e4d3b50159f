"""Failover under client load, against real QEMU: the three oracles of the issue.

Every acknowledged write reads back from the survivor; the client connection
opened before the fault keeps working without a reset; the two hosts never put
the VM's frames on the LAN at the same time (frame counters of both taps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coloft.agent.pair import Pair, supervise
from coloft.core.argv import tap_name
from coloft.lab import faults, net, workload
from coloft.lab.oracle import FrameWatch
from coloft.model.spec import PairSpec
from tests.integration.conftest import lab_spec, run_scenario, up_and_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LOAD_S = 24.0
FAULT_AFTER_S = 8.0


def run_fault(
    make_pair: Callable[[PairSpec], Pair], tmp_path: Path, fault: str
) -> tuple[Pair, dict[str, Any], dict[str, Any], FrameWatch, float]:
    spec = lab_spec(interval_ms=2000)
    pair = make_pair(spec)
    watch = FrameWatch({n.name: n.netns or "" for n in spec.nodes}, tap_name(spec))

    async def scenario() -> tuple[dict[str, Any], float]:
        await up_and_ready(pair)
        watch.start()
        client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, LOAD_S)
        stop = asyncio.Event()
        fault_at = 0.0

        async def inject() -> None:
            nonlocal fault_at
            await asyncio.sleep(FAULT_AFTER_S)
            assert (await pair.observe()).protected, "pair not protected before the fault"
            fault_at = faults.inject(pair, fault)
            await asyncio.to_thread(client.wait, LOAD_S + 30)
            stop.set()

        injector = asyncio.create_task(inject())
        await supervise(pair, stop)
        await injector
        watch.stop()
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, "192.0.2.10:7000", tmp_path / "acked.jsonl"
        )
        return checked, fault_at

    try:
        checked, fault_at = run_scenario(pair, scenario)
    finally:
        watch.stop()
    return pair, workload.read_result(tmp_path), checked, watch, fault_at


def assert_oracles(result: dict[str, Any], checked: dict[str, Any], watch: FrameWatch) -> None:
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
    assert result["acked_writes"] > 100, result
    assert result["requests_failed"] == 0, result["errors"]
    assert result["reconnects"] == 0, "the client connection was reset"
    assert watch.overlap_ms() == 0.0, "both hosts sent the VM's frames at once"


@pytest.mark.parametrize(
    ("fault", "survivor", "action"),
    [
        ("kill-primary", "b", "secondary-takes-over"),
        ("kill-secondary", "a", "primary-continues-alone"),
    ],
)
def test_sigkill_under_load(
    make_pair: Callable[[PairSpec], Pair], tmp_path: Path, fault: str, survivor: str, action: str
) -> None:
    pair, result, checked, watch, fault_at = run_fault(make_pair, tmp_path, fault)
    assert len(pair.failovers) == 1, pair.failovers
    record = pair.failovers[0]
    assert (record.action, record.survivor, record.error) == (action, survivor, None)
    detected_ms = (record.detected_at - fault_at) * 1000
    assert detected_ms < 150, f"process death detected after {detected_ms:.0f} ms"
    assert_oracles(result, checked, watch)
    # The survivor served the second part of the run: its tap carried frames.
    assert watch.frames(survivor) > 0
    assert result["max_reply_gap_ms"] < 3000, result["max_reply_gap_ms"]


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
