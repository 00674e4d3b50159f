"""Failover: rounds of SIGKILL of the primary QEMU under client load.

Per round: detection time (fault to failover decision), the client-visible gap (the
longest interval between answered requests on the connection opened before the
fault), connection resets, acknowledged writes lost, and time both hosts sent the
VM's frames at once. The unprotected VM's p99 latency in the same run is the
reference for the gap. Goal (issue 3): gap p50 <= 300 ms, p99 <= 700 ms.

Run as root after `make setup`:  .venv/bin/python bench/failover.py --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent.pair import Pair, publish, remove_run_dirs
from coloft.effects import qemu_binary
from coloft.lab import net, setup
from coloft.lab.rounds import fault_round
from coloft.lab.workload import percentile
from steady_state import unprotected


async def one_round(fault: str) -> dict[str, Any]:
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec()
    pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
    with tempfile.TemporaryDirectory() as out:
        try:
            found = await fault_round(pair, fault, Path(out), load_s=16.0, fault_after_s=6.0)
        finally:
            await pair.down()
            publish(spec, None)
            remove_run_dirs(spec)
    return {
        "detected_ms": found.detected_ms,
        "gap_ms": found.result["max_reply_gap_ms"],
        "resets": found.result["reconnects"],
        "failed": found.result["requests_failed"],
        "lost": found.checked["lost_acked_writes"] + found.checked["wrong_values"],
        "overlap_ms": found.overlap_ms,
        "error": found.failovers[0].error if found.failovers else "no failover",
    }


def stats(rounds: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [float(r[key]) for r in rounds if r[key] is not None]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return (None if p50 is None else round(p50, 1), None if p99 is None else round(p99, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fault", default="kill-primary")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    try:
        setup.lab_up(fresh_disks=True)
        spec = setup.lab_spec()
        with tempfile.TemporaryDirectory() as out:
            baseline = asyncio.run(unprotected(spec, 20.0, Path(out)))
        for i in range(args.rounds):
            r = asyncio.run(one_round(args.fault))
            rounds.append(r)
            print(f"round {i + 1}/{args.rounds}: {r}", file=sys.stderr)
    finally:
        net.lab_down()
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpus": len(os.sched_getaffinity(0)),
        "fault": args.fault,
        "rounds": len(rounds),
        "unprotected_latency_ms_p99": baseline["latency_ms_p99"],
        "detected_ms": stats(rounds, "detected_ms"),
        "gap_ms": stats(rounds, "gap_ms"),
        "resets": sum(r["resets"] for r in rounds),
        "failed_requests": sum(r["failed"] for r in rounds),
        "lost_acked_writes": sum(r["lost"] for r in rounds),
        "overlap_ms_max": max((r["overlap_ms"] for r in rounds), default=None),
        "failover_errors": [r["error"] for r in rounds if r["error"]],
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    gap50, gap99 = summary["gap_ms"]
    ref = summary["unprotected_latency_ms_p99"]
    print(
        f"failover, {summary['date']}, {summary['cpus']} CPUs, {args.fault}, "
        f"{len(rounds)} rounds, 1 closed-loop client"
    )
    print("| metric | p50 | p99 |")
    print("|---|---:|---:|")
    print("| detection (ms) | {} | {} |".format(*summary["detected_ms"]))
    print(f"| client-visible gap (ms) | {gap50} | {gap99} |")
    if ref and gap50 is not None and gap99 is not None:
        print(
            f"| gap / unprotected p99 latency ({ref} ms) | {gap50 / ref:.1f} | {gap99 / ref:.1f} |"
        )
    print(
        f"\nconnection resets {summary['resets']}, failed requests "
        f"{summary['failed_requests']}, lost acknowledged writes "
        f"{summary['lost_acked_writes']}, max both-hosts-active {summary['overlap_ms_max']} ms, "
        f"failover errors {len(summary['failover_errors'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
