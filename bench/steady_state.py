"""Steady state: the same guest and client, unprotected vs under COLO, in one run;
COLO both with TLS on the replication channels (the default) and in plain TCP.

Prints a table of all three and the ratios (COLO / unprotected, TLS / plain TCP);
--json for machines.
Run as root after `make setup`:  .venv/bin/python bench/steady_state.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.effects import qemu_binary
from coloft.lab import net, setup, workload
from coloft.lab.probe import wait_ready
from coloft.lab.rounds import solo
from coloft.model.spec import PairSpec

TARGET = "192.0.2.10:7000"


async def load(
    duration: float, out: Path, checkpoints: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    ok = await asyncio.to_thread(wait_ready, net.CLIENT_NS, "192.0.2.10", 7000, 90.0)
    if not ok:
        raise SystemExit("guest service did not come up")
    before = checkpoints()
    started = time.monotonic()
    client = workload.start_workload(net.CLIENT_NS, TARGET, out, duration)
    await asyncio.to_thread(client.wait, duration + 60)
    elapsed = time.monotonic() - started
    result = workload.read_result(out)
    after = checkpoints()
    return {
        "requests_ok": result["requests_ok"],
        "requests_failed": result["requests_failed"],
        "throughput_rps": round(result["requests_ok"] / result.get("duration_s", elapsed), 1),
        "latency_ms_p50": result["latency_ms_p50"],
        "latency_ms_p99": result["latency_ms_p99"],
        "latency_ms_max": result["latency_ms_max"],
        "checkpoints": after.get("count", 0) - before.get("count", 0),
        # The primary's own pauses (what clients feel), over the whole run.
        "pause_ms_p50": after.get("pause_ms_p50"),
        "pause_ms_p99": after.get("pause_ms_p99"),
    }


async def unprotected(spec: PairSpec, duration: float, out: Path) -> dict[str, Any]:
    """The same guest on one host, no COLO: QEMU started as a primary, then just run."""
    async with solo(spec):
        return await load(duration, out, dict)


async def protected(spec: PairSpec, duration: float, out: Path) -> dict[str, Any]:
    """The pair as users run it: etcd and one agent per host."""
    pair = LocalPair(spec, verbose=False)
    try:
        pair.start()  # from this thread: children die with the thread that forked them
        await asyncio.to_thread(pair.wait_protected)

        def checkpoints() -> dict[str, Any]:
            a = pair.status(spec.primary.name)
            return {} if a is None else dict(a["checkpoints"])

        return await load(duration, out, checkpoints)
    finally:
        pair.stop()
        shutil.rmtree(api.run_root(spec), ignore_errors=True)


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


def _ratio(a: Any, b: Any, key: str) -> str:
    counts = ("requests_failed", "checkpoints")
    if isinstance(a, int | float) and isinstance(b, int | float) and a and key not in counts:
        return f"{b / a:.2f}"
    return ""


def table(plain: dict[str, Any], colo: dict[str, Any], clear: dict[str, Any]) -> str:
    lines = [
        "| metric | unprotected | COLO | COLO / unprotected | COLO, plain TCP | TLS / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        a, b, c = plain.get(key), colo.get(key), clear.get(key)
        shown = ["-" if v is None else str(v) for v in (a, b, c)]
        lines.append(
            f"| {label} | {shown[0]} | {shown[1]} | {_ratio(a, b, key)} | {shown[2]} "
            f"| {_ratio(c, b, key)} |"
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
        with tempfile.TemporaryDirectory() as c:
            setup.reset_disks()
            clear_spec = setup.lab_spec(args.interval_ms, tls=False)
            clear = asyncio.run(protected(clear_spec, args.duration, Path(c)))
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
        print(json.dumps({"info": info, "unprotected": plain, "colo": colo, "colo_plain": clear}))
    else:
        print(
            f"steady state, {info['date']}, {info['cpus']} CPUs, {info['accel']}, "
            f"{args.duration:.0f} s "
            f"per run, checkpoint interval {args.interval_ms} ms, 1 closed-loop client"
        )
        print(table(plain, colo, clear))
    return 0


if __name__ == "__main__":
    sys.exit(main())
