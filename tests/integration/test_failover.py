"""Failover under client load with real agents, real etcd and real QEMU.

Three oracles on every round: every acknowledged write reads back from the
survivor; the client connection opened before the fault keeps working without
a reset; the two hosts never put the VM's frames on the LAN at the same time
(frame counters of both taps).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coloft.agent.daemon import POLL_S
from coloft.agent.launch import LocalPair
from coloft.effects.local_qemu import HUNG_AFTER_S, OOB_PROBE_S
from coloft.lab import faults
from coloft.lab.rounds import FaultRound, fault_round
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from tests.integration.test_cli import coloft

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MakePair = Callable[[PairSpec], LocalPair]
# The first unanswered question comes up to a poll period after the stop; the silence
# limit is judged at the next poll past it; then the out-of-band probe; and slack for
# a busy 2-core host.
STOP_DETECT_MS = (POLL_S + HUNG_AFTER_S + POLL_S + OOB_PROBE_S) * 1000 + 300
# The client's TCP retransmission backs off (0.2, 0.4, 0.8 s ...): after an outage of
# d its next try comes up to about d later.
STOP_GAP_MS = 2 * STOP_DETECT_MS + 500
# The heartbeat timeout plus a little scheduling slack on a busy 2-core host.
HEARD_GONE_MS = 150 + 50
# Lease TTL 2 s, etcd's 0.5 s expiry check, then acquisition and takeover.
LEASE_BOUND_MS = (2.0 + 1.0) * 1000


def assert_oracles(found: FaultRound) -> None:
    result, checked = found.result, found.checked
    assert found.lost_acked_writes == 0, checked
    assert result["acked_writes"] > 100, result
    assert result["requests_failed"] == 0, result["errors"]
    assert result["reconnects"] == 0, "the client connection was reset"
    assert found.overlap_ms == 0.0, "both hosts sent the VM's frames at once"


@pytest.mark.parametrize(
    ("fault", "survivor", "action", "detect_within_ms", "gap_within_ms"),
    [
        ("kill-primary", "b", "secondary-takes-over", 150, 1000),
        ("kill-secondary", "a", "primary-continues-alone", 150, 1000),
        ("kill-primary-in-checkpoint", "b", "secondary-takes-over", 150, 1000),
        # A stopped QEMU is found by its QMP silence, then fenced (killed).
        ("stop-primary", "b", "secondary-takes-over", STOP_DETECT_MS, STOP_GAP_MS),
        ("stop-secondary", "a", "primary-continues-alone", STOP_DETECT_MS, STOP_GAP_MS),
        # A dead agent takes its QEMU along; the peer hears no heartbeat for 150 ms
        # (3 x 50 ms, counted from the last one that came), then notices.
        ("kill-primary-agent", "b", "secondary-takes-over", HEARD_GONE_MS, LEASE_BOUND_MS + 1000),
        ("kill-secondary-agent", "a", "primary-continues-alone", HEARD_GONE_MS, 1000),
        # Cut off from peer and witness: it fences itself before its lease can end,
        # and the secondary takes over once it has.
        ("isolate-primary", "b", "secondary-takes-over", HEARD_GONE_MS, LEASE_BOUND_MS + 1000),
        # Only the replication link: the leader keeps its lease and runs alone.
        ("cut-replication", "a", "primary-continues-alone", HEARD_GONE_MS, 1500),
        ("planned-failover", "b", "secondary-takes-over", 50, 1000),
    ],
)
def test_fault_under_load(
    make_pair: MakePair,
    tmp_path: Path,
    fault: str,
    survivor: str,
    action: str,
    detect_within_ms: float,
    gap_within_ms: float,
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000, reprotect=False))
    found = asyncio.run(fault_round(pair, fault, tmp_path, load_s=15.0, fault_after_s=5.0))
    record = found.failover
    assert record is not None, [e["text"] for e in found.events]
    assert (record["action"], record["survivor"], record["error"]) == (action, survivor, None)
    if fault != "planned-failover":
        assert found.detected_ms is not None, "no detection event"
        assert found.detected_ms < detect_within_ms, f"detected after {found.detected_ms:.0f} ms"
    assert_oracles(found)
    # The survivor served the second part of the run: its tap carried frames.
    assert found.frames[survivor] > 0
    assert found.result["max_reply_gap_ms"] < gap_within_ms, found.result["max_reply_gap_ms"]
    # Exactly one leader at the end, the survivor, running alone.
    nodes = {n["node"]: n["state"] for n in found.final["nodes"]}
    assert nodes[survivor] == "alone", nodes
    assert found.final["leader"] == survivor
    assert not found.final["protected"] and found.final["phase"] == "unprotected"


def test_restarted_agent_does_not_disturb_the_leader(make_pair: MakePair, tmp_path: Path) -> None:
    """A secondary's agent that dies and comes back finds a leader and stays out of its way."""
    pair = make_pair(lab_spec(interval_ms=2000, reprotect=False))
    found = asyncio.run(fault_round(pair, "kill-secondary-agent", tmp_path, load_s=10.0))
    assert found.failover is not None and found.failover["survivor"] == "a"
    epoch = found.final["epoch"]
    pair.start_agent("b")
    views = pair.wait_for(
        lambda s: s["b"] is not None and s["b"]["state"] == "down", 30, "restarted agent down"
    )
    b, a = views["b"], views["a"]
    assert b is not None and a is not None
    assert "a leads" in b["reason"] and b["qemu"]["pid"] is None, b["reason"]
    assert (a["state"], a["epoch"]) == ("alone", epoch), a


def test_unsynced_secondary_refuses_until_forced(make_pair: MakePair) -> None:
    """Before the first checkpoint the secondary has no state to serve: a planned
    failover is refused, a lost primary is not replaced, and only --force overrides."""
    # No checkpoint at COLO start: the secondary stays unproven for a minute.
    pair = make_pair(lab_spec(interval_ms=60_000, reprotect=False, checkpoint_at_start=False))
    pair.start()
    pair.wait_for(
        lambda s: all(v and v["state"] in ("primary", "secondary") for v in s.values()),
        240,
        "bring-up",
    )
    spec = str(pair.spec.source)
    planned = coloft("failover", spec)
    assert planned.returncode == 1
    assert "failover refused" in planned.stdout and "--force" in planned.stdout, planned.stdout
    faults.inject(pair, "kill-primary")
    time.sleep(3.0)  # longer than a lease: nothing may happen
    b = pair.status("b")
    assert b is not None and b["state"] == "secondary", b
    assert "may not take over" in b["reason"] and "checkpoint completed=False" in b["reason"]
    unforced = coloft("failover", spec)
    assert unforced.returncode != 0 and "--force" in unforced.stderr, unforced.stderr
    forced = coloft("failover", spec, "--force", "--accept-data-loss")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    views = pair.wait_for(lambda s: (s["b"] or {}).get("state") == "alone", 10, "forced takeover")
    taken = views["b"]
    assert taken is not None
    assert taken["failover"]["error"] is None, taken["failover"]
