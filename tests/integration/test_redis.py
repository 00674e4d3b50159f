"""A real server in the protected VM, real clients through failover: Debian's Redis in
the guest (examples/guests/redis.toml, append-only file fsynced on the replicated
disk), Debian's redis-benchmark and redis-cli in the client namespace. Nothing of
ours speaks Redis: the clients' own reports and a redis-cli read-back decide.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from coloft.lab import faults, net
from coloft.lab.redis_load import RedisRun
from coloft.lab.rounds import up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.status import pair_view
from tests.integration.test_cli import assert_keys, coloft, demo_summary
from tests.integration.test_reprotect import MakePair, protected_by

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_redis_through_a_switchover_and_a_dropped_mirror(
    make_pair: MakePair, tmp_path: Path
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000, guest="redis"))
    asyncio.run(up_and_serving(pair))
    pair.wait_for(protected_by("a"), 60, "protection before the load")
    run = RedisRun(net.CLIENT_NS, "192.0.2.10", 6379)
    run.start()
    try:
        time.sleep(3)
        moved = time.time()
        done = coloft("switchover", str(pair.spec.source), "--json", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        pair.wait_for(protected_by("b"), 120, "protection after the switchover")
        time.sleep(2)
        dropped = faults.inject(pair, "drop-mirror")
        reason = ""
        while time.time() - dropped < 5 and "mirror" not in reason:
            view = pair_view("demo", pair.statuses())
            reason = "" if view["protected"] else str(view["reason"])
            time.sleep(0.05)
        assert "mirror" in reason, f"the dropped mirror channel was not named: {reason!r}"
        time.sleep(3)
        faults.heal(pair)
        pair.wait_for(protected_by("b"), 60, "protection after the mirror came back")
        healed = time.time()
        time.sleep(2)
    except BaseException:
        run.kill()
        raise
    result = run.finish()
    assert result["errors"] == 0 and result["resets"] == 0, result["error_lines"]
    assert result["lost_acked_writes"] == 0, result
    # redis-benchmark ran back to back from before the switchover to after the mirror
    # came back, and every run finished cleanly.
    spans = [(r["start"], r["end"]) for r in run.bench.runs]
    assert spans[0][0] < moved and spans[-1][1] > healed, spans
    assert all(b - a < 1.0 for (_, a), (b, _) in itertools.pairwise(spans)), spans
    assert result["requests"] > 0 and result["acked_writes"] > 0, result


def test_redis_clients_see_no_error_across_a_primary_kill(lab: None) -> None:
    """The acceptance contract: `coloft demo --workload redis --fault kill-primary` (last
    here: the demo takes the lab down when it ends)."""
    summary, done = demo_summary(
        "--workload", "redis", "--fault", "kill-primary", "--duration", "40"
    )
    w = summary["workload"]
    assert_keys(
        w,
        "name client requests errors resets latency_ms_p50 latency_ms_p99 lost_acked_writes",
    )
    assert done.returncode == 0, (summary, done.stderr[-2000:])
    assert summary["failover"]["action"] == "secondary-takes-over", summary["failover"]
    assert summary["failover"]["error"] is None, summary["failover"]
    assert (w["name"], w["client"]) == ("redis", "redis-benchmark"), w
    # A redis-benchmark run was under way at the kill and finished with no error: none
    # of its connections broke (it never reconnects, any error ends it).
    assert w["fault_inside_a_run"], w
    assert w["errors"] == 0 and w["resets"] == 0, w["error_lines"]
    assert w["requests"] > 0 and w["acked_writes"] > 0, w
    assert w["lost_acked_writes"] == 0, w
