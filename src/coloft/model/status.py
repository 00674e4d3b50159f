"""What agents publish, and the pair seen through both agents' eyes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEADING = ("primary", "alone")
# Past this, the two agents' event times no longer order their events (coloft events).
CLOCK_WARN_MS = 500.0


@dataclass(frozen=True)
class SideStatus:
    node: str
    role: str
    pid: int | None
    alive: bool
    run_state: str | None = None
    colo_mode: str | None = None
    colo_reason: str | None = None
    migration: str | None = None
    qmp_ms: float | None = None
    error: str | None = None


def pair_view(vm: str, agents: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """One pair from its agents' statuses (None: that agent did not answer).

    The leader's agent judges protection (it sees its own QEMU and the secondary's
    heartbeats); with no leader answering, the pair is not protected, whatever
    else is running.
    """
    answering = {n: s for n, s in agents.items() if s is not None}
    leader = next((s for s in answering.values() if s["state"] in LEADING), None)
    judge = leader or next(iter(answering.values()), None)
    nodes = []
    for name, s in agents.items():
        if s is None:
            nodes.append({"node": name, "state": "no-agent", "reason": "agent does not answer"})
            continue
        q = s["qemu"]
        nodes.append(
            {
                "node": name,
                "state": s["state"],
                "role": s["role"],
                "reason": s["reason"],
                "qemu_pid": q["pid"],
                "qemu_alive": q["alive"],
                "run_state": q.get("run_state"),
                "colo_mode": q.get("colo_mode"),
                "agent_pid": s["agent_pid"],
                "peer_paths_ms": s["peer_health"]["paths_ms"],
                "clock_offset_ms": s["peer_health"].get("clock_offset_ms"),
            }
        )
    if judge is None:
        phase, protected, reason, code = "stopped", False, "no agent answers", "no-agent"
    elif leader is None and any(s["state"] == "stopped" for s in answering.values()):
        phase, protected, code = "stopped", False, "guest-shutdown"
        reason = "the guest powered itself off; the pair is stopped"
    elif leader is None:
        phase, protected, code = "unprotected", False, "no-leader"
        reason = f"no leader; {judge['node']}: {judge['state']} ({judge['reason']})"
    else:
        phase, protected, reason = leader["phase"], leader["protected"], leader["protection_reason"]
        code = leader.get("protection_code", "")
    failovers = [s["failover"] for s in answering.values() if s.get("failover")]
    return {
        "vm": vm,
        "phase": phase,
        "protected": protected,
        "reason": reason,
        "code": code,
        "leader": None if leader is None else leader["node"],
        "epoch": None if leader is None else leader["epoch"],
        "sync": None if judge is None else judge["sync"],
        "nodes": nodes,
        "checkpoints": None if judge is None else judge["checkpoints"],
        "unprotected_s": None if leader is None else leader.get("unprotected_s"),
        "failover": failovers[0] if failovers else None,
    }


def one_line(view: dict[str, Any]) -> str:
    """`coloft status` in one line: state, leadership, roles, peer paths, reason."""
    code = view.get("code")
    parts = [f"{view['vm']}: {view['phase'].upper()}" + (f"({code})" if code else "")]
    if view["leader"]:
        parts.append(f"leader {view['leader']} (epoch {view['epoch']})")
    for n in view["nodes"]:
        paths = n.get("peer_paths_ms") or {}
        heard = ", ".join(
            f"{p} {'-' if ms is None else f'{ms:.0f} ms'}" for p, ms in sorted(paths.items())
        )
        parts.append(f"{n['node']} {n['state']}" + (f" [peer heard: {heard}]" if heard else ""))
        offset = n.get("clock_offset_ms")
        if offset is not None and abs(offset) > CLOCK_WARN_MS:
            parts[-1] += f" [clock {offset / 1000:+.1f} s from the peer's]"
    c = view.get("checkpoints") or {}
    if c.get("per_min") is not None:
        share = ""
        if c.get("count") and c.get("forced") is not None:
            share = f" ({100 * c['forced'] / c['count']:.0f} % forced)"
        parts.append(f"{c['per_min']:.0f} checkpoints/min{share}")
    if view.get("unprotected_s"):
        parts.append(f"unprotected {view['unprotected_s']:.0f} s so far")
    return " | ".join(parts) + f" -- {view['reason']}"
