"""A real server under COLO: Debian's Redis in the guest (examples/guests/redis.toml),
driven by Debian's redis-benchmark (SET, pipelining off) and redis-cli from the
client host, unprotected vs protected in one run, then a SIGKILL of the primary's
QEMU under the same load: the client-visible gap is the longest answer of the
redis-benchmark run the kill fell into.

Run as root after `make setup`:  .venv/bin/python bench/workload.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.lab import net, setup
from coloft.lab.probe import wait_ready
from coloft.lab.redis_load import RedisRun
from coloft.lab.rounds import solo
from coloft.model.spec import PairSpec

HOST, PORT = "192.0.2.10", 6379


async def drive(duration: float, kill: Any = None) -> dict[str, Any]:
    if not await asyncio.to_thread(wait_ready, net.CLIENT_NS, HOST, 7000, 90.0):
        raise SystemExit("guest service did not come up")
    run = RedisRun(net.CLIENT_NS, HOST, PORT)
    run.start()  # from this thread: its clients die with it
    fault_at = None
    try:
        await asyncio.sleep(duration * 0.4 if kill else duration)
        if kill is not None:
            fault_at = time.time()
            kill()
            await asyncio.sleep(duration * 0.6)
        return await asyncio.to_thread(run.finish, fault_at)
    finally:
        run.kill()


async def unprotected(spec: PairSpec, duration: float) -> dict[str, Any]:
    async with solo(spec):
        return await drive(duration)


async def protected(spec: PairSpec, duration: float, failover: bool) -> dict[str, Any]:
    pair = LocalPair(spec, verbose=False)

    def kill_primary() -> None:
        s = pair.status(spec.primary.name)
        assert s is not None and s["qemu"]["pid"] is not None
        os.kill(int(s["qemu"]["pid"]), signal.SIGKILL)

    try:
        pair.start()
        await asyncio.to_thread(pair.wait_protected)
        return await drive(duration, kill_primary if failover else None)
    finally:
        pair.stop()
        shutil.rmtree(api.run_root(spec), ignore_errors=True)


ROWS = [
    ("requests_per_s", "throughput (SET/s)"),
    ("latency_ms_p50", "latency p50 (ms)"),
    ("latency_ms_p99", "latency p99 (ms, worst run)"),
    ("latency_ms_max", "latency max (ms)"),
    ("errors", "client errors"),
    ("lost_acked_writes", "acknowledged writes lost"),
]


def table(plain: dict[str, Any], colo: dict[str, Any]) -> str:
    lines = ["| metric | unprotected | COLO | COLO / unprotected |", "|---|---:|---:|---:|"]
    for key, label in ROWS:
        a, b = plain.get(key), colo.get(key)
        counts = key in ("errors", "lost_acked_writes")
        numbers = isinstance(a, int | float) and isinstance(b, int | float)
        ratio = f"{b / a:.2f}" if numbers and a and not counts else ""
        lines.append(f"| {label} | {a} | {b} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(args.interval_ms, reprotect=False, guest="redis")
    try:
        plain = asyncio.run(unprotected(spec, args.duration))
        setup.reset_disks()
        colo = asyncio.run(protected(spec, args.duration, failover=False))
        setup.reset_disks()
        kill = asyncio.run(protected(spec, args.duration, failover=True))
    finally:
        net.lab_down()
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "duration_s": args.duration,
        "checkpoint_interval_ms": args.interval_ms,
    }
    found = {"info": info, "unprotected": plain, "colo": colo, "failover": kill}
    if args.json:
        print(json.dumps(found))
        return 0
    print(json.dumps(found), file=sys.stderr)  # the raw figures, whatever the table does
    print(
        f"redis, {info['date']}, {info['cpus']} CPUs, {args.duration:.0f} s per run, "
        f"checkpoint interval {args.interval_ms} ms, redis-benchmark -c 4 -P 1 -t set"
    )
    print(table(plain, colo))
    print(
        f"SIGKILL of the primary's QEMU: gap {kill['gap_ms']} ms (inside a clean run: "
        f"{kill['fault_inside_a_run']}), errors {kill['errors']}, resets {kill['resets']}, "
        f"acknowledged writes {kill['acked_writes']}, lost {kill['lost_acked_writes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
