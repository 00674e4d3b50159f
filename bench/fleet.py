"""Many pairs per host: the agent's cost per pair and the failover gap when a host
with N primaries dies.

For each N: N pairs, every primary on host a and every secondary on host b, one
agent per host running all of them. Steady state (PROTECTED, a light client on
each pair): the agents' CPU time and resident memory over --steady-s seconds.
Then host a's agent is SIGKILLed (its QEMUs die with it): the longest wait of each
pair's client for an answer is that pair's failover gap.
Goal (issue 5): agent <= 2 % of one core per 10 pairs; the gap independent of N.

Run as root after `make setup`:  .venv/bin/python bench/fleet.py --pairs 1 3 5
(5 pairs, ten TCG guests, run cleanly on the 2-CPU lab machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalFleet
from coloft.lab import net, setup, workload
from coloft.lab.workload import percentile
from coloft.model.status import pair_view

CLIENT_RATE = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def all_protected(fleet: LocalFleet) -> bool:
    return all(pair_view(s.vm.name, fleet.statuses_of(s))["protected"] for s in fleet.specs)


def one(n: int, steady_s: float, interval_ms: int) -> dict[str, Any]:
    specs = setup.fleet_specs(n, ("a", "b"), interval_ms, stacked=True)
    setup.reset_fleet_disks(specs)
    fleet = LocalFleet(specs, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="coloft-fleet-bench-"))
    clients = {}
    try:
        fleet.start()
        end = time.monotonic() + 600
        while not all_protected(fleet):
            if time.monotonic() > end:
                raise SystemExit(f"{n} pairs: not all PROTECTED within 600 s")
            time.sleep(1)
        for s in specs:
            assert s.vm.service is not None
            target = "{}:{}".format(*s.vm.service)
            clients[s.vm.name] = workload.start_workload(
                net.CLIENT_NS, target, out / s.vm.name, steady_s + 60, rate=CLIENT_RATE
            )
        time.sleep(5)
        pids = {node: p.pid for node, p in fleet.agents.items()}
        before = {node: cpu_s(pid) for node, pid in pids.items()}
        time.sleep(steady_s)
        cpu = {node: (cpu_s(pid) - before[node]) / steady_s * 100 for node, pid in pids.items()}
        rss = {node: rss_mib(pid) for node, pid in pids.items()}
        fleet.signal_agent("a", signal.SIGKILL)
        time.sleep(20)
        gaps = []
        lost = 0
        for s in specs:
            result = workload.stop_workload(clients[s.vm.name], out / s.vm.name)
            assert s.vm.service is not None
            target = "{}:{}".format(*s.vm.service)
            checked = workload.verify(net.CLIENT_NS, target, out / s.vm.name / "acked.jsonl")
            lost += int(checked["lost_acked_writes"]) + int(checked["wrong_values"])
            gaps.append(float(result["max_reply_gap_ms"] or 0.0))
        took_over = sum(
            1 for s in specs if pair_view(s.vm.name, fleet.statuses_of(s))["leader"] == "b"
        )
        return {
            "pairs": n,
            "agent_cpu_pct": {k: round(v, 2) for k, v in cpu.items()},
            "agent_cpu_pct_per_pair": round(max(cpu.values()) / n, 2),
            "agent_rss_mib": {k: round(v, 1) for k, v in rss.items()},
            "gap_ms_p50": percentile(gaps, 50),
            "gap_ms_max": max(gaps),
            "taken_over": took_over,
            "lost_acked_writes": lost,
        }
    finally:
        for c in clients.values():
            if c.poll() is None:
                c.kill()
                c.wait()
        fleet.stop()
        for s in specs:
            shutil.rmtree(api.run_root(s), ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--steady-s", type=float, default=60.0)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup.lab_up(fresh_disks=True)
    try:
        rows = [one(n, args.steady_s, args.interval_ms) for n in args.pairs]
    finally:
        net.lab_down()
    if args.json:
        print(json.dumps(rows))
        return 0
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    print(
        f"fleet, {date}, {len(os.sched_getaffinity(0))} CPUs, steady {args.steady_s:g} s, "
        f"client {CLIENT_RATE:g} req/s per pair, every primary on host a"
    )
    print(
        "| pairs | agent CPU % of a core (a / b) | per pair | agent RSS MiB (a / b) "
        "| failover gap p50 / max (ms) | taken over | lost writes |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c, m = r["agent_cpu_pct"], r["agent_rss_mib"]
        print(
            f"| {r['pairs']} | {c.get('a')} / {c.get('b')} | {r['agent_cpu_pct_per_pair']} "
            f"| {m.get('a')} / {m.get('b')} | {r['gap_ms_p50']} / {r['gap_ms_max']} "
            f"| {r['taken_over']}/{r['pairs']} | {r['lost_acked_writes']} |"
        )
    if len(rows) > 1:
        fixed, per_pair = fit([(r["pairs"], max(r["agent_cpu_pct"].values())) for r in rows])
        print(
            f"busier agent ~ {fixed:.2f} % + {per_pair:.2f} % per pair "
            f"(least squares): 10 pairs ~ {fixed + 10 * per_pair:.1f} % of a core"
        )
    return 0


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (pairs, CPU %)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


if __name__ == "__main__":
    sys.exit(main())
