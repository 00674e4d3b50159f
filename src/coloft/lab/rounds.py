"""A protected pair under client load, a fault, and what the oracles found.

Shared by the demo, the failover and detection tests, and the benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coloft.agent.launch import LocalPair
from coloft.core.argv import tap_name
from coloft.effects import qemu_binary
from coloft.effects.local_qemu import LocalQemu
from coloft.errors import FatalError
from coloft.lab import faults, net, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.probe import wait_ready
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view
from coloft.model.steps import Role

BOOT_DEADLINE_S = 240.0
PROTECTED_AGAIN_S = 40.0
SERVICE_DEADLINE_S = 90.0


@asynccontextmanager
async def solo(spec: PairSpec) -> AsyncIterator[None]:
    """The pair's guest on its primary host alone, no COLO: the unprotected baseline
    the benchmarks compare against."""
    choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
    qemu = LocalQemu(spec, spec.primary, Role.PRIMARY, choice)
    try:
        await qemu.start()
        assert qemu.session is not None
        await qemu.session.execute("cont")
        await qemu.session.execute(
            "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
        )
        yield
    finally:
        await qemu.close()
        qemu.cleanup()


async def up_and_serving(pair: LocalPair) -> None:
    """Start the pair, wait until it is protected and the guest's service answers."""
    pair.start()
    await asyncio.to_thread(pair.wait_protected, BOOT_DEADLINE_S)
    assert pair.spec.vm.service is not None
    host, port = pair.spec.vm.service
    if not await asyncio.to_thread(wait_ready, net.CLIENT_NS, host, port, SERVICE_DEADLINE_S):
        console = pair.spec.run_dir_of(pair.spec.primary) / "console.log"
        raise FatalError(f"guest service never answered; console: {console}")


# How long a comparison-path fault stays before it is lifted.
PATH_FAULT_HOLD_S = 5.0


# Codes that follow from a fault rather than name it (core.health, agent daemon),
# and those that name the broken link itself.
CONSEQUENCES = (
    "probe-timeout",
    "path-recovering",
    "failing-over",
    "running-alone",
    "reprotecting",
    "first-checkpoint",
    "sync-pending",
    "first-probe",
    "",
)
LINKS = ("mirror-", "compare-in-", "migration-", "nbd-", "secondary-stalled")


def _rank(code: str) -> int:
    if code.startswith(LINKS):
        return 0
    return 2 if code in CONSEQUENCES else 1


class PathWatch:
    """A comparison-path fault's timeline, from the agents' own time-stamped events:
    when the pair said DEGRADED and why, when the policy was applied, and when it
    was PROTECTED again after the fault was lifted. A fault the pair ends by itself
    (`lifted=False`: a frozen secondary is killed by its own agent) has nothing to
    lift: PROTECTED again counts from the fault."""

    def __init__(
        self, fault_at: float, hold_s: float = PATH_FAULT_HOLD_S, lifted: bool = True
    ) -> None:
        self.fault_at = fault_at
        self.hold_s = hold_s
        self.healed_at: float | None = None
        self.lifted = lifted

    def due(self, now: float) -> bool:
        """True once, when it is time to lift the fault."""
        if self.healed_at is None and now - self.fault_at >= self.hold_s:
            self.healed_at = now
            return True
        return False

    def summary(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        after = [e for e in events if e["unix"] >= self.fault_at]
        verdicts = [e for e in after if e["kind"] == "protection"]
        bad = [e for e in verdicts if e.get("code")]
        # The reason: the first code that names the broken link most closely.
        best = min((_rank(e["code"]) for e in bad), default=None)
        reason = next((e["code"] for e in bad if _rank(e["code"]) == best), None)
        applied = [e for e in after if e["kind"] == "policy" and e.get("applied")]
        # That reason's policy; else the strongest one applied.
        applied = (
            [e for e in applied if e.get("code") == reason]
            or [e for e in applied if e.get("policy") != "alert"]
            or applied
        )
        since = self.healed_at if self.lifted else self.fault_at
        again = [
            e
            for e in verdicts
            if since is not None
            and e["unix"] >= since
            and not e.get("code")
            and bad
            and e["unix"] > bad[0]["unix"]
        ]

        def ms(e: dict[str, Any] | None, since: float | None) -> float | None:
            return None if e is None or since is None else _ms1((e["unix"] - since) * 1000.0)

        first_applied = applied[0] if applied else None
        return {
            "degraded_after_ms": ms(bad[0] if bad else None, self.fault_at),
            "reason": reason,
            "policy": None if first_applied is None else first_applied["policy"],
            "policy_applied_ms": ms(first_applied, self.fault_at),
            "protected_again_ms": ms(again[0] if again else None, since),
        }


def _ms1(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


async def path_round(
    pair: LocalPair, fault: str, hold_s: float = PATH_FAULT_HOLD_S
) -> dict[str, Any]:
    """On a running, protected pair: break the path, lift it after `hold_s`, and wait
    (up to PROTECTED_AGAIN_S) for PROTECTED again. The PathWatch summary."""
    watcher = Watcher(pair)
    fault_at = await asyncio.to_thread(faults.inject, pair, fault)
    path = PathWatch(fault_at, hold_s)
    try:
        await asyncio.sleep(max(0.0, fault_at + hold_s - time.time()))
        path.due(time.time())
    finally:
        await asyncio.to_thread(faults.heal, pair)
    end = time.monotonic() + PROTECTED_AGAIN_S
    while time.monotonic() < end:
        view = await asyncio.to_thread(watcher.poll)
        if view["protected"]:
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(watcher.poll)
    return path.summary(watcher.events())


def all_events(statuses: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Both agents' events on one timeline, each tagged with its node."""
    merged = [
        {**e, "node": node} for node, s in statuses.items() if s is not None for e in s["events"]
    ]
    return sorted(merged, key=lambda e: e["unix"])


@dataclass
class Watcher:
    """Keeps the latest answer of each agent: a killed agent's last words survive it."""

    pair: LocalPair
    last: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def poll(self) -> dict[str, Any]:
        now = self.pair.statuses()
        for node, s in now.items():
            if s is not None or node not in self.last:
                self.last[node] = s
        return pair_view(self.pair.spec.vm.name, now)

    def events(self) -> list[dict[str, Any]]:
        return all_events(self.last)


@dataclass
class FaultRound:
    fault: str
    fault_at: float  # wall clock
    result: dict[str, Any]
    checked: dict[str, Any]
    overlap_ms: float
    frames: dict[str, int]
    events: list[dict[str, Any]]
    failover: dict[str, Any] | None
    final: dict[str, Any]

    @property
    def detected_ms(self) -> float | None:
        return detected_ms(self.events, self.fault_at)

    @property
    def lost_acked_writes(self) -> int:
        return int(self.checked.get("lost_acked_writes", 0)) + int(
            self.checked.get("wrong_values", 0)
        )


def detected_ms(events: list[dict[str, Any]], fault_at: float | None) -> float | None:
    """From the fault to the first agent that noticed something wrong."""
    if fault_at is None:
        return None
    seen = [e["unix"] for e in events if e["kind"] == "detected" and e["unix"] >= fault_at]
    return None if not seen else (min(seen) - fault_at) * 1000.0


def settled(view: dict[str, Any]) -> bool:
    """A failover finished (or failed) and a single leader serves."""
    f = view["failover"]
    return f is not None and f["done_unix"] is not None


async def fault_round(
    pair: LocalPair,
    fault: str,
    out: Path,
    load_s: float = 24.0,
    fault_after_s: float = 8.0,
    serving: Callable[[], None] | None = None,
) -> FaultRound:
    """Run the round on a pair that is not started yet; the caller stops the pair.
    `serving` runs (in a thread) once the pair is protected and serving, before the load."""
    assert pair.spec.vm.service is not None
    target = "{}:{}".format(*pair.spec.vm.service)
    await up_and_serving(pair)
    if serving is not None:
        await asyncio.to_thread(serving)
    watch = FrameWatch({n.name: n.netns or "" for n in pair.spec.nodes}, tap_name(pair.spec))
    watcher = Watcher(pair)
    watch.start()
    fault_at = 0.0
    try:
        client = workload.start_workload(net.CLIENT_NS, target, out, load_s)
        await asyncio.sleep(fault_after_s)
        view = await asyncio.to_thread(watcher.poll)
        if not view["protected"]:
            raise FatalError(f"pair not protected when the fault was due: {view['reason']}")
        fault_at = await asyncio.to_thread(faults.inject, pair, fault)
        while client.poll() is None:
            await asyncio.sleep(0.3)
            view = await asyncio.to_thread(watcher.poll)
        await asyncio.to_thread(client.wait, 30)
        final = await asyncio.to_thread(watcher.poll)
    finally:
        watch.stop()
        await asyncio.to_thread(faults.heal, pair)
    checked = await asyncio.to_thread(workload.verify, net.CLIENT_NS, target, out / "acked.jsonl")
    return FaultRound(
        fault,
        fault_at,
        workload.read_result(out),
        checked,
        watch.overlap_ms(),
        {n: watch.frames(n) for n in watch.hosts},
        watcher.events(),
        final["failover"],
        final,
    )
