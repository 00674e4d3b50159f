"""`coloft demo`: the lab, a protected pair, client load, a live view, a summary.

Everything it starts it tears down again, also when it fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coloft.agent.pair import Pair, publish, remove_run_dirs, supervise
from coloft.config.load import load_spec
from coloft.effects import qemu_binary
from coloft.errors import FatalError
from coloft.lab import net, setup, workload
from coloft.lab.probe import wait_ready
from coloft.lab.workload import percentile
from coloft.model.spec import PairSpec
from coloft.model.status import PairStatus

SERVICE_BOOT_DEADLINE_S = 90.0


def lab_spec(interval_ms: int) -> PairSpec:
    spec = load_spec(setup.lab_up(fresh_disks=True))
    return dataclasses.replace(
        spec, tuning=dataclasses.replace(spec.tuning, checkpoint_interval_ms=interval_ms)
    )


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


async def run_demo(
    duration: float,
    interval_ms: int,
    live: bool,
    on_update: Callable[[PairStatus, dict[str, Any] | None], None] | None = None,
) -> dict[str, Any]:
    spec = lab_spec(interval_ms)
    assert spec.vm.service is not None
    host, port = spec.vm.service
    target = f"{host}:{port}"
    pair = Pair(spec, qemu_binary.choose(spec.vm.accel, spec.qemu_binary))
    out = Path(tempfile.mkdtemp(prefix="coloft-demo-"))
    stop = asyncio.Event()
    client = None
    view = None
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
        client = workload.start_workload(net.CLIENT_NS, target, out, duration)
        if live:
            from coloft.cli.view import LiveView

            view = LiveView(spec.vm.name, duration)
            view.start()

        def update(status: PairStatus) -> None:
            live_data = workload.read_live(out)
            if view is not None:
                view.update(status, live_data, time.monotonic() - started)
            if on_update is not None:
                on_update(status, live_data)
            if client is not None and client.poll() is not None:
                stop.set()

        status = await supervise(pair, stop, on_status=update)
        result = await asyncio.to_thread(workload.stop_workload, client, out)
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, target, out / "acked.jsonl"
        )
        return summarize(status, pair, result, checked, time.monotonic() - started)
    finally:
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
