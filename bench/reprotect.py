"""Re-protection: rounds of failover (SIGKILL of the primary QEMU) followed by the
automatic re-protection, under client load, with the real agents and etcd.

Per round: from the failover done to PROTECTED again (the new secondary rejoined,
disk copied while the guest serves, memory copied with the guest paused, the first
checkpoint, `sync` named, a probe reply matched by colo-compare), the guest's pause
while entering COLO, and the bytes sent for the disk. The unprotected VM's p99
client latency in the same run is the reference for the pause. Goal (issue 7):
256 MiB guest, PROTECTED again p50 <= 3 s, p99 <= 6 s.

Run as root after `make setup`:
    .venv/bin/python bench/reprotect.py --rounds 10 --memory 128 256
"""

from __future__ import annotations

import argparse
import asyncio
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
from coloft.agent.launch import LocalPair
from coloft.lab import faults, net, setup, workload
from coloft.lab.rounds import up_and_serving
from coloft.model.status import pair_view
from failover import stats
from steady_state import unprotected

TARGET = "192.0.2.10:7000"


def _protected_by(leader: str, since: float) -> Any:
    """PROTECTED by `leader` through a re-protection that began after `since`."""

    def check(s: dict[str, dict[str, Any] | None]) -> bool:
        me = s.get(leader) or {}
        r = me.get("reprotect") or {}
        fresh = r.get("started_unix", 0.0) > since and r.get("protected_unix")
        view = pair_view("demo", s)
        return bool(fresh and view["protected"] and view["leader"] == leader)

    return check


def rounds_for(memory_mib: int, n: int, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(memory_mib=memory_mib)
    pair = LocalPair(spec, verbose=False)
    found: list[dict[str, Any]] = []
    client = None
    try:
        asyncio.run(up_and_serving(pair))
        client = workload.start_workload(net.CLIENT_NS, TARGET, out, 3600, rate=50)
        leader = spec.primary.name
        for i in range(n):
            time.sleep(2)
            s = pair.status(leader)
            assert s is not None
            killed_at = time.time()
            os.kill(int(s["qemu"]["pid"]), signal.SIGKILL)
            leader = spec.peer_of(leader).name
            views = pair.wait_for(
                _protected_by(leader, killed_at), 120, f"{leader} protected again"
            )
            me = views[leader]
            assert me is not None
            f, r = me["failover"], me["reprotect"]
            row = {
                "protected_again_ms": (r["protected_unix"] - f["done_unix"]) * 1000.0,
                "paused_ms": r["pause_ms"],
                "disk_bytes": r["disk_bytes"],
                "synced_bytes": r["synced_bytes"],
            }
            found.append(row)
            print(f"{memory_mib} MiB round {i + 1}/{n}: {row}", file=sys.stderr)
        result = workload.stop_workload(client, out)
        # Read back from whichever side serves now, before the pair stops.
        checked = workload.verify(net.CLIENT_NS, TARGET, out / "acked.jsonl")
        result["lost_acked_writes"] = int(checked.get("lost_acked_writes", 0)) + int(
            checked.get("wrong_values", 0)
        )
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        faults.heal(pair)
        pair.stop()
        shutil.rmtree(api.run_root(spec), ignore_errors=True)
    return found, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--memory", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    try:
        setup.lab_up(fresh_disks=True)
        with tempfile.TemporaryDirectory() as out:
            baseline = asyncio.run(unprotected(setup.lab_spec(), 20.0, Path(out)))
        for memory in args.memory:
            with tempfile.TemporaryDirectory() as out:
                rows, client = rounds_for(memory, args.rounds, Path(out))
            results.append(
                {
                    "memory_mib": memory,
                    "rounds": len(rows),
                    "protected_again_ms": stats(rows, "protected_again_ms"),
                    "paused_ms": stats(rows, "paused_ms"),
                    "disk_mib": round(
                        sum(r["disk_bytes"] for r in rows) / max(1, len(rows)) / (1 << 20), 1
                    ),
                    "failed_requests": client.get("requests_failed"),
                    "resets": client.get("reconnects"),
                    "lost_acked_writes": client["lost_acked_writes"],
                }
            )
    finally:
        net.lab_down()
    ref = baseline["latency_ms_p99"]
    if args.json:
        print(json.dumps({"unprotected_latency_ms_p99": ref, "results": results}))
        return 0
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    cpus = len(os.sched_getaffinity(0))
    print(f"re-protection, {date}, {cpus} CPUs, 1 client at 50 req/s, unprotected p99 {ref} ms")
    print(
        "| guest memory | rounds | PROTECTED again p50 / p99 (ms) | guest paused p50 / p99 (ms) "
        "| pause / unprotected p99 | disk sent (MiB) | failed requests | resets "
        "| lost acked writes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        a50, a99 = r["protected_again_ms"]
        p50, p99 = r["paused_ms"]
        ratio = "-" if not ref or p50 is None else f"{p50 / ref:.1f} / {p99 / ref:.1f}"
        print(
            f"| {r['memory_mib']} MiB | {r['rounds']} | {a50} / {a99} | {p50} / {p99} | {ratio} "
            f"| {r['disk_mib']} | {r['failed_requests']} | {r['resets']} "
            f"| {r['lost_acked_writes']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
