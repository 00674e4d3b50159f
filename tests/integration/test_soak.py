"""Soak: a protected pair under client load for 10 minutes, run by its agents.

Besides no failed request and no lost write, this is where a too-eager detector
shows: 150 ms heartbeats between agents on a busy 2-core host must not fire once,
the probe through colo-compare (350 ms budget) must never miss, and protection
must hold the whole time, checkpoints every 2 s. The leader's own protection
events catch a flap shorter than this test's polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coloft.agent.launch import LocalPair
from coloft.lab import net, workload
from coloft.lab.rounds import Watcher, up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SOAK_S = 600.0
INTERVAL_MS = 2000


def test_soak_ten_minutes_under_load_stays_protected(
    make_pair: Callable[[PairSpec], LocalPair], tmp_path: Path
) -> None:
    pair = make_pair(lab_spec(interval_ms=INTERVAL_MS))
    asyncio.run(up_and_serving(pair))
    watcher = Watcher(pair)
    qmp_ms: list[float] = []
    problems: list[str] = []
    first = watcher.poll()
    start_count = first["checkpoints"]["count"]
    soak_start = time.time()
    client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, SOAK_S)
    end = time.monotonic() + SOAK_S
    view = first
    while time.monotonic() < end:
        view = watcher.poll()
        a = watcher.last["a"]
        if a is None or a["qemu"].get("qmp_ms") is None:
            problems.append("primary agent or its QMP did not answer")
        else:
            qmp_ms.append(a["qemu"]["qmp_ms"])
        if not view["protected"]:
            problems.append(f"{view['phase']}: {view['reason']}")
        time.sleep(0.5)
    client.wait(60)
    checked = workload.verify(net.CLIENT_NS, "192.0.2.10:7000", tmp_path / "acked.jsonl")
    result = workload.read_result(tmp_path)
    events = watcher.events()
    detections = [e["text"] for e in events if e["kind"] == "detected"]
    assert not detections, detections
    flaps = [
        e["text"]
        for e in events
        if e["kind"] == "protection" and e.get("code") and e["unix"] > soak_start
    ]
    assert not flaps, flaps[:10]
    assert not problems, problems[:10]
    checkpoints = view["checkpoints"]["count"] - start_count
    assert checkpoints >= SOAK_S / 3, f"only {checkpoints} checkpoints in {SOAK_S:.0f} s"
    assert max(qmp_ms) < 1000.0, f"primary QMP answered in {max(qmp_ms):.0f} ms at worst"
    assert result["requests_failed"] == 0, result.get("errors")
    assert result["acked_writes"] > 100, result
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
