"""Failover: rounds of SIGKILL of the primary QEMU under client load, and rounds of
primary-host isolation (lease-bounded), with the real agents and etcd.

Per round: detection time (fault to failover decision), the client-visible gap (the
longest interval between answered requests on the connection opened before the
fault), connection resets, acknowledged writes lost, and time both hosts sent the
VM's frames at once. The unprotected VM's p99 latency in the same run is the
reference for the gap. Goal (issue 3): gap p50 <= 300 ms, p99 <= 700 ms; isolation
gap <= lease TTL + 1 s with TTL 2 s.

Run as root after `make setup`:
    .venv/bin/python bench/failover.py --rounds 30 --isolation-rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.lab import faults, net, setup
from coloft.lab.rounds import fault_round
from coloft.lab.workload import percentile
from steady_state import unprotected


async def one_round(fault: str) -> dict[str, Any]:
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec()
    pair = LocalPair(spec, verbose=False)
    with tempfile.TemporaryDirectory() as out:
        try:
            found = await fault_round(pair, fault, Path(out), load_s=16.0, fault_after_s=6.0)
        finally:
            faults.heal(pair)
            pair.stop()
            shutil.rmtree(api.run_root(spec), ignore_errors=True)
    return {
        "detected_ms": found.detected_ms,
        "gap_ms": found.result["max_reply_gap_ms"],
        # Fault to the survivor serving alone: what the lease and the steps cost,
        # before the client's TCP retransmission backoff adds its share to gap_ms.
        "restored_ms": None
        if not found.failover or found.failover["done_unix"] is None
        else (found.failover["done_unix"] - found.fault_at) * 1000.0,
        "resets": found.result["reconnects"],
        "failed": found.result["requests_failed"],
        "lost": found.lost_acked_writes,
        "overlap_ms": found.overlap_ms,
        "error": found.failover["error"] if found.failover else "no failover",
    }


def stats(rounds: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [float(r[key]) for r in rounds if r[key] is not None]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return (None if p50 is None else round(p50, 1), None if p99 is None else round(p99, 1))


def run_rounds(fault: str, n: int) -> list[dict[str, Any]]:
    rounds = []
    for i in range(n):
        r = asyncio.run(one_round(fault))
        rounds.append(r)
        print(f"{fault} round {i + 1}/{n}: {r}", file=sys.stderr)
    return rounds


def summarize(fault: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "fault": fault,
        "rounds": len(rounds),
        "detected_ms": stats(rounds, "detected_ms"),
        "gap_ms": stats(rounds, "gap_ms"),
        "restored_ms": stats(rounds, "restored_ms"),
        "resets": sum(r["resets"] for r in rounds),
        "failed_requests": sum(r["failed"] for r in rounds),
        "lost_acked_writes": sum(r["lost"] for r in rounds),
        "overlap_ms_max": max((r["overlap_ms"] for r in rounds), default=None),
        "failover_errors": [r["error"] for r in rounds if r["error"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fault", default="kill-primary")
    parser.add_argument("--isolation-rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    try:
        setup.lab_up(fresh_disks=True)
        spec = setup.lab_spec()
        with tempfile.TemporaryDirectory() as out:
            baseline = asyncio.run(unprotected(spec, 20.0, Path(out)))
        results.append(summarize(args.fault, run_rounds(args.fault, args.rounds)))
        if args.isolation_rounds:
            iso = run_rounds("isolate-primary", args.isolation_rounds)
            results.append(summarize("isolate-primary", iso))
    finally:
        net.lab_down()
    ref = baseline["latency_ms_p99"]
    if args.json:
        print(json.dumps({"unprotected_latency_ms_p99": ref, "results": results}))
        return 0
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    cpus = len(os.sched_getaffinity(0))
    print(f"failover, {date}, {cpus} CPUs, 1 closed-loop client, unprotected p99 {ref} ms")
    print(
        "| fault | rounds | detection p50 / p99 (ms) | survivor serving p50 / p99 (ms) "
        "| client gap p50 / p99 (ms) | gap / unprotected p99 | resets | lost acked writes "
        "| both active (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        d50, d99 = r["detected_ms"]
        g50, g99 = r["gap_ms"]
        ratio = "-" if not ref or g50 is None else f"{g50 / ref:.1f} / {g99 / ref:.1f}"
        r50, r99 = r["restored_ms"]
        print(
            f"| {r['fault']} | {r['rounds']} | {d50} / {d99} | {r50} / {r99} | {g50} / {g99} "
            f"| {ratio} "
            f"| {r['resets']} | {r['lost_acked_writes']} | {r['overlap_ms_max']} |"
        )
        if r["failover_errors"] or r["failed_requests"]:
            print(f"  errors: {r['failover_errors'][:3]}, failed requests {r['failed_requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
