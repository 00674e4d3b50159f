"""Operator actions on a running pair, through the agents' API only: the protection
switch, a planned switchover, and a drill (switchover there and back).

Each waits for the outcome the agents publish and says what happened; none acts on
QEMU or the arbiter itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from coloft.agent import api, journal
from coloft.errors import ColoftError
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view

Statuses = dict[str, dict[str, Any] | None]
POLL_S = 0.1


def statuses(spec: PairSpec) -> Statuses:
    return {n.name: api.status_or_none(api.socket_path(spec, n.name)) for n in spec.nodes}


def leader_of(s: Statuses) -> str | None:
    return next((n for n, v in s.items() if v and v["state"] in ("primary", "alone")), None)


def wait(
    spec: PairSpec,
    done: Callable[[Statuses], bool],
    timeout_s: float,
    what: str,
    progress: Callable[[str], None] | None = None,
) -> Statuses:
    """Poll the agents until `done`; report the leader's progress lines as they change."""
    end = time.monotonic() + timeout_s
    shown = ""
    while True:
        s = statuses(spec)
        if done(s):
            return s
        lead = leader_of(s)
        line = ""
        if lead is not None and (me := s[lead]) is not None:
            line = me.get("progress") or me["protection_reason"]
        if progress is not None and line and line != shown:
            progress(line)
            shown = line
        if time.monotonic() > end:
            view = pair_view(spec.vm.name, s)
            raise ColoftError(f"{what} not reached within {timeout_s:g} s: {view['reason']}")
        time.sleep(POLL_S)


def protected_by(node: str) -> Callable[[Statuses], bool]:
    def check(s: Statuses) -> bool:
        v = pair_view("", s)
        return bool(v["protected"] and v["leader"] == node)

    return check


def switch(
    spec: PairSpec, on: bool, timeout_s: float, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Switch protection on (re-protect now, then PROTECTED) or off (the secondary
    dropped, the guest running alone)."""
    s = statuses(spec)
    lead = leader_of(s)
    if lead is None:
        raise ColoftError(f"{spec.vm.name}: no leading agent answers")
    started = time.monotonic()
    api.call(api.socket_path(spec, lead), "POST", "/protection", {"on": on})

    def off(s: Statuses) -> bool:
        me = s.get(lead)
        return bool(me and me["state"] == "alone" and me["protection_code"] == "protection-off")

    s = wait(spec, protected_by(lead) if on else off, timeout_s, "the switch", progress)
    view = pair_view(spec.vm.name, s)
    return {
        "vm": spec.vm.name,
        "leader": lead,
        "protection": "on" if on else "off",
        "phase": view["phase"],
        "protected": view["protected"],
        "took_ms": round((time.monotonic() - started) * 1000, 1),
    }


def switchover(
    spec: PairSpec, timeout_s: float, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Planned role swap of a protected pair: the leader hands over to its in-sync
    secondary, which takes over and re-protects with the old primary."""
    s = statuses(spec)
    view = pair_view(spec.vm.name, s)
    old = leader_of(s)
    if old is None or not view["protected"]:
        raise ColoftError(f"{spec.vm.name}: not PROTECTED ({view['reason']}); no switchover")
    # The leader's peer: with a spare node, the members may not be the spec's first two.
    new = str((s[old] or {}).get("peer") or spec.peer_of(old).name)
    started = time.time()
    answer = api.call(api.socket_path(spec, old), "POST", "/failover", {"force": False})
    if answer["state"] != "fenced":
        raise ColoftError(f"{old} refused: {answer['reason']}")

    def serving(s: Statuses) -> bool:
        me = s.get(new)
        return bool(me and me["state"] == "alone" and (me["failover"] or {}).get("done_unix"))

    s = wait(spec, serving, timeout_s, f"{new} serving")
    record = (s[new] or {})["failover"]
    if record["error"]:
        raise ColoftError(f"takeover on {new} failed: {record['error']}")
    s = wait(spec, protected_by(new), timeout_s, f"{new} protected again", progress)
    r = (s[new] or {}).get("reprotect") or {}
    return {
        "from": old,
        "to": new,
        "takeover_ms": round((record["done_unix"] - started) * 1000, 1),
        "protected_again_ms": None
        if r.get("protected_unix") is None
        else round((r["protected_unix"] - started) * 1000, 1),
        "guest_paused_ms": r.get("pause_ms"),
        "synced_bytes": r.get("synced_bytes"),
    }


def drill(
    spec: PairSpec, timeout_s: float, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """A failover drill: switchover there and back; ok when both legs ended PROTECTED."""
    legs = []
    for _ in range(2):
        legs.append(switchover(spec, timeout_s, progress))
    return {"vm": spec.vm.name, "ok": True, "legs": legs}


def pair_events(name: str, since: float) -> list[dict[str, Any]]:
    """Every agent's events of a pair after `since`, oldest first. A live agent is
    asked through its API; a dead one's journal is read where it was left."""
    found: list[dict[str, Any]] = []
    root = api.run_base() / name
    nodes = {
        p.name.removeprefix("events-").removesuffix(".jsonl") for p in root.glob("events-*.jsonl")
    }
    sockets = api.agent_sockets(name)
    for node in sorted(nodes | set(sockets)):
        try:
            answer = api.call(sockets[node], "GET", f"/events?since={since!r}", timeout=2.0)
            found += answer["events"]
        except (KeyError, ColoftError):
            found += journal.read(journal.path_of(root, node), since)
    return sorted(found, key=lambda e: float(e.get("unix", 0)))
