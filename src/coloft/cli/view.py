"""Rendering: the status table, the demo's live view and its summary."""

from __future__ import annotations

import io
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in ("node", "agent", "QEMU pid", "run state", "COLO mode", "peer heard (ms ago)"):
        t.add_column(col)
    for n in nodes:
        paths = n.get("peer_paths_ms") or {}
        heard = ", ".join(f"{p} {_fmt(ms)}" for p, ms in sorted(paths.items()))
        alive = n.get("qemu_alive")
        t.add_row(
            n["node"],
            n["state"],
            _fmt(n.get("qemu_pid")),
            n.get("run_state") or ("dead" if alive is False else "-"),
            _fmt(n.get("colo_mode")),
            heard or "-",
        )
    return t


def _headline(view: dict[str, Any]) -> Text:
    style = "bold green" if view["protected"] else "bold red"
    lead = f"  leader {view['leader']} (epoch {view['epoch']})" if view["leader"] else ""
    return Text.assemble(
        (f"{view['vm']}: {view['phase'].upper()}", style), lead, f"  {view['reason']}"
    )


def _checkpoint_line(view: dict[str, Any]) -> str:
    c = view.get("checkpoints") or {}
    return (
        f"checkpoints {c.get('count', 0)} ({_fmt(c.get('per_min'))}/min), "
        f"last {_fmt(c.get('last_age_s'), ' s')} ago, "
        f"last pause {_fmt(c.get('last_pause_ms'), ' ms')}, "
        f"interval {c.get('interval_ms', '-')} ms"
    )


def status_table(view: dict[str, Any]) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=False)
    console.print(_headline(view))
    console.print(_nodes_table(view["nodes"]))
    console.print(_checkpoint_line(view))
    return buf.getvalue()


class LiveView:
    """The demo's terminal view, refreshed every few hundred ms."""

    def __init__(self, vm: str, duration: float) -> None:
        self.vm = vm
        self.duration = duration
        self._live = Live(Text(f"{vm}: starting"), refresh_per_second=4, transient=False)

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        self._live.stop()

    def update(
        self,
        view: dict[str, Any],
        client: dict[str, Any] | None,
        elapsed: float,
        events: list[dict[str, Any]] | None = None,
    ) -> None:
        c = client or {}
        client_line = (
            f"client: {_fmt(c.get('reqs_per_s'))} req/s, "
            f"p50 {_fmt(c.get('latency_ms_p50'), ' ms')}, "
            f"p99 {_fmt(c.get('latency_ms_p99'), ' ms')}, "
            f"ok {c.get('requests_ok', 0)}, failed {c.get('requests_failed', 0)}, "
            f"acknowledged writes {c.get('acked_writes', 0)}"
        )
        lines = [
            Text(
                time.strftime("%H:%M:%S ", time.localtime(e["unix"]))
                + f"{e.get('node', '')} {e['text']}"
            )
            for e in (events or [])[-12:]
        ]
        self._live.update(
            Group(
                _headline(view),
                _nodes_table(view["nodes"]),
                Text(_checkpoint_line(view)),
                Text(client_line),
                Text(f"{elapsed:.0f} / {self.duration:.0f} s"),
                *lines,
            )
        )


def summary_text(s: dict[str, Any]) -> str:
    verdict = "PROTECTED" if s["protected"] else f"NOT PROTECTED ({s['reason']})"
    lost = s["lost_acked_writes"]
    lines = [
        f"== coloft demo summary ({s['duration_s']} s) ==",
        f"protection at the end: {verdict}",
        f"checkpoints: {s['checkpoints']} ({s['checkpoints_per_min']}/min, "
        f"{s.get('checkpoints_forced', 0)} forced), pause p50 "
        f"{_fmt(s['checkpoint_pause_ms_p50'], ' ms')}, p99 "
        f"{_fmt(s['checkpoint_pause_ms_p99'], ' ms')}",
        f"client requests: {s['requests_ok']} ok, {s['requests_failed']} failed; latency p50 "
        f"{_fmt(s['latency_ms_p50'], ' ms')}, p99 {_fmt(s['latency_ms_p99'], ' ms')}",
        f"acknowledged writes: {s['acked_writes']}, lost: {lost}"
        + ("" if lost == 0 else "  <-- DATA LOSS"),
    ]
    f = s.get("failover")
    if f is not None:
        lines.append(
            f"failover: {f['action'] or 'none'} (survivor {f['survivor'] or '-'}), detected "
            f"{_fmt(f['detected_ms'], ' ms')}, steps {_fmt(f['failover_steps_ms'], ' ms')}, "
            f"longest client gap {_fmt(f['gap_ms'], ' ms')}, connection resets "
            f"{f['connection_resets']}, both hosts active {_fmt(f['active_overlap_ms'], ' ms')}"
            + (f", ERROR {f['error']}" if f["error"] else "")
        )
    r = s.get("reprotect")
    if r is not None:
        synced = r["synced_bytes"]
        lines.append(
            f"re-protection: PROTECTED again {_fmt(r['protected_again_ms'], ' ms')} after the "
            f"failover with {r['secondary'] or '-'}, "
            f"{'-' if synced is None else f'{synced / (1 << 20):.0f} MiB'} synced, guest paused "
            f"{_fmt(r['guest_paused_ms'], ' ms')}" + (f", ERROR {r['error']}" if r["error"] else "")
        )
    w = s.get("workload")
    if w is not None:
        lines.append(
            f"{w['name']} ({w['client']}): {w['requests']} requests, {w['errors']} errors, "
            f"{w['resets']} resets; latency p50 {_fmt(w['latency_ms_p50'], ' ms')}, p99 "
            f"{_fmt(w['latency_ms_p99'], ' ms')}; acknowledged writes {w['acked_writes']}, "
            f"lost {w['lost_acked_writes']}"
            + "".join(f"\n  client error: {e}" for e in w["error_lines"])
        )
    return "\n".join(lines)
