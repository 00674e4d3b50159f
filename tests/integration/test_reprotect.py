"""Continuous fault tolerance: after a failover the failed side comes back as a new
secondary, disk and memory are copied from the running primary, and the pair is
PROTECTED again, with real agents, real etcd and real QEMU under client load.

The oracles of the failover suite hold across every round: no acknowledged write
lost, the client's connection never reset, never two hosts sending the VM's frames.
The operator's switch (protect/unprotect) and the switchover drill run here too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.core import failover
from coloft.core.argv import tap_name
from coloft.effects.process import netns_argv
from coloft.lab import faults, net, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.rounds import up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view
from tests.integration.test_cli import coloft
from tests.openapi_check import exercise

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MakePair = Callable[[PairSpec], LocalPair]
TARGET = "192.0.2.10:7000"
Statuses = dict[str, dict[str, Any] | None]


def protected_by(leader: str) -> Callable[[Statuses], bool]:
    """PROTECTED with `leader` primary and its peer named the sync node."""

    def check(s: Statuses) -> bool:
        v, me = pair_view("demo", s), s.get(leader)
        return bool(v["protected"] and v["leader"] == leader and me and me["sync"] is not None)

    return check


def kill_qemu(pair: LocalPair, node: str) -> None:
    s = pair.status(node)
    assert s is not None and s["qemu"]["pid"] is not None, s
    os.kill(int(s["qemu"]["pid"]), signal.SIGKILL)


def acked_between(out: Path, start: float, end: float) -> int:
    lines = (out / "acked.jsonl").read_text().splitlines()
    return sum(1 for ln in lines if start <= json.loads(ln)["t"] <= end)


def check_client(out: Path, client: Any, watch: FrameWatch) -> dict[str, Any]:
    client.wait(120)
    result = workload.read_result(out)
    checked = workload.verify(net.CLIENT_NS, TARGET, out / "acked.jsonl")
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
    assert result["requests_failed"] == 0, result["errors"]
    assert result["reconnects"] == 0, "the client connection was reset"
    assert watch.overlap_ms() == 0.0, "both hosts sent the VM's frames at once"
    return result


def scrape(pair: LocalPair, node: str) -> dict[tuple[str, str], float]:
    """GET /metrics from inside the node's namespace; samples keyed by name and the
    one label that tells them apart (action, result or state)."""
    n = pair.spec.node(node)
    url = f"http://{n.replication_address}:{pair.spec.metrics_port}/metrics"
    code = (
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    done = subprocess.run(
        netns_argv(n.netns, [sys.executable, "-c", code, url]), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(done.stdout):
        for s in family.samples:
            tag = s.labels.get("action") or s.labels.get("result") or s.labels.get("state") or ""
            samples[(s.name, tag)] = samples.get((s.name, tag), 0.0) + s.value
    return samples


def start_load(pair: LocalPair, out: Path, duration: float) -> tuple[Any, FrameWatch]:
    watch = FrameWatch({n.name: n.netns or "" for n in pair.spec.nodes}, tap_name(pair.spec))
    watch.start()
    return workload.start_workload(net.CLIENT_NS, TARGET, out, duration, rate=50), watch


def test_failover_reprotect_and_failover_back(make_pair: MakePair, tmp_path: Path) -> None:
    """a dies: b takes over and re-protects with a fresh copy on a; then b dies: a takes
    over. Writes acknowledged during the resync are there after the second failover,
    and one client connection lives through both."""
    pair = make_pair(lab_spec(interval_ms=2000))
    began = time.time()
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 40)
    try:
        time.sleep(4)
        kill_qemu(pair, "a")
        views = pair.wait_for(protected_by("b"), 60, "b protected again with a")
        b = views["b"]
        assert b is not None
        first = b["reprotect"]
        assert first["error"] is None and first["secondary"] == "a", first
        assert (views["a"] or {})["state"] == "secondary", views["a"]
        assert first["disk_bytes"] >= 96 << 20, first
        time.sleep(4)
        kill_qemu(pair, "b")
        views = pair.wait_for(protected_by("a"), 60, "a protected again with b")
        a = views["a"]
        assert a is not None
        assert a["failover"]["action"] == "secondary-takes-over", a["failover"]
        assert a["reprotect"]["error"] is None and a["reprotect"]["secondary"] == "b"
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)
    # The resync ran under load: what was acknowledged meanwhile survived b's death.
    assert acked_between(tmp_path, first["started_unix"], first["colo_unix"]) > 0, first
    assert watch.frames("a") > 0 and watch.frames("b") > 0
    # `coloft events`: both agents' journals, oldest first, with every takeover step
    # in the order it ran.
    done = coloft("events", "--pair", "demo", "--since", repr(began))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["unix"] for e in events] == sorted(e["unix"] for e in events)
    for node in ("b", "a"):
        ran = [
            e["text"].rsplit(" (", 1)[0]
            for e in events
            if e["node"] == node and e["kind"] == "step"
        ]
        expected = [step.describe() for step in failover.secondary_takeover(node)]
        assert ran[: len(expected)] == expected, ran
    kinds = {e["kind"] for e in events}
    assert {"state", "lease", "failover", "reprotect", "protection", "sync"} <= kinds, kinds
    # Each agent's Prometheus endpoint (on its replication address), parsed by the
    # Prometheus client's own parser: both failovers, the re-protections, the time
    # each leader ran unprotected.
    for node in ("a", "b"):
        found = scrape(pair, node)
        took_over = found[("coloft_failovers_total", "secondary-takes-over")]
        assert took_over == 1, (node, found)
        assert found[("coloft_reprotections_total", "in-colo")] >= 1, (node, found)
        assert found[("coloft_unprotected_seconds_total", "")] > 0, (node, found)
        assert found[("coloft_agent_state", "primary" if node == "a" else "secondary")] == 1


def test_a_restarted_host_is_taken_back_in(make_pair: MakePair, tmp_path: Path) -> None:
    """The primary's agent dies with its QEMU (a host crash); once it runs again it
    joins the survivor as the new secondary."""
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 25)
    try:
        time.sleep(3)
        faults.inject(pair, "kill-primary-agent")
        pair.wait_for(lambda s: (s["b"] or {}).get("state") == "alone", 20, "b alone")
        time.sleep(1)
        assert not pair_view("demo", pair.statuses())["protected"]
        pair.start_agent("a")
        views = pair.wait_for(protected_by("b"), 60, "b protected again with a")
        a = views["a"]
        assert a is not None and "joining as its new secondary" in " ".join(
            e["text"] for e in a["events"]
        )
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)


def test_a_spare_node_replaces_a_host_that_does_not_come_back(
    make_pair: MakePair, tmp_path: Path
) -> None:
    """b's host dies (agent and QEMU) and stays down: after spare_after_s the primary
    takes the spare c in as its new secondary and is PROTECTED with it; then a's QEMU
    dies and c takes over, with a rejoining as c's secondary. b's agent, back, stands
    by as the spare. Then a's disk goes: it fails to start twice and c takes b in.
    No acknowledged write lost, one client connection throughout."""
    pair = make_pair(lab_spec(interval_ms=2000, spare_after_s=3))
    asyncio.run(up_and_serving(pair))
    assert (pair.status("c") or {}).get("state") == "spare"
    client, watch = start_load(pair, tmp_path, 60)
    try:
        time.sleep(3)
        lost = faults.inject(pair, "kill-secondary-agent")
        views = pair.wait_for(
            lambda s: protected_by("a")(s) and (s["a"] or {})["members"] == ["a", "c"],
            90,
            "a protected with the spare c",
        )
        a = views["a"]
        assert a is not None and a["members"] == ["a", "c"] and a["sync"] == "c", a
        assert a["reprotect"]["secondary"] == "c" and a["reprotect"]["error"] is None
        taken = [e for e in a["events"] if "taking the spare c in" in e["text"]]
        # Silence counts from b's last heartbeat, up to one interval before the kill.
        beat_s = pair.spec.heartbeat.interval_ms / 1000
        assert taken and taken[0]["unix"] - lost >= 3 - beat_s, (lost, taken)
        time.sleep(4)
        kill_qemu(pair, "a")
        views = pair.wait_for(
            lambda s: protected_by("c")(s) and (s["c"] or {})["sync"] == "a",
            90,
            "c protected with a",
        )
        c = views["c"]
        assert c is not None and c["failover"]["action"] == "secondary-takes-over"
        assert c["reprotect"]["secondary"] == "a", c["reprotect"]
        pair.start_agent("b")
        views = pair.wait_for(lambda s: (s["b"] or {}).get("state") == "spare", 30, "b standing by")
        b = views["b"]
        assert b is not None and b["members"] == ["a", "c"] and b["qemu"]["pid"] is None, b
        # a's storage goes: its agent is heard but cannot start a QEMU, so c does not
        # wait for it to go quiet and takes the spare b after two failed starts.
        pair.spec.disk_of(pair.spec.node("a")).unlink()
        kill_qemu(pair, "a")
        views = pair.wait_for(
            lambda s: (
                protected_by("c")(s)
                and (s["c"] or {})["members"] == ["c", "b"]
                and (s["a"] or {}).get("state") == "spare"
            ),
            120,
            "c protected with the spare b, a standing by",
        )
        c = views["c"]
        assert c is not None and c["sync"] == "b", c
        assert any("a failed its last 2 starts" in e["text"] for e in c["events"]), c["events"]
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)
    assert watch.frames("a") > 0 and watch.frames("c") > 0


def test_a_primary_lost_during_the_first_bring_up_starts_over(
    make_pair: MakePair, tmp_path: Path
) -> None:
    """Its QEMU dies while it brings the pair up: after its backoff the agent starts
    over as a restarted agent would (the guest never served, its disk is the source),
    with no operator and no agent restart."""
    pair = make_pair(lab_spec(interval_ms=2000))
    pair.start()
    pair.wait_for(
        lambda s: bool(
            (s["a"] or {}).get("state") == "starting"
            and ((s["a"] or {}).get("qemu") or {}).get("pid")
        ),
        120,
        "a's QEMU launched",
    )
    kill_qemu(pair, "a")
    views = pair.wait_for(protected_by("a"), 240, "a protected after starting over")
    a = views["a"]
    assert a is not None
    assert "my bring-up failed and nobody leads" in " ".join(e["text"] for e in a["events"])


def test_after_a_survivor_ran_alone_the_pair_restarts_from_the_survivors_disk(
    make_pair: MakePair, tmp_path: Path
) -> None:
    """b took over and served alone, then both agents stopped: nobody leads, and a is
    the spec's primary, but a's disk lacks what b acknowledged. The pair comes back
    with b primary (it led last) and a as the secondary whose disk is overwritten;
    every write acknowledged while b ran alone reads back."""
    pair = make_pair(lab_spec(interval_ms=2000, reprotect=False))
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 12)
    try:
        time.sleep(3)
        kill_qemu(pair, "a")
        pair.wait_for(lambda s: (s["b"] or {}).get("state") == "alone", 20, "b alone")
    finally:
        watch.stop()
    alone = check_client(tmp_path, client, watch)
    assert alone["acked_writes"] > 100, alone
    for node in ("a", "b"):
        pair.signal_agent(node, signal.SIGTERM)
    for proc in pair.agents.values():
        proc.wait(30)
    for node in ("a", "b"):
        pair.start_agent(node)
    views = pair.wait_for(protected_by("b"), 240, "the pair back with b primary")
    a, b = views["a"], views["b"]
    assert a is not None and b is not None
    said_b = " ".join(e["text"] for e in b["events"])
    assert "b led last and its disk is the current copy: starting as primary" in said_b, said_b
    # a either saw nobody leading (and b named as the source) or b already bringing it up.
    said_a = " ".join(e["text"] for e in a["events"])
    assert "starting as secondary" in said_a or "joining as secondary" in said_a, said_a
    checked = workload.verify(net.CLIENT_NS, TARGET, tmp_path / "acked.jsonl")
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked


def test_a_secondary_lost_during_the_resync_is_dropped_and_retried(
    make_pair: MakePair, tmp_path: Path
) -> None:
    """The new secondary dies as soon as the primary starts bringing it in: the primary
    drops the attempt (undone from wherever it got, or, if COLO had just begun, by
    running alone) without a failed request, and re-protects once that host offers
    itself again."""
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 40)
    sock = api.socket_path(pair.spec, "a")
    try:
        time.sleep(3)
        kill_qemu(pair, "b")  # a runs alone, b's agent rejoins with a fresh QEMU
        killed_at, end = time.time(), time.monotonic() + 60
        while True:
            a = api.call(sock, "GET", "/status")
            if a["protection_code"] == "reprotecting":
                break
            r = a["reprotect"] or {}
            if r.get("started_unix", 0.0) > killed_at and r.get("colo_unix"):
                # That attempt was over between two looks: lose b again, catch the next.
                kill_qemu(pair, "b")
                killed_at = time.time()
            assert time.monotonic() < end, f"no re-protection caught: {a['reason']}"
            time.sleep(0.005)
        lost_at = time.time()
        kill_qemu(pair, "b")
        views = pair.wait_for(protected_by("a"), 90, "a protected again with b")
        a = views["a"]
        assert a is not None
        after = [e for e in a["events"] if e["unix"] >= lost_at]
        texts = [e["text"] for e in after]
        dropped = any("the guest runs on alone" in t for t in texts) or any(
            e["kind"] == "failover" and "primary-continues-alone" in e["text"] for e in after
        )
        assert dropped, texts
        # The attempt that succeeded is a later one.
        assert a["reprotect"]["error"] is None and a["reprotect"]["started_unix"] > lost_at
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)


def _fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return fds, rss


def test_alternating_failover_and_reprotect_rounds(make_pair: MakePair, tmp_path: Path) -> None:
    """20 rounds of: kill the primary's QEMU, fail over, re-protect. The agents' file
    descriptors and memory stay flat; no acknowledged write is lost."""
    rounds = 20
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 600)
    usage: list[dict[str, tuple[int, int]]] = []
    leader = "a"
    try:
        for _ in range(rounds):
            kill_qemu(pair, leader)
            leader = "b" if leader == "a" else "a"
            pair.wait_for(protected_by(leader), 60, f"{leader} protected again")
            usage.append({n: _fds_and_rss(p.pid) for n, p in pair.agents.items()})
    finally:
        watch.stop()
        client.send_signal(signal.SIGTERM)  # it writes its result and exits
    check_client(tmp_path, client, watch)
    for node in pair.agents:
        fds = [u[node][0] for u in usage]
        rss = [u[node][1] for u in usage]
        # After warm-up (round 3), nothing may keep growing with the rounds.
        assert max(fds[2:]) - fds[2] <= 4, (node, fds)
        assert max(rss[2:]) - rss[2] <= 16 << 20, (node, rss)


def test_protection_switched_off_and_on_under_load(make_pair: MakePair, tmp_path: Path) -> None:
    """`coloft unprotect` drops the secondary with no failover and no failed request,
    and the pair stays alone (the switch lives in etcd); `coloft protect` brings
    the secondary back in."""
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    spec = str(pair.spec.source)
    client, watch = start_load(pair, tmp_path, 30)
    try:
        time.sleep(3)
        off = coloft("unprotect", spec, "--json")
        assert off.returncode == 0, off.stdout + off.stderr
        assert json.loads(off.stdout)["protection"] == "off"
        time.sleep(4)  # longer than any re-protection: none may start
        views = pair.statuses()
        a, b = views["a"], views["b"]
        assert a is not None and b is not None
        assert (a["state"], a["protection_code"], a["failover"]["action"]) == (
            "alone",
            "protection-off",
            "primary-continues-alone",
        )
        assert a["reprotect"] is None and b["state"] == "down", (a["reprotect"], b["state"])
        on = coloft("protect", spec, "--json", timeout=200)
        assert on.returncode == 0, on.stdout + on.stderr
        assert json.loads(on.stdout)["protected"] is True
        assert pair_view("demo", pair.statuses())["leader"] == "a"
        # The OpenAPI document against both running agents: every operation, every
        # answer checked against its schema (the secondary may not switch: 409).
        seen_a = exercise(api.socket_path(pair.spec, "a"))
        seen_b = exercise(api.socket_path(pair.spec, "b"))
        assert (seen_a["GET /protected"], seen_b["GET /protected"]) == (200, 503)
        assert (seen_a["POST /protection"], seen_b["POST /protection"]) == (200, 409)
        assert seen_a["POST /failover"] == 400
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)


def test_drill_switches_over_there_and_back_under_load(make_pair: MakePair, tmp_path: Path) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client, watch = start_load(pair, tmp_path, 30)
    try:
        time.sleep(3)
        done = coloft("drill", str(pair.spec.source), "--json", timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        legs = [(leg["from"], leg["to"]) for leg in report["legs"]]
        assert report["ok"] and legs == [("a", "b"), ("b", "a")], report
        for leg in report["legs"]:
            assert leg["protected_again_ms"] is not None and leg["synced_bytes"] > 0, leg
        assert protected_by("a")(pair.statuses())
    finally:
        watch.stop()
    check_client(tmp_path, client, watch)
