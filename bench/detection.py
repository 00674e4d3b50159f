"""Detection of a broken comparison path: rounds of each channel fault under client
load, and a no-fault soak counting false DEGRADED transitions.

Per round, on one running pair: the fault (nftables drop or TCP reset of one
channel), held HOLD_S, then lifted. Measured from the agents' own time-stamped
events: fault -> DEGRADED, fault -> policy applied (alert: at once; re-establish:
the half-open end yanked), lift -> PROTECTED again. Goal (issue 4): detection p99
<= 1 s, policy applied p99 <= 2 s, zero false positives in the soak.

Run as root after `make setup`:
    .venv/bin/python bench/detection.py --rounds 10 --soak-s 3600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.lab import net, setup, workload
from coloft.lab.rounds import Watcher, path_round, up_and_serving
from coloft.lab.workload import percentile

CHANNEL_FAULTS = ("drop-mirror", "reset-mirror", "drop-compare", "reset-compare")
HOLD_S = 3.0
# Before each round the pair must have been PROTECTED this long without a break.
CALM_S = 3.0


async def calm(watcher: Watcher) -> None:
    since = None
    while True:
        view = await asyncio.to_thread(watcher.poll)
        now = time.monotonic()
        since = (since or now) if view["protected"] else None
        if since is not None and now - since >= CALM_S:
            return
        await asyncio.sleep(0.2)


def false_positives(events: list[dict[str, Any]], start: float) -> list[dict[str, Any]]:
    """The leader's DEGRADED verdicts after `start`: each is a false positive."""
    return [e for e in events if e["kind"] == "protection" and e.get("code") and e["unix"] >= start]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(args.interval_ms)
    assert spec.vm.service is not None
    pair = LocalPair(spec, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="coloft-bench-"))
    client = None
    rounds: dict[str, list[dict[str, Any]]] = {f: [] for f in args.faults}
    try:
        await up_and_serving(pair)
        load_s = args.soak_s + len(args.faults) * args.rounds * 60 + 60
        target = "{}:{}".format(*spec.vm.service)
        client = workload.start_workload(net.CLIENT_NS, target, out, load_s, rate=args.rate)
        watcher = Watcher(pair)
        for i in range(args.rounds):
            for fault in args.faults:
                await calm(watcher)
                r = await path_round(pair, fault, HOLD_S)
                rounds[fault].append(r)
                print(f"{fault} round {i + 1}/{args.rounds}: {r}", file=sys.stderr)
        await calm(watcher)
        start = time.time()
        fp: list[dict[str, Any]] = []
        while time.time() - start < args.soak_s:
            await asyncio.sleep(min(5.0, args.soak_s))
            await asyncio.to_thread(watcher.poll)
            fp = false_positives(watcher.events(), start)
        leader = next(
            (s for s in watcher.last.values() if s is not None and s["state"] == "primary"), None
        )
        soak = {
            "seconds": round(time.time() - start),
            "false_degraded": len(fp),
            "reasons": sorted({e["code"] for e in fp}),
            "probe": None if leader is None else leader.get("probe"),
            "checkpoints_per_min": None if leader is None else leader["checkpoints"]["per_min"],
        }
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        pair.stop()
        shutil.rmtree(api.run_root(spec), ignore_errors=True)
        net.lab_down()
        shutil.rmtree(out, ignore_errors=True)
    return {
        "interval_ms": args.interval_ms,
        "hold_s": HOLD_S,
        "results": [summarize(f, rs) for f, rs in rounds.items()],
        "soak": soak,
    }


def stats(rounds: list[dict[str, Any]], key: str) -> tuple[float | None, float | None, int]:
    values = [float(r[key]) for r in rounds if r[key] is not None]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return (
        None if p50 is None else round(p50, 1),
        None if p99 is None else round(p99, 1),
        len(rounds) - len(values),
    )


def summarize(fault: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "fault": fault,
        "rounds": len(rounds),
        "reasons": sorted({str(r["reason"]) for r in rounds}),
        "policies": sorted({str(r["policy"]) for r in rounds}),
        "degraded_ms": stats(rounds, "degraded_after_ms"),
        "policy_applied_ms": stats(rounds, "policy_applied_ms"),
        "protected_again_ms": stats(rounds, "protected_again_ms"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--faults", nargs="+", default=list(CHANNEL_FAULTS))
    parser.add_argument("--soak-s", type=float, default=3600.0)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0, help="client requests per second")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = asyncio.run(run(args))
    if args.json:
        print(json.dumps(found))
        return 0
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    cpus = len(os.sched_getaffinity(0))
    print(
        f"detection, {date}, {cpus} CPUs, checkpoint interval {args.interval_ms} ms, "
        f"client {args.rate:g} req/s, fault held {HOLD_S:g} s"
    )
    print(
        "| fault | rounds | reason | policy | DEGRADED p50 / p99 (ms) "
        "| policy applied p50 / p99 (ms) | PROTECTED again after lift p50 / p99 (ms) |"
    )
    print("|---|---:|---|---|---:|---:|---:|")
    for r in found["results"]:

        def cell(key: str, r: dict[str, Any] = r) -> str:
            p50, p99, missing = r[key]
            return f"{p50} / {p99}" + (f" ({missing} never)" if missing else "")

        print(
            f"| {r['fault']} | {r['rounds']} | {', '.join(r['reasons'])} "
            f"| {', '.join(r['policies'])} | {cell('degraded_ms')} "
            f"| {cell('policy_applied_ms')} | {cell('protected_again_ms')} |"
        )
    s = found["soak"]
    print(
        f"soak: {s['seconds']} s without faults, "
        f"{s['false_degraded']} false DEGRADED {s['reasons']}; "
        f"checkpoints/min {s['checkpoints_per_min']}; probe {s['probe']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
