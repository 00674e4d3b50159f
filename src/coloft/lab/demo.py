"""`coloft demo`: the lab, a protected pair, client load, a live view, a summary.

Everything it starts it tears down again, also when it fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from coloft.agent.pair import Pair, publish, remove_run_dirs, supervise
from coloft.core.argv import tap_name
from coloft.effects import qemu_binary
from coloft.errors import FatalError
from coloft.lab import faults, net, setup, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.probe import wait_ready
from coloft.lab.workload import percentile
from coloft.model.status import PairStatus

SERVICE_BOOT_DEADLINE_S = 90.0


def summarize(
    status: PairStatus, pair: Pair, result: dict[str, Any], checked: dict[str, Any], duration: float
) -> dict[str, Any]:
    pauses = list(pair.checkpoints.pauses_ms)
    return {
        "protected": status.protected,
        "phase": status.phase,
        "reason": status.reason,
        "checkpoints": status.checkpoints,
        "checkpoints_per_min": status.checkpoints_per_min,
        "checkpoint_pause_ms_p50": _round(percentile(pauses, 50)),
        "checkpoint_pause_ms_p99": _round(percentile(pauses, 99)),
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


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def failover_summary(
    pair: Pair, fault_at: float | None, result: dict[str, Any], lost: int, watch: FrameWatch
) -> dict[str, Any]:
    record = pair.failovers[0] if pair.failovers else None
    return {
        "fault_injected": fault_at is not None,
        "action": record.action if record else None,
        "survivor": record.survivor if record else None,
        "detected_ms": _round((record.detected_at - fault_at) * 1000.0)
        if record and fault_at is not None
        else None,
        "failover_steps_ms": _round(record.steps_ms) if record else None,
        "error": record.error if record else None,
        "gap_ms": result.get("max_reply_gap_ms"),
        "connection_resets": int(result.get("reconnects", 0)),
        "lost_acked_writes": lost,
        "active_overlap_ms": watch.overlap_ms(),
        "frames_sent_by_host": {n: watch.frames(n) for n in watch.hosts},
    }


async def run_demo(
    duration: float, interval_ms: int, live: bool, fault: str | None = None
) -> dict[str, Any]:
    """Run the demo; with a fault, inject it into the protected pair mid-workload."""
    setup.lab_up(fresh_disks=True)
    spec = setup.lab_spec(interval_ms)
    assert spec.vm.service is not None
    host, port = spec.vm.service
    target = f"{host}:{port}"
    pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
    out = Path(tempfile.mkdtemp(prefix="coloft-demo-"))
    stop = asyncio.Event()
    client = None
    view = None
    watch = FrameWatch({n.name: n.netns or "" for n in spec.nodes}, tap_name(spec))
    fault_at: float | None = None
    try:
        await pair.up()
        ready = await asyncio.to_thread(
            wait_ready, net.CLIENT_NS, host, port, SERVICE_BOOT_DEADLINE_S
        )
        if not ready:
            raise FatalError(
                f"the guest service at {target} did not answer within "
                f"{SERVICE_BOOT_DEADLINE_S:g} s (console: "
                f"{spec.run_dir_of(spec.primary) / 'console.log'})"
            )
        started = time.monotonic()
        watch.start()
        client = workload.start_workload(net.CLIENT_NS, target, out, duration)
        if live:
            from coloft.cli.view import LiveView

            view = LiveView(spec.vm.name, duration)
            view.start()

        def update(status: PairStatus) -> None:
            nonlocal fault_at
            elapsed = time.monotonic() - started
            if fault and fault_at is None and status.protected and elapsed >= duration * 0.4:
                fault_at = faults.inject(pair, fault)
            if view is not None:
                view.update(status, workload.read_live(out), elapsed, list(pair.events))
            if client is not None and client.poll() is not None:
                stop.set()

        status = await supervise(pair, stop, on_status=update)
        result = await asyncio.to_thread(workload.stop_workload, client, out)
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, target, out / "acked.jsonl"
        )
        watch.stop()
        summary = summarize(status, pair, result, checked, time.monotonic() - started)
        if fault is not None:
            summary["failover"] = failover_summary(
                pair, fault_at, result, summary["lost_acked_writes"], watch
            )
        return summary
    finally:
        watch.stop()
        if view is not None:
            view.stop()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        await pair.down()
        publish(spec, None)
        remove_run_dirs(spec)
        with contextlib.suppress(Exception):
            net.lab_down()
        shutil.rmtree(out, ignore_errors=True)
