"""Faults the demo, the tests and the benchmarks inject into a running pair."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from coloft.agent import api
from coloft.core import ports
from coloft.errors import ConfigError, FatalError

if TYPE_CHECKING:
    from coloft.agent.launch import LocalPair

# fault name -> (the victim, by its agent's state; what is done to it)
FAULTS: dict[str, tuple[str, str]] = {
    "kill-primary": ("primary", "SIGKILL its QEMU"),
    "kill-secondary": ("secondary", "SIGKILL its QEMU"),
    "stop-primary": ("primary", "SIGSTOP its QEMU"),
    "stop-secondary": ("secondary", "SIGSTOP its QEMU"),
    "kill-primary-agent": ("primary", "SIGKILL its agent (its QEMU dies with it)"),
    "kill-secondary-agent": ("secondary", "SIGKILL its agent (its QEMU dies with it)"),
    "isolate-primary": ("primary", "blackhole all its links: LAN, replication, witness"),
    "cut-replication": ("primary", "blackhole its replication link only"),
    "kill-primary-in-checkpoint": ("primary", "SIGKILL its QEMU while a checkpoint runs"),
    "planned-failover": ("primary", "ask its agent to hand over (coloft failover)"),
}
# Faults of the comparison path: the pair keeps running, and must be reported
# DEGRADED with the broken link named. name -> (link, mode)
PATH_FAULTS: dict[str, tuple[str, str]] = {
    "drop-mirror": ("mirror", "drop"),
    "reset-mirror": ("mirror", "reset"),
    "drop-compare": ("compare", "drop"),
    "reset-compare": ("compare", "reset"),
    # Reset mid-packet: the reconnected stream must be parsed from its start again
    # (lab/qemu/colo-compare-reconnect.patch).
    "cut-compare": ("compare", "cut"),
    # The checkpoint stream and the NBD disk replication, heartbeats untouched.
    "drop-replication": ("replication", "drop"),
    "freeze-secondary": ("secondary", "SIGSTOP its QEMU"),
}
CHECKPOINT_WAIT_S = 30.0
FAULT_NAMES = (*FAULTS, *PATH_FAULTS)


def victim(statuses: dict[str, dict[str, Any] | None], state: str) -> dict[str, Any]:
    for s in statuses.values():
        if s is not None and s["state"] == state:
            return s
    raise ConfigError(f"no node is {state} now; cannot inject the fault")


def inject(pair: LocalPair, fault: str) -> float:
    """Inject the fault now; returns when (wall clock, as agents stamp their events)."""
    from coloft.lab import net

    if fault in PATH_FAULTS:
        return _break_path(pair, fault)
    if fault not in FAULTS:
        raise ConfigError(f"unknown fault {fault!r} (known: {', '.join(FAULT_NAMES)})")
    state, _ = FAULTS[fault]
    v = victim(pair.statuses(), state)
    node = pair.spec.node(v["node"])
    at = time.time()
    if fault == "kill-primary-in-checkpoint":
        return _kill_in_checkpoint(pair, node.name)
    if fault == "planned-failover":
        api.call(api.socket_path(pair.spec, node.name), "POST", "/failover", {"force": False})
    elif fault.endswith("-agent"):
        pair.signal_agent(node.name, signal.SIGKILL)
    elif fault.startswith(("kill-", "stop-")):
        sig = signal.SIGKILL if fault.startswith("kill-") else signal.SIGSTOP
        os.kill(int(v["qemu"]["pid"]), sig)
    elif fault == "isolate-primary":
        assert node.netns is not None
        net.isolate(node.netns)
        at = time.time()  # in force once nft committed (a run takes up to ~0.1 s here)
    elif fault == "cut-replication":
        assert node.netns is not None
        net.blackhole(node.netns, "repl")
        at = time.time()
    return at


def _break_path(pair: LocalPair, fault: str) -> float:
    """Break one link on the primary's replication link (every channel ends there)."""
    from coloft.lab import net

    link, mode = PATH_FAULTS[fault]
    statuses = pair.statuses()
    if link == "secondary":
        pid = int(victim(statuses, "secondary")["qemu"]["pid"])
        at = time.time()
        os.kill(pid, signal.SIGSTOP)
        return at
    node = pair.spec.node(victim(statuses, "primary")["node"])
    peer = pair.spec.peer_of(node.name)
    assert node.netns is not None
    if link == "replication":
        # The secondary listens for the migration stream and serves NBD.
        chosen = [ports.port(peer, ports.MIGRATION), ports.port(peer, ports.NBD)]
    else:
        offset = ports.MIRROR if link == "mirror" else ports.COMPARE_SECONDARY_IN
        chosen = [ports.port(node, offset)]
    began = time.time()
    net.break_channel(node.netns, "repl", chosen, mode)
    if mode == "drop":
        # In force once nft committed; nothing can show before the first retransmission.
        return time.time()
    # A reset acts on the next packet, which may come (and be seen by the agent) between
    # nft's commit and its exit: the fault counts from the call, an upper bound on latency.
    return began


def _kill_in_checkpoint(pair: LocalPair, node: str) -> float:
    """Poll the primary's agent until its QEMU is inside a checkpoint, then SIGKILL it."""
    sock = api.socket_path(pair.spec, node)
    end = time.monotonic() + CHECKPOINT_WAIT_S
    while time.monotonic() < end:
        s = api.call(sock, "GET", "/status")
        if s["qemu"].get("in_checkpoint_ms") is not None:
            at = time.time()
            os.kill(int(s["qemu"]["pid"]), signal.SIGKILL)
            return at
    raise FatalError(f"no checkpoint of {node} seen within {CHECKPOINT_WAIT_S:g} s")


def heal(pair: LocalPair) -> None:
    """Lift every network fault (processes killed stay dead)."""
    from coloft.lab import net

    for node in pair.spec.nodes:
        if node.netns is not None:
            net.heal(node.netns)
            net.mend_channels(node.netns)
