"""`coloft demo --pairs N`: N protected pairs around the lab's hosts, one agent per
host running every pair placed on it, client load on each pair, optionally one host
killed (its agent SIGKILLed: its QEMUs die with it, as when a host loses power).

Every pair that had its primary on the killed host must fail over, every pair that
had its secondary there must go on alone, every other pair must stay PROTECTED and
see no failover; no pair may lose an acknowledged write. The metrics of each
surviving agent are scraped and parsed with the Prometheus client's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from coloft.agent import api
from coloft.agent.launch import LocalFleet
from coloft.lab import net, setup, workload
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view

TICK_S = 0.5
PROTECT_WITHIN_S = 420.0
CLIENT_RATE = 10.0


def scrape(spec: PairSpec, node: str) -> str:
    """GET /metrics from the node's own namespace, as a Prometheus server there would."""
    n = spec.node(node)
    url = f"http://{n.replication_address}:{spec.metrics_port}/metrics"
    code = (
        "import sys, urllib.request; "
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    argv = ["ip", "netns", "exec", n.netns or "", sys.executable, "-c", code, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"GET {url} from {node}: {done.stderr.strip()[-300:]}")
    return done.stdout


def failovers_by_pair(text: str) -> dict[str, dict[str, float]]:
    """coloft_failovers_total per pair and action; raises ValueError on a malformed text."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "coloft_failovers_total" and s.value:
                actions = found.setdefault(s.labels["pair"], {})
                actions[s.labels["action"]] = actions.get(s.labels["action"], 0.0) + s.value
    return found


def check_metrics(
    specs: list[PairSpec], alive: list[str], expected: dict[str, str]
) -> dict[str, Any]:
    """Each surviving host's endpoint parses cleanly; together they count the expected
    failover action for every pair the dead host had a part in, and none for the others."""
    counted: dict[str, dict[str, float]] = {}
    errors = []
    for host in alive:
        spec = next((s for s in specs if host in {n.name for n in s.nodes}), None)
        if spec is None or not spec.metrics_port:
            continue
        try:
            for pair, actions in failovers_by_pair(scrape(spec, host)).items():
                for action, n in actions.items():
                    mine = counted.setdefault(pair, {})
                    mine[action] = mine.get(action, 0.0) + n
        except (RuntimeError, ValueError) as e:
            errors.append(f"{host}: {e}")
    for s in specs:
        got = sorted(counted.get(s.vm.name, {}))
        want = [expected[s.vm.name]] if s.vm.name in expected else []
        if got != want:
            errors.append(f"{s.vm.name}: failovers counted {got}, expected {want}")
    return {"ok": not errors, "errors": errors, "failovers": counted}


def _target(spec: PairSpec) -> str:
    assert spec.vm.service is not None  # the lab's specs name their service
    return "{}:{}".format(*spec.vm.service)


def _views(fleet: LocalFleet) -> dict[str, dict[str, Any]]:
    return {s.vm.name: pair_view(s.vm.name, fleet.statuses_of(s)) for s in fleet.specs}


async def run_fleet_demo(
    pairs: int, duration: float, interval_ms: int, fault: str | None
) -> dict[str, Any]:
    if fault not in (None, "kill-host"):
        raise ValueError(f"with --pairs the fault is kill-host, not {fault}")
    setup.lab_up(fresh_disks=True)
    hosts = ("a", "b", "c") if pairs >= 3 else ("a", "b")
    specs = setup.fleet_specs(pairs, hosts, interval_ms)
    setup.reset_fleet_disks(specs)
    fleet = LocalFleet(specs, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="coloft-fleet-"))
    clients: dict[str, subprocess.Popen[bytes]] = {}
    victim = specs[0].primary.name
    fault_at = None
    try:
        fleet.start()  # from this thread: the agents die with it
        end = time.monotonic() + PROTECT_WITHIN_S
        views = _views(fleet)
        while not all(v["protected"] for v in views.values()):
            if time.monotonic() > end:
                raise TimeoutError(
                    "not every pair PROTECTED: "
                    + "; ".join(f"{k}: {v['reason']}" for k, v in views.items())
                )
            await asyncio.sleep(TICK_S)
            views = await asyncio.to_thread(_views, fleet)
        for s in specs:
            target = _target(s)
            clients[s.vm.name] = workload.start_workload(
                net.CLIENT_NS, target, out / s.vm.name, duration, rate=CLIENT_RATE
            )
        started = time.monotonic()
        seen_unprotected: set[str] = set()
        while any(c.poll() is None for c in clients.values()):
            views = await asyncio.to_thread(_views, fleet)
            seen_unprotected |= {k for k, v in views.items() if not v["protected"]}
            if fault and fault_at is None and time.monotonic() - started >= duration * 0.4:
                fault_at = time.time()
                fleet.signal_agent(victim, signal.SIGKILL)
            await asyncio.sleep(TICK_S)
        views = await asyncio.to_thread(_views, fleet)
        placed = {s.vm.name: (s.primary.name, s.secondary.name) for s in specs}
        expected = {}
        for k, (p, sec) in placed.items():
            if fault and victim == p:
                expected[k] = "secondary-takes-over"
            elif fault and victim == sec:
                expected[k] = "primary-continues-alone"
        alive = [h for h in fleet.nodes() if h != victim or not fault]
        metrics = await asyncio.to_thread(check_metrics, specs, alive, expected)
        rows = []
        for s in specs:
            name = s.vm.name
            result = workload.stop_workload(clients[name], out / name)
            target = _target(s)
            checked = await asyncio.to_thread(
                workload.verify, net.CLIENT_NS, target, out / name / "acked.jsonl"
            )
            v = views[name]
            primary, secondary = placed[name]
            rows.append(
                {
                    "name": name,
                    "hosts": [primary, secondary],
                    "state": "PROTECTED" if v["protected"] else v["phase"],
                    "leader": v["leader"],
                    "affected": bool(fault) and victim in (primary, secondary),
                    "ever_unprotected": name in seen_unprotected,
                    "gap_ms": result.get("max_reply_gap_ms"),
                    "requests_ok": result.get("requests_ok"),
                    "requests_failed": result.get("requests_failed"),
                    "connection_resets": result.get("reconnects"),
                    "lost_acked_writes": int(checked.get("lost_acked_writes", 0))
                    + int(checked.get("wrong_values", 0)),
                }
            )
        return {
            "pairs": rows,
            "killed_host": victim if fault else None,
            "metrics_ok": metrics["ok"],
            "metrics_errors": metrics["errors"],
            "duration_s": round(time.monotonic() - started, 1),
        }
    finally:
        for c in clients.values():
            if c.poll() is None:
                c.kill()
                c.wait()
        await asyncio.to_thread(fleet.stop)
        for s in specs:
            shutil.rmtree(api.run_root(s), ignore_errors=True)
        with contextlib.suppress(Exception):
            net.lab_down()
        shutil.rmtree(out, ignore_errors=True)
