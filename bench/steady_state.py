"""Steady state: the same guest and client, unprotected vs under COLO, in one run.

Prints a table of both and the ratios (COLO / unprotected); --json for machines.
Run as root after `make setup`:  .venv/bin/python bench/steady_state.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent.pair import Pair, publish, remove_run_dirs
from coloft.effects import qemu_binary
from coloft.lab import net, setup, workload
from coloft.lab.probe import wait_ready
from coloft.lab.workload import percentile
from coloft.model.spec import PairSpec
from coloft.model.steps import Role

TARGET = "192.0.2.10:7000"


async def load(pair: Pair, duration: float, out: Path) -> dict[str, Any]:
    ok = await asyncio.to_thread(wait_ready, net.CLIENT_NS, "192.0.2.10", 7000, 90.0)
    if not ok:
        raise SystemExit("guest service did not come up")
    before = pair.checkpoints.count
    pauses_before = len(pair.checkpoints.pauses_ms)
    started = time.monotonic()
    client = workload.start_workload(net.CLIENT_NS, TARGET, out, duration)
    await asyncio.to_thread(client.wait, duration + 60)
    elapsed = time.monotonic() - started
    result = workload.read_result(out)
    pauses = list(pair.checkpoints.pauses_ms[pauses_before:])
    return {
        "requests_ok": result["requests_ok"],
        "requests_failed": result["requests_failed"],
        "throughput_rps": round(result["requests_ok"] / result.get("duration_s", elapsed), 1),
        "latency_ms_p50": result["latency_ms_p50"],
        "latency_ms_p99": result["latency_ms_p99"],
        "latency_ms_max": result["latency_ms_max"],
        "checkpoints": pair.checkpoints.count - before,
        "pause_ms_p50": _r(percentile(pauses, 50)),
        "pause_ms_p99": _r(percentile(pauses, 99)),
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


async def unprotected(spec: PairSpec, duration: float, out: Path) -> dict[str, Any]:
    pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
    try:
        await pair.start_node(spec.primary, Role.PRIMARY)
        session = pair.sessions[spec.primary.name]
        await session.execute("cont")
        await session.execute(
            "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
        )
        return await load(pair, duration, out)
    finally:
        await pair.down()
        remove_run_dirs(spec)


async def protected(spec: PairSpec, duration: float, out: Path) -> dict[str, Any]:
    pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
    try:
        await pair.up()
        return await load(pair, duration, out)
    finally:
        await pair.down()
        publish(spec, None)
        remove_run_dirs(spec)


ROWS = [
    ("throughput_rps", "throughput (req/s)"),
    ("latency_ms_p50", "latency p50 (ms)"),
    ("latency_ms_p99", "latency p99 (ms)"),
    ("latency_ms_max", "latency max (ms)"),
    ("requests_failed", "failed requests"),
    ("checkpoints", "checkpoints"),
    ("pause_ms_p50", "checkpoint pause p50 (ms)"),
    ("pause_ms_p99", "checkpoint pause p99 (ms)"),
]


def table(plain: dict[str, Any], colo: dict[str, Any]) -> str:
    lines = ["| metric | unprotected | COLO | COLO / unprotected |", "|---|---:|---:|---:|"]
    for key, label in ROWS:
        a, b = plain.get(key), colo.get(key)
        ratio = (
            f"{b / a:.2f}"
            if isinstance(a, int | float)
            and isinstance(b, int | float)
            and a
            and key not in ("requests_failed", "checkpoints")
            else ""
        )
        lines.append(
            f"| {label} | {'-' if a is None else a} | {'-' if b is None else b} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(args.interval_ms)
    try:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            plain = asyncio.run(unprotected(spec, args.duration, Path(a)))
            setup.reset_disks()
            colo = asyncio.run(protected(spec, args.duration, Path(b)))
    finally:
        net.lab_down()
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "duration_s": args.duration,
        "checkpoint_interval_ms": args.interval_ms,
        "accel": qemu_binary.choose(spec.vm.accel, spec.qemu_binary).accel.value,
    }
    if args.json:
        print(json.dumps({"info": info, "unprotected": plain, "colo": colo}))
    else:
        print(
            f"steady state, {info['date']}, {info['cpus']} CPUs, {info['accel']}, "
            f"{args.duration:.0f} s "
            f"per side, checkpoint interval {args.interval_ms} ms, 1 closed-loop client"
        )
        print(table(plain, colo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
