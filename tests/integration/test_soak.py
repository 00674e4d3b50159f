"""Soak: a protected pair under client load for 3 minutes (the issue's acceptance bar)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coloft.agent.pair import Pair
from coloft.lab import net, workload
from coloft.lab.rounds import up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from tests.integration.conftest import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SOAK_S = 180.0
INTERVAL_MS = 2000


def test_soak_three_minutes_under_load(
    make_pair: Callable[[PairSpec], Pair], tmp_path: Path
) -> None:
    pair = make_pair(lab_spec(interval_ms=INTERVAL_MS))
    qmp_ms: list[float] = []
    problems: list[str] = []

    async def scenario() -> tuple[int, dict[str, Any]]:
        await up_and_serving(pair)
        start_count = pair.checkpoints.count
        client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, SOAK_S)
        end = time.monotonic() + SOAK_S
        while time.monotonic() < end:
            status = await pair.observe()
            primary = status.sides[0]
            if primary.error is not None or primary.qmp_ms is None:
                problems.append(f"primary QMP: {primary.error}")
            else:
                qmp_ms.append(primary.qmp_ms)
            if status.phase not in ("protected", "starting"):
                problems.append(f"{status.phase}: {status.reason}")
            await asyncio.sleep(0.5)
        await asyncio.to_thread(client.wait, 60)
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, "192.0.2.10:7000", tmp_path / "acked.jsonl"
        )
        return pair.checkpoints.count - start_count, checked

    checkpoints, checked = run_scenario(pair, scenario)
    result = workload.read_result(tmp_path)
    assert not problems, problems[:10]
    assert checkpoints >= 60, f"only {checkpoints} checkpoints in {SOAK_S:.0f} s"
    assert max(qmp_ms) < 1000.0, f"primary QMP answered in {max(qmp_ms):.0f} ms at worst"
    assert result["requests_failed"] == 0, result.get("errors")
    assert result["acked_writes"] > 100, result
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
