"""`coloft demo`: the lab, a protected pair, client load, a live view, a summary.

The pair runs as it would on real hosts: an etcd in the witness namespace and one
agent per host namespace. Everything the demo starts it tears down again, also
when it fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.core.argv import tap_name
from coloft.lab import faults, guest, net, setup, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.redis_load import RedisRun
from coloft.lab.rounds import PathWatch, Watcher, detected_ms, settled, up_and_serving

TICK_S = 0.3


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def summarize(
    view: dict[str, Any], result: dict[str, Any], checked: dict[str, Any], duration: float
) -> dict[str, Any]:
    c = view.get("checkpoints") or {}
    return {
        "protected": view["protected"],
        "phase": view["phase"],
        "reason": view["reason"],
        "checkpoints": c.get("count", 0),
        "checkpoints_per_min": c.get("per_min", 0.0),
        "checkpoints_forced": c.get("forced", 0),
        "checkpoint_pause_ms_p50": c.get("pause_ms_p50"),
        "checkpoint_pause_ms_p99": c.get("pause_ms_p99"),
        "requests_ok": int(result.get("requests_ok", 0)),
        "requests_failed": int(result.get("requests_failed", 0)),
        "acked_writes": int(result.get("acked_writes", 0)),
        "lost_acked_writes": int(checked.get("lost_acked_writes", 0))
        + int(checked.get("wrong_values", 0)),
        "latency_ms_p50": result.get("latency_ms_p50"),
        "latency_ms_p99": result.get("latency_ms_p99"),
        "latency_ms_max": result.get("latency_ms_max"),
        "duration_s": round(duration, 1),
        "client_errors": result.get("errors", [])[:5],
    }


def failover_summary(
    view: dict[str, Any],
    events: list[dict[str, Any]],
    fault_at: float | None,
    result: dict[str, Any],
    lost: int,
    watch: FrameWatch,
) -> dict[str, Any]:
    record = view["failover"]
    steps_ms = None
    if record and record["done_unix"] is not None:
        steps_ms = (record["done_unix"] - record["started_unix"]) * 1000.0
    return {
        "fault_injected": fault_at is not None,
        "action": record["action"] if record else None,
        "survivor": record["survivor"] if record else None,
        "detected_ms": _round(detected_ms(events, fault_at)),
        "failover_steps_ms": _round(steps_ms),
        "error": record["error"] if record else "no failover happened",
        "gap_ms": result.get("max_reply_gap_ms"),
        "connection_resets": int(result.get("reconnects", 0)),
        "lost_acked_writes": lost,
        "active_overlap_ms": watch.overlap_ms(),
        "frames_sent_by_host": {n: watch.frames(n) for n in watch.hosts},
    }


def reprotect_summary(
    statuses: dict[str, dict[str, Any] | None], failover: dict[str, Any] | None
) -> dict[str, Any]:
    """The survivor's last re-protection: from the failover done to PROTECTED again."""
    records = [s["reprotect"] for s in statuses.values() if s and s.get("reprotect")]
    done = None if failover is None else failover.get("done_unix")
    mine = [r for r in records if done is None or r["started_unix"] >= done]
    r = max(mine, key=lambda x: x["started_unix"]) if mine else None
    again = None if r is None else r["protected_unix"]
    return {
        "protected_again_ms": None
        if again is None or done is None
        else _round((again - done) * 1000),
        "synced_bytes": None if r is None else r["synced_bytes"],
        "disk_bytes": None if r is None else r["disk_bytes"],
        "memory_bytes": None if r is None else r["ram_bytes"],
        "guest_paused_ms": None if r is None else r["pause_ms"],
        "secondary": None if r is None else r["secondary"],
        "error": "never re-protected" if r is None else r["error"],
    }


def _revive(pair: LocalPair, statuses: dict[str, dict[str, Any] | None]) -> None:
    """Let a killed side come back: restart an agent that was killed (its host rebooted)."""
    for node, proc in pair.agents.items():
        if proc.poll() is not None and statuses.get(node) is None:
            pair.start_agent(node)


async def run_demo(
    duration: float,
    interval_ms: int,
    live: bool,
    fault: str | None = None,
    reprotect: bool = False,
    workload_name: str | None = None,
) -> dict[str, Any]:
    """Run the demo; with a fault, inject it into the protected pair mid-workload.

    Re-protection is on for the comparison-path faults (the fault is lifted after
    a few seconds) and, with `reprotect`, for the failover faults: the failed side
    comes back as the new secondary. With `workload_name` ("redis") the guest of
    examples/guests/NAME.toml runs and Debian's own clients drive it besides the
    lab's client; the summary gains a `workload` object."""
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(
        interval_ms, reprotect=reprotect or fault in faults.PATH_FAULTS, guest=workload_name
    )
    assert spec.vm.service is not None
    target = "{}:{}".format(*spec.vm.service)
    pair = LocalPair(spec)
    watcher = Watcher(pair)
    out = Path(tempfile.mkdtemp(prefix="coloft-demo-"))
    client = None
    view_ui = None
    watch = FrameWatch({n.name: n.netns or "" for n in spec.nodes}, tap_name(spec))
    fault_at: float | None = None
    redis: RedisRun | None = None
    try:
        await up_and_serving(pair)
        if workload_name is not None:
            port = guest.load_guest_spec(setup.guest_file(workload_name)).services[0].port
            redis = RedisRun(net.CLIENT_NS, spec.vm.service[0], port)
            # Its processes must be started from this (long-lived) thread: they die with it.
            redis.start()
        started = time.monotonic()
        watch.start()
        client = workload.start_workload(net.CLIENT_NS, target, out, duration)
        if live:
            from coloft.cli.view import LiveView

            view_ui = LiveView(spec.vm.name, duration)
            view_ui.start()
        path: PathWatch | None = None
        while True:
            view = await asyncio.to_thread(watcher.poll)
            elapsed = time.monotonic() - started
            if fault and fault_at is None and view["protected"] and elapsed >= duration * 0.4:
                fault_at = await asyncio.to_thread(faults.inject, pair, fault)
                if fault in faults.PATH_FAULTS:
                    # A frozen secondary is killed by its agent: nothing to lift.
                    path = PathWatch(fault_at, lifted=fault != "freeze-secondary")
            if path is not None and path.due(time.time()):
                await asyncio.to_thread(faults.heal, pair)
            if reprotect and fault_at is not None and settled(view):
                await asyncio.to_thread(_revive, pair, watcher.last)
            if view_ui is not None:
                view_ui.update(view, workload.read_live(out), elapsed, watcher.events())
            if client.poll() is not None:
                break
            await asyncio.sleep(TICK_S)
        if redis is not None:
            redis_summary = await asyncio.to_thread(redis.finish, fault_at)
        result = await asyncio.to_thread(workload.stop_workload, client, out)
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, target, out / "acked.jsonl"
        )
        watch.stop()
        view = await asyncio.to_thread(watcher.poll)
        summary = summarize(view, result, checked, time.monotonic() - started)
        if redis is not None:
            summary["workload"] = redis_summary
        if fault in faults.PATH_FAULTS:
            summary["protection"] = (
                path.summary(watcher.events())
                if path is not None
                else {
                    "degraded_after_ms": None,
                    "reason": "fault never injected: the pair was not protected",
                    "policy": None,
                    "policy_applied_ms": None,
                    "protected_again_ms": None,
                }
            )
        elif fault is not None:
            summary["failover"] = failover_summary(
                view, watcher.events(), fault_at, result, summary["lost_acked_writes"], watch
            )
            if reprotect:
                summary["reprotect"] = reprotect_summary(watcher.last, view["failover"])
        return summary
    finally:
        watch.stop()
        if view_ui is not None:
            view_ui.stop()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        if redis is not None:
            redis.kill()
        await asyncio.to_thread(pair.stop)
        shutil.rmtree(api.run_root(spec), ignore_errors=True)
        with contextlib.suppress(Exception):
            net.lab_down()
        shutil.rmtree(out, ignore_errors=True)
