"""The per-host agent: owns one node's QEMU and runs core.ha every tick.

    observe (own QEMU, peer heartbeats, arbiter) -> core.ha.decide -> execute -> serve status

One asyncio TaskGroup: heartbeats, QEMU polling, the bring-up, the tick loop and
the status API. The tick loop never waits on QEMU (polling runs beside it, and
choreographies run as their own task), so a stuck QEMU can never keep the lease
logic from fencing on time; every arbiter call has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any

from coloft.agent import api, journal
from coloft.agent.metrics import Families, Metrics
from coloft.arbiter.base import Arbiter, ArbiterUnavailable
from coloft.core import channels, choreography, compare_log, failover, health, policy, reprotect
from coloft.core.ha import (
    Act,
    Decision,
    Intent,
    Observation,
    State,
    decide,
    first_role,
    spare_due,
)
from coloft.core.health import STALL_LIMIT_S
from coloft.core.lease import LeaseTiming, fence_at, read_due
from coloft.core.pace import new_beat, until_beat
from coloft.core.ports import NBD, heartbeat_port, port
from coloft.effects import certs, link, sdnotify, sockets
from coloft.effects.executor import run_steps
from coloft.effects.heartbeat import LAN, REPLICATION, Heartbeat, Hub
from coloft.effects.local_qemu import LocalQemu
from coloft.effects.probe import IcmpProbe
from coloft.effects.qemu_binary import QemuChoice
from coloft.errors import ColoftError, FatalError
from coloft.model.leader import Leader
from coloft.model.spec import NodeSpec, PairSpec, Policy
from coloft.model.status import SideStatus
from coloft.model.steps import Role, Step, Until

log = logging.getLogger(__name__)

TICK_S = 0.1
# The tick of a calm pair (_calm): ten times a second, its unchanging verdicts took
# ~15 % of the agent's CPU. It divides core.lease.STEADY_READ_S, so a steady pair's
# arbiter reads (leadership lost, the operator's switch) stay on their beat.
CALM_TICK_S = 0.25
MIN_WAIT_S = 0.005
TERMINAL = (State.FENCED, State.DOWN, State.STOPPED, State.SPARE)
POLL_S = 0.2
FULL_POLL_S = 1.0
CHANNEL_POLL_S = 0.1
SYNC_POLL_S = 0.25
# A probe that goes unanswered this long after the guest rebooted is the reboot's.
REBOOT_GRACE_S = 120.0
SYNC_STALL_S = 5.0
EXPORT_CHECK_S = 1.0
SYNC_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED")
START_ARBITER_WAIT_S = 30.0
# How long a starting agent listens for a leading peer before judging the pair.
PEER_WAIT_S = 2.0
INTENT_ANSWER_S = 2.0
KILL_WAIT_S = 1.0
# A spare counts as standing by while its heartbeats arrived this recently.
SPARE_HEARD_S = 1.0
# On-time probe replies in a row before a broken comparison path counts as working.
PROBE_RECOVER_STREAK = 5
QEMU_EVENTS_SHOWN = (
    "SHUTDOWN",
    "RESET",
    "COLO_EXIT",
    "FAILOVER_NEGOTIATED",
    "BLOCK_JOB_ERROR",
    "QUORUM_FAILURE",
    "QUORUM_REPORT_BAD",
)


def lease_timing(spec: PairSpec) -> LeaseTiming:
    a = spec.arbiter
    return LeaseTiming(a.ttl_s, a.renew_every_s, a.call_deadline_s, a.fence_margin_s)


class Agent:
    def __init__(
        self,
        spec: PairSpec,
        node: str,
        arbiter: Arbiter,
        choice: QemuChoice,
        families: Families | None = None,
        hub: Hub | None = None,
        notifier: sdnotify.Notifier | None = None,
    ) -> None:
        self.spec = spec
        self.pair = spec.vm.name
        self.node = spec.node(node)
        # The pair's members as the arbiter records them (None: never changed).
        self.members_recorded: tuple[str, str] | None = None
        self.peer = spec.node(self._peer_name(None, spec.primary.name))
        self.arbiter = arbiter
        self.choice = choice
        self.timing = lease_timing(spec)
        self.boot = secrets.token_hex(4)
        self.state = State.STARTING
        self.reason = "starting"
        self.progress = ""
        self.qemu: LocalQemu | None = None
        self.side: SideStatus | None = None
        self.side_due = True  # the next QEMU poll asks for everything
        self.hung = False
        self.ready = False
        self.planned_role: Role | None = None
        self.failed_role: Role | None = None
        self.my_epoch: int | None = None
        self.renew_sent_at: float | None = None
        self.renew_tried_at = float("-inf")
        self.leader: Leader | None = None
        self.sync: str | None = None
        # The operator's protection switch in the arbiter (None: never set).
        self.switch: bool | None = None
        self.arbiter_ok = False
        self.arbiter_error: str | None = None
        self.read_at: float | None = None  # when the arbiter was last read
        self.source: str | None = None  # who led last: whose disk is current
        self.bring_up_failed = False
        self.intent: Intent | None = None
        self.intent_until = 0.0
        self.intent_answer: dict[str, Any] | None = None
        self.answered = asyncio.Event()
        self.busy: asyncio.Task[None] | None = None
        self.failover: dict[str, Any] | None = None
        self.peer_lost_noted = False
        self.wake = asyncio.Event()
        self.peer_news = asyncio.Event()
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.journal = journal.Journal(journal.path_of(api.run_root(spec), self.node.name))
        self.metrics = Metrics(self.pair, self.node.name, families)
        self.metrics_at: float | None = None
        # Shared by the pairs of one agent process: systemd hears the process.
        self.notifier = notifier or sdnotify.Notifier()
        self.unprotected_s = 0.0  # time this agent led the pair without protection
        # The host interface of the replication link and its counters (a passive signal).
        self.link_iface: str | None = None
        self.link: dict[str, int] = {}
        self.protection = health.Verdict("starting", False, "starting")
        self._sent_protection: tuple[health.Verdict | None, dict[str, Any]] = (None, {})
        # The comparison path: the active probe (leader only) and each channel's sockets.
        self.probe: IcmpProbe | None = None
        self.probe_task: asyncio.Task[None] | None = None
        self.channels: dict[str, str] = {}
        self.path_broken = False
        self.calm = False  # the tick sleeps at the calm pace (_calm)
        # The policies (core.policy): yanks of half-open ends, and a leader's give-up.
        self.reconnector = policy.Reconnector()
        self.yanking: asyncio.Task[None] | None = None
        self.give_up: str | None = None
        self.giving_up: asyncio.Task[None] | None = None
        self.compare = compare_log.CompareSigns()
        self.worst_unproven_s = 0.0
        # Re-protection (core.reprotect): the leader's attempt, a failed node's rejoin.
        r = spec.reprotect
        self.backoff = reprotect.Backoff(r.backoff_s, r.backoff_max_s)
        self.reprotecting = False
        self.abandoning = False
        self.targeted = False
        self.joining: asyncio.Task[None] | None = None
        self.reprotect: dict[str, Any] | None = None
        self.sync_seen = reprotect.SyncProgress()
        self.peer_guest_stop_seen: float | None = None
        self.heartbeat = Heartbeat(
            self.pair,
            self.node.name,
            self.peer.name,
            self._paths(),
            (self._heartbeat_port(self.node), self._heartbeat_port(self.peer)),
            spec.heartbeat.interval_ms / 1000.0,
            self._heartbeat_state,
            self._peer_changed,
            certs.heartbeat_key(spec.certs_of(self.node)) if spec.security.tls else None,
            hub,
            # A lost peer is seen at the timeout, not on the next tick.
            silent_after_s=spec.heartbeat.timeout_s,
            on_silent=self.wake.set,
        )

    def _heartbeat_port(self, node: NodeSpec) -> int:
        return heartbeat_port(node, self.spec.heartbeat.port)

    def _paths(self) -> dict[str, tuple[str, str]]:
        paths = {REPLICATION: (self.node.replication_address, self.peer.replication_address)}
        if self.node.lan_address and self.peer.lan_address:
            paths[LAN] = (self.node.lan_address, self.peer.lan_address)
        return paths

    @property
    def members(self) -> tuple[str, str]:
        """The two nodes running the pair; a node outside them stands by, its peer
        the leader."""
        return self.members_recorded or self.spec.first_members

    def _peer_name(self, leader: Leader | None, current: str) -> str:
        """The other member; for a node outside the members, the leader (which
        hears it standing by), else the current one."""
        me = self.node.name
        if me in self.members:
            a, b = self.members
            return b if a == me else a
        if leader is not None and leader.node != me:
            return leader.node
        return current

    async def _members_read(self, recorded: tuple[str, str] | None) -> None:
        before, self.members_recorded = self.members, recorded
        if self.members != before:
            a, b = self.members
            self.note("members", f"the pair runs on {a} and {b}")
        name = self._peer_name(self.leader, self.peer.name)
        if name == self.peer.name:
            return
        self.peer = self.spec.node(name)
        self.peer_lost_noted = False
        self.peer_guest_stop_seen = None
        self.targeted = False
        # Shielded: an arbiter call's deadline must not leave the sockets half moved.
        await asyncio.shield(
            self.heartbeat.retarget(name, self._paths(), self._heartbeat_port(self.peer))
        )
        self.note("members", f"my peer is {name} now")

    def _spare(self) -> str | None:
        """The node a leader may take in place of a silent peer."""
        if self.spec.spare is None:
            return None
        return next(n.name for n in self.spec.nodes if n.name not in self.members)

    # ---------------------------------------------------------------- events

    def _peer_changed(self) -> None:
        self.peer_news.set()
        self.wake.set()

    def note(self, kind: str, text: str, level: int = logging.INFO, **extra: Any) -> None:
        event = {"unix": time.time(), "kind": kind, "text": text, **extra}
        self.events.append(event)
        self.journal.append({"pair": self.pair, "node": self.node.name, **event})
        log.log(level, "%s/%s: %s", self.pair, self.node.name, text)

    # ---------------------------------------------------------------- observe

    def _own_role(self) -> Role | None:
        if self.qemu is None:
            # A bring-up that failed before launching counts as a QEMU that died.
            return self.failed_role
        return self.qemu.role

    def _heartbeat_state(self) -> dict[str, Any]:
        now = time.monotonic()
        cp = self.qemu.checkpoints if self.qemu else health.Checkpoints()
        age = cp.age(now)
        return {
            "boot": self.boot,
            "state": self.state.value,
            "role": None if self.qemu is None else self.qemu.role.value,
            "qemu_alive": self.qemu is not None and self.qemu.alive(),
            "qemu_hung": self.hung,
            "ready": self.ready,
            "in_colo": self._in_colo(),
            "colo_mode": None if self.side is None else self.side.colo_mode,
            "checkpoints": cp.count,
            "checkpoint_age_s": age,
            "stopped_for_s": None if cp.stopped_at is None else now - cp.stopped_at,
            "epoch": self.my_epoch,
            "protection": self._protection_fields(),
            "channels": self.channels,
            "reprotecting": self.reprotecting,
            "guest_stopped": self.qemu is not None and self.qemu.guest_shutdown,
            "failed_starts": self.backoff.failures,
        }

    def _protection_fields(self) -> dict[str, Any]:
        # Sent twenty times a second and seldom changed: converted once per verdict.
        if self._sent_protection[0] is not self.protection:
            self._sent_protection = (self.protection, asdict(self.protection))
        return self._sent_protection[1]

    def _in_colo(self) -> bool:
        if self.qemu is None or self.side is None or not self.qemu.alive():
            return False
        return self.side.colo_mode == self.qemu.role.value

    def _peer(self, now: float) -> tuple[dict[str, Any], bool, bool]:
        """The peer's last message, whether it is heard at all, and over replication."""
        timeout = self.spec.heartbeat.timeout_s
        view = self.heartbeat.peer
        return (
            view.message or {},
            view.any_fresh(now, timeout),
            view.fresh(REPLICATION, now, timeout),
        )

    async def _read_arbiter(self) -> None:
        try:
            record = await self.arbiter.record(self.pair)
        except Exception as e:
            # Whatever went wrong, the arbiter did not answer: never act on it.
            if not isinstance(e, ColoftError):
                log.error("arbiter read failed unexpectedly: %r", e)
            self.arbiter_ok, self.arbiter_error = False, str(e) or repr(e)
            return
        names = {n.name for n in self.spec.nodes}
        if record.members is not None and not set(record.members) <= names:
            # Only a leader of this spec writes members: these are someone else's.
            self.arbiter_ok = False
            self.arbiter_error = f"members {record.members}: not nodes of this spec {sorted(names)}"
            return
        self.leader, self.sync, self.switch = record.leader, record.sync, record.protection
        self.source = record.source
        self.arbiter_ok, self.arbiter_error = True, None
        await self._members_read(record.members)

    def _observation(self, now: float) -> Observation:
        msg, heard, repl = self._peer(now)
        if self.intent is not None and now > self.intent_until:
            self.intent = None
        role = self._own_role()
        peer_reprotecting = heard and bool(msg.get("reprotecting"))
        if not msg.get("guest_stopped"):
            self.peer_guest_stop_seen = None
        elif self.peer_guest_stop_seen is None:
            self.peer_guest_stop_seen = now
        if self.state is State.STARTING and peer_reprotecting:
            self.targeted = True
        spare = self._spare()
        synced = (
            int(msg.get("checkpoints") or 0) > 0 and heard
            if role is Role.PRIMARY
            else (self.qemu is not None and self.qemu.checkpoints.count > 0)
        )
        return Observation(
            node=self.node.name,
            peer=self.peer.name,
            now=now,
            qemu_role=role,
            qemu_alive=self.qemu is not None and self.qemu.alive(),
            qemu_hung=self.hung,
            in_colo=self._in_colo(),
            synced=synced,
            peer_qemu_alive=heard and bool(msg.get("qemu_alive")),
            arbiter_ok=self.arbiter_ok,
            leader=self.leader,
            sync=self.sync,
            my_epoch=self.my_epoch,
            renew_sent_at=self.renew_sent_at,
            repl_ok=repl,
            checkpoint_stalled_s=self._stalled_s(now),
            peer_state=msg.get("state") if heard else None,
            intent=self.intent,
            give_up=self.give_up if self.state is State.PRIMARY else None,
            reprotect=self._may_reprotect(now),
            protection_off=self.switch is False,
            peer_ready=heard and bool(msg.get("ready")) and msg.get("role") == Role.SECONDARY.value,
            reprotecting=self.reprotecting,
            peer_reprotecting=peer_reprotecting,
            targeted=self.targeted,
            guest_stopped=self.qemu is not None and self.qemu.guest_shutdown,
            peer_guest_stopped_s=None
            if self.peer_guest_stop_seen is None
            else now - self.peer_guest_stop_seen,
            bring_up_failed=self.bring_up_failed,
            member=self.node.name in self.members,
            spare=spare,
            spare_heard=spare is not None and self.heartbeat.heard_from(spare, now, SPARE_HEARD_S),
            peer_silent_s=self.heartbeat.silent_s(now, self.spec.heartbeat.timeout_s),
            spare_after_s=None if spare is None else self.spec.reprotect.spare_after_s,
            peer_failed_starts=int(msg.get("failed_starts") or 0) if heard else 0,
        )

    def _stalled_s(self, now: float) -> float | None:
        q = self.qemu
        if q is None or not q.alive() or q.checkpoints.stopped_at is None:
            return None
        # A QEMU that froze itself (stopped, wedged) stalls its checkpoint too: until it
        # answers a question asked since, the hang verdict decides, not the stall (which
        # on a primary would clear sync and leave the secondary unable to take over).
        if not q.answered_since(q.checkpoints.stopped_at):
            return None
        return now - q.checkpoints.stopped_at

    def _note_detection(self, o: Observation) -> None:
        """One `detected` event per peer loss, for the timeline (and the demo's oracle)."""
        if self.state not in (State.PRIMARY, State.SECONDARY):
            return
        stalled = o.checkpoint_stalled_s is not None and o.checkpoint_stalled_s > STALL_LIMIT_S
        lost = not o.peer_qemu_alive or not o.repl_ok or stalled or o.give_up is not None
        if self.state is State.SECONDARY:
            lost = lost or (o.arbiter_ok and o.leader is None)
        if lost and not self.peer_lost_noted:
            what = "peer heartbeats stopped" if not o.peer_qemu_alive else "peer trouble"
            if o.peer_qemu_alive and not o.repl_ok:
                what = "replication-path heartbeats stopped"
            elif o.peer_qemu_alive and stalled:
                what = f"checkpoint stalled for {o.checkpoint_stalled_s:.1f} s"
            elif o.give_up is not None:
                what = f"{o.give_up} (policy: run alone)"
            elif o.arbiter_ok and o.leader is None and self.state is State.SECONDARY:
                what = "leader key gone"
            self.note("detected", f"{what} ({self.peer.name})", logging.WARNING)
            ages = [
                a
                for p in self.heartbeat.peer.paths
                if (a := self.heartbeat.peer.age(p, o.now)) is not None
            ]
            if ages:
                self.metrics.detection.labels(**self.metrics.labels).set(min(ages))
        self.peer_lost_noted = lost

    # ---------------------------------------------------------------- decide + execute

    def _lease_left(self) -> float | None:
        """Seconds until this leader must fence (None when it holds no lease)."""
        if self.renew_sent_at is None:
            return None
        return fence_at(self.renew_sent_at, self.timing) - time.monotonic()

    async def _bounded(self, call: Awaitable[None]) -> None:
        """An arbiter call that may never delay fencing: it ends at the fencing point."""
        left = self._lease_left()
        try:
            async with asyncio.timeout(None if left is None else max(0.0, left)):
                await call
        except TimeoutError:
            self.arbiter_ok, self.arbiter_error = False, "no answer before my fencing point"
        # Told after each call, not once a tick: a tick with a read and a renewal that
        # each take their whole deadline (0.4 s) after a calm wait (0.25 s) would leave
        # systemd's watchdog (WatchdogSec=1s) over a second without word.
        self.notifier.alive(self.pair)

    def _steady(self, now: float) -> bool:
        """Both sides settled in COLO, as far as this agent and the peer's heartbeats
        on every path tell, and nothing under way."""
        view, timeout = self.heartbeat.peer, self.spec.heartbeat.timeout_s
        peer = view.message or {}
        return (
            self.state in (State.PRIMARY, State.SECONDARY)
            and self.intent is None
            and (self.busy is None or self.busy.done())
            and self._in_colo()
            and not self.hung
            and all(view.fresh(p, now, timeout) for p in view.paths)
            and peer.get("state") in (State.PRIMARY.value, State.SECONDARY.value)
            and bool(peer.get("qemu_alive"))
            and not peer.get("qemu_hung")
            and bool(peer.get("in_colo"))
        )

    def _calm(self, now: float) -> bool:
        """Steady and protected, no checkpoint under way on either side and the
        comparison path proven: nothing to judge but what wakes the tick by itself
        (peer news or silence, a QEMU event or hang, the path watch's alarms, an
        intent), so it may tick at the calm pace."""
        q, msg = self.qemu, self.heartbeat.peer.message or {}
        return (
            q is not None
            and self.protection.protected
            and not self.path_broken
            and q.checkpoints.stopped_at is None
            and msg.get("stopped_for_s") is None
            and self._steady(now)
        )

    async def _tick(self) -> None:
        self.notifier.alive(self.pair)
        epoch = self.my_epoch
        now = time.monotonic()
        if read_due(now, self.read_at, self._steady(now)):
            self.read_at = now
            await self._bounded(self._read_arbiter())
        if self.my_epoch != epoch:
            # Leadership changed while we read (the bring-up acquired): that read is stale.
            if self.my_epoch is not None:
                self.leader = Leader(self.node.name, self.my_epoch)
            self.wake.set()
            return
        now = time.monotonic()
        o = self._observation(now)
        self._note_detection(o)
        d = decide(self.state, o, self.timing)
        changed = d.state is not self.state
        if d.state in TERMINAL and d.state is not State.SPARE and not changed and d.actions == ():
            d = Decision(d.state, (), self.reason)  # keep the reason that got us here
        if changed or d.reason != self.reason:
            level = logging.WARNING if d.state in (State.FENCED, State.ALONE) else logging.INFO
            self.note("state", f"{d.state.value}: {d.reason}", level)
        before = self.state
        self.state, self.reason = d.state, d.reason
        if self.state in TERMINAL:
            self.renew_sent_at = None  # never act on a lease again
        if changed:
            self._paced(before, now)
        if o.intent is not None and self.state in (State.PRIMARY, State.ALONE, State.FENCED):
            # A leader answers an intent once; the reason says how.
            self.intent = None
            self.intent_answer = {
                "node": self.node.name,
                "state": self.state.value,
                "reason": self.reason,
            }
            self.answered.set()
        for act in d.actions:
            if act is Act.FENCE:
                await self._execute(act, o)
            else:
                await self._bounded(self._execute(act, o))
        self._judged(self._protection(now, o))
        self._measure(now)
        if changed:
            self.heartbeat.send_now()

    def _measure(self, now: float) -> None:
        """Hand the metrics what grew since the last tick."""
        dt = 0.0 if self.metrics_at is None else now - self.metrics_at
        self.metrics_at = now
        m = self.metrics
        leading = self.state in (State.PRIMARY, State.ALONE)
        m.tick(self.state.value, leading, self.protection.protected, dt)
        if leading and not self.protection.protected:
            self.unprotected_s += dt
        q = self.qemu
        if q is not None:
            m.checkpoints_seen(q.checkpoints.count, q.checkpoints.pauses_ms, q.checkpoints.forced)
            if q.session is not None:
                m.qmp_seen(q.session.calls_total, q.session.calls)
        if self.probe is not None:
            m.probe_seen(self.probe.matched, self.probe.rtts_ms)
        m.compare_seen(self.compare.timeouts, self.compare.overflows)

    async def _execute(self, act: Act, o: Observation) -> None:
        try:
            if act is Act.FENCE:
                if self.qemu is not None and self.qemu.alive():
                    self.note("fence", "killing my QEMU (fence)", logging.WARNING)
                    self.qemu.kill()
            elif act is Act.RENEW:
                await self._renew()
            elif act is Act.RESIGN and self.my_epoch is not None:
                # Hand the lease over only once my QEMU is really gone.
                if self.qemu is not None and not await self.qemu.wait_exit(KILL_WAIT_S):
                    self.note("error", "QEMU not dead after SIGKILL; not resigning", logging.ERROR)
                    return
                epoch, self.my_epoch, self.renew_sent_at = self.my_epoch, None, None
                await self.arbiter.resign(self.pair, self.node.name, epoch)
                self.note("lease", f"resigned leadership (epoch {epoch})")
            elif act is Act.ACQUIRE:
                await self._acquire()
            elif act is Act.SET_SYNC and self.my_epoch is not None:
                if await self.arbiter.set_sync(self.pair, self.peer.name, self.my_epoch):
                    self.sync = self.peer.name
                    self.note("sync", f"{self.peer.name} named the sync node")
            elif act is Act.CLEAR_SYNC and self.my_epoch is not None:
                if await self.arbiter.clear_sync(self.pair, self.my_epoch):
                    self.sync = None
                    self.note("sync", "sync record cleared")
                    self.wake.set()
            elif act is Act.TAKEOVER:
                self._start_failover(failover.Action.SECONDARY_TAKES_OVER)
            elif act is Act.GO_ALONE:
                self._start_failover(failover.Action.PRIMARY_CONTINUES_ALONE)
            elif act is Act.REJOIN:
                await self._rejoin()
            elif act is Act.REPROTECT:
                self._start_reprotect()
            elif act is Act.ABANDON:
                self._abandon("the new secondary was lost")
            elif act is Act.TAKE_SPARE and o.spare is not None and self.my_epoch is not None:
                await self._take_spare(o.spare, self.my_epoch, spare_due(o) or "lost")
        except ColoftError as e:
            self.note("error", f"{act.value} failed: {e}", logging.ERROR)

    async def _renew(self) -> None:
        now = time.monotonic()
        every = self.timing.renew_every_s
        # On the beat: the agent's pairs renew on one tick, with one keep-alive.
        if self.my_epoch is None or not new_beat(every, self.renew_tried_at, now):
            return
        self.renew_tried_at = now
        try:
            ok = await self.arbiter.renew(self.pair, self.node.name, self.my_epoch)
        except ArbiterUnavailable as e:
            self.note("lease", f"renewal failed: {e}", logging.WARNING)
            return
        if ok:
            self.renew_sent_at = now
        else:
            self.note("lease", f"renewal refused: epoch {self.my_epoch} is over", logging.WARNING)

    async def _acquire(self) -> bool:
        sent = time.monotonic()
        got = await self.arbiter.acquire(
            self.pair, self.node.name, self.timing.ttl_s, self.members_recorded
        )
        if got is None:
            return False
        self.my_epoch, self.renew_sent_at, self.renew_tried_at = got.epoch, sent, sent
        self.leader = got
        self.note("lease", f"leadership acquired (epoch {got.epoch})", logging.WARNING)
        self.wake.set()
        return True

    async def _take_spare(self, spare: str, epoch: int, why: str) -> None:
        members = (self.node.name, spare)
        if not await self.arbiter.set_members(self.pair, members, epoch):
            return
        self.sync = None
        self.note("reprotect", f"{self.peer.name} {why}: taking the spare {spare} in")
        await self._members_read(members)
        self.wake.set()

    def _start_failover(self, action: failover.Action) -> None:
        if self.busy is not None and not self.busy.done():
            return
        # Why, as the verdict said before "failing-over" replaces it.
        why = self.give_up or ("protection-off" if self.switch is False else self.protection.code)
        self.metrics.failover(action.value, why)
        self.busy = asyncio.create_task(self._failover(action, why))

    async def _failover(self, action: failover.Action, why: str) -> None:
        assert self.qemu is not None and self.qemu.session is not None
        takeover = action is failover.Action.SECONDARY_TAKES_OVER
        steps = (
            failover.secondary_takeover(self.node.name)
            if takeover
            else failover.primary_continue_alone(self.node.name)
        )
        record: dict[str, Any] = {
            "action": action.value,
            "lost": self.peer.name,
            "survivor": self.node.name,
            "started_unix": time.time(),
            "done_unix": None,
            "steps": [],
            "error": None,
        }
        self.failover = record
        self.progress = ""
        self.note("failover", f"{action.value}: {len(steps)} QMP steps", logging.WARNING)

        def done(step: Step, took: float) -> None:
            record["steps"].append({"step": step.describe(), "ms": round(took * 1000, 1)})
            self.note("step", f"{step.describe()} ({took * 1000:.0f} ms)")

        try:
            sessions = {self.node.name: self.qemu.session}
            oob = {self.node.name: self.qemu.oob} if self.qemu.oob else {}
            await run_steps(sessions, steps, done, oob)
        except ColoftError as e:
            record["error"] = str(e)
            self.note("error", f"failover failed: {e}; fencing", logging.ERROR)
            self.qemu.kill()
        else:
            self.qemu.role = Role.PRIMARY
            self.note("failover", f"{self.node.name} serves alone", logging.WARNING)
            if not takeover and why != "protection-off":
                self.note(
                    "policy",
                    f"{why}: ran alone: secondary dropped",
                    logging.WARNING,
                    code=why,
                    policy=Policy.RUN_ALONE.value,
                    applied=True,
                )
        finally:
            record["done_unix"] = time.time()
            self.wake.set()

    # ---------------------------------------------------------------- re-protection

    def _may_reprotect(self, now: float) -> bool:
        """Re-protection wanted (the operator's switch when set, else the spec) and
        its backoff over."""
        wanted = self.spec.reprotect.auto if self.switch is None else self.switch
        return wanted and self.backoff.ready(now)

    def _paced(self, before: State, now: float) -> None:
        """Count a re-protection (either side) as done or failed, for the backoff."""
        if before is State.ALONE:
            # In COLO now, or fenced mid-way: either way no attempt is under way.
            self.reprotecting = False
        done = (
            (State.ALONE, State.PRIMARY),
            (State.STARTING, State.SECONDARY),
            (State.STARTING, State.PRIMARY),
        )
        if (before, self.state) in done:
            self.backoff = self.backoff.succeeded()
        elif before is State.STARTING and self.state in TERMINAL and self.state is not State.SPARE:
            self.bring_up_failed = True
            self.backoff = self.backoff.failed(now)
            self.note(
                "reprotect",
                f"starting failed; next try in {self.backoff.wait_s(now):.1f} s at the earliest",
                logging.WARNING,
            )

    async def _rejoin(self) -> None:
        """Start over as a fresh secondary: the old QEMU and its copy are discarded."""
        if self.joining is not None and not self.joining.done():
            return
        if self.busy is not None and not self.busy.done():
            self.busy.cancel()  # whatever the old incarnation was doing is over
        self.reprotecting = self.abandoning = False
        old = self.qemu
        if old is not None:
            await old.close()
            await asyncio.to_thread(old.cleanup)
        self.qemu, self.side, self.hung, self.ready = None, None, False, False
        self.failed_role = self.planned_role = None
        self.my_epoch, self.renew_sent_at = None, None
        self.targeted, self.peer_lost_noted = False, False
        self.channels = {}
        self.bring_up_failed = False
        self.note("reprotect", "starting over with a fresh QEMU")
        self.joining = asyncio.create_task(self._bring_up())

    def _start_reprotect(self) -> None:
        if self.busy is not None and not self.busy.done():
            return
        # Signs of the old pair's comparison path say nothing about the new one.
        self.give_up, self.path_broken = None, False
        self.compare = compare_log.CompareSigns()
        self.reconnector = policy.Reconnector()
        self.worst_unproven_s = 0.0
        self.reprotect = {
            "secondary": self.peer.name,
            "started_unix": time.time(),
            "colo_unix": None,
            "protected_unix": None,
            "disk_bytes": 0,
            "ram_bytes": 0,
            "synced_bytes": 0,
            "pause_ms": None,
            "steps": [],
            "error": None,
        }
        self.busy = asyncio.create_task(self._reprotect(self.reprotect))

    async def _reprotect(self, record: dict[str, Any]) -> None:
        q = self.qemu
        assert q is not None and q.session is not None
        former = q.launched_role is Role.SECONDARY
        steps = choreography.primary_reprotect(self.spec, self.node, self.peer, former)
        self.progress = f"checking {self.peer.name}'s disk export"
        paused: list[float] = []

        def done(step: Step, took: float) -> None:
            record["steps"].append({"step": step.describe(), "ms": round(took * 1000, 1)})
            if step.command == "stop":
                paused.append(time.monotonic() - took)
            if step.until is Until.MIGRATION_IN_COLO and paused:
                record["pause_ms"] = round((time.monotonic() - paused[0]) * 1000, 1)
            log.info("%s: %s (%.0f ms)", self.node.name, step.describe(), took * 1000)

        problem = await self._export_unreachable()
        if problem is not None:
            # Connecting the copy's target would block QEMU's main loop on a blackholed
            # port. Nothing was started: the peer keeps its secondary, and the wait
            # does not grow.
            record["error"] = problem
            self.progress = ""
            self.backoff = self.backoff.later(time.monotonic())
            self.note("reprotect", f"re-protection not started: {problem}", logging.WARNING)
            return
        self.reprotecting, self.abandoning = True, False
        self.note("reprotect", f"re-protecting with {self.peer.name}: copying disk and memory")
        self.heartbeat.send_now()
        self.sync_seen = reprotect.SyncProgress(started=time.monotonic())
        watch = asyncio.create_task(self._watch_sync(q, record))
        try:
            oob = {self.node.name: q.oob} if q.oob else {}
            await run_steps({self.node.name: q.session}, steps, done, oob)
        except ColoftError as e:
            record["error"] = str(e)
            watch.cancel()
            await self._abandoned(q, f"re-protection failed: {e}")
            return
        finally:
            watch.cancel()
            self.wake.set()
        record["colo_unix"] = time.time()
        self.metrics.reprotections.labels(**self.metrics.labels, result="in-colo").inc()
        # In COLO QEMU no longer reports the first copy's figures; it covered all of
        # the guest's memory (zero pages travel compressed: bytes brought in sync,
        # not bytes on the wire).
        memory = self.spec.vm.memory_mib << 20
        self.sync_seen = dataclasses.replace(self.sync_seen, ram_done=memory, ram_total=memory)
        self._count_sync(None, record)
        self.progress = ""
        self.note(
            "reprotect",
            f"{self.peer.name} is in COLO as my new secondary: "
            f"{record['synced_bytes'] / (1 << 20):.0f} MiB synced, "
            f"guest paused {record['pause_ms']} ms",
            disk_bytes=record["disk_bytes"],
            ram_bytes=record["ram_bytes"],
        )

    async def _export_unreachable(self) -> str | None:
        """Whether the new secondary's disk export takes a connection now."""
        host, nbd = self.peer.replication_address, port(self.peer, NBD)
        try:
            async with asyncio.timeout(EXPORT_CHECK_S):
                _, writer = await asyncio.open_connection(host, nbd)
        except (OSError, TimeoutError) as e:
            return f"disk export {host}:{nbd} of {self.peer.name} unreachable ({e or 'timeout'})"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    async def _watch_sync(self, q: LocalQemu, record: dict[str, Any]) -> None:
        """Progress of the disk copy and the first memory copy, for status and events;
        a re-protection that moves nothing for a while is abandoned."""
        last, since = (-1, -1), time.monotonic()
        while True:
            await self._sample_sync(q, record)
            self.progress = self.sync_seen.text()
            now = time.monotonic()
            moved = (self.sync_seen.synced_bytes, len(record["steps"]))
            if moved != last:
                last, since = moved, now
            elif now - since > SYNC_STALL_S:
                self._abandon(f"re-protection made no progress for {SYNC_STALL_S:.0f} s")
                return
            await asyncio.sleep(SYNC_POLL_S)

    async def _sample_sync(self, q: LocalQemu, record: dict[str, Any]) -> None:
        if q.session is None:
            return
        with contextlib.suppress(ColoftError):
            jobs = await q.session.execute("query-block-jobs", deadline_s=1.0)
            mig = await q.session.execute("query-migrate", deadline_s=1.0)
            self._count_sync(reprotect.read_block_job(jobs, choreography.RESYNC_JOB), record)
            ram = reprotect.read_ram(mig)
            if ram is not None:
                self.sync_seen = dataclasses.replace(
                    self.sync_seen, ram_done=ram[0], ram_total=ram[1]
                )
            self._count_sync(None, record)

    def _count_sync(self, disk: tuple[int, int] | None, record: dict[str, Any]) -> None:
        seen = self.sync_seen
        if disk is not None:
            # The copy only grows; a finished job's last event may beat the poll.
            seen = dataclasses.replace(
                seen,
                disk_done=max(seen.disk_done, disk[0]),
                disk_total=max(seen.disk_total, disk[1]),
            )
        self.sync_seen = dataclasses.replace(seen, at=time.monotonic())
        record["disk_bytes"], record["ram_bytes"] = (
            self.sync_seen.disk_done,
            self.sync_seen.ram_done,
        )
        record["synced_bytes"] = self.sync_seen.synced_bytes
        seen = self.sync_seen
        total = seen.disk_total + seen.ram_total
        self.metrics.resync_bytes.labels(**self.metrics.labels).set(seen.synced_bytes)
        self.metrics.resync_progress.labels(**self.metrics.labels).set(
            min(1.0, seen.synced_bytes / total) if total else 0.0
        )

    def _abandon(self, why: str) -> None:
        """Stop a re-protection whose secondary is gone, whatever step it is in."""
        if self.abandoning or self.qemu is None:
            return
        self.abandoning = True
        if self.busy is not None and not self.busy.done():
            self.busy.cancel()
        q = self.qemu
        self.busy = asyncio.create_task(self._abandoned(q, why))

    async def _abandoned(self, q: LocalQemu, why: str) -> None:
        self.abandoning = True
        self.note("reprotect", f"{why}; the guest runs on alone", logging.WARNING)
        try:
            oob = {self.node.name: q.oob} if q.oob else {}
            await run_steps(
                {self.node.name: q.session},  # type: ignore[dict-item]
                failover.abandon_reprotect(self.node.name),
                None,
                oob,
            )
        except ColoftError as e:
            self.note("error", f"undoing the re-protection failed: {e}", logging.ERROR)
        now = time.monotonic()
        self.metrics.reprotections.labels(**self.metrics.labels, result="abandoned").inc()
        self.backoff = self.backoff.failed(now)
        self.reprotecting = self.abandoning = False
        self.progress = ""
        if self.reprotect is not None and self.reprotect["error"] is None:
            self.reprotect["error"] = why
        wait = self.backoff.wait_s(now)
        self.note("reprotect", f"running alone; next re-protection in {wait:.1f} s at the earliest")
        self.heartbeat.send_now()
        self.wake.set()

    def _protection(self, now: float, o: Observation) -> health.Verdict:
        if self.state is State.ALONE and self.reprotecting:
            return health.Verdict(
                "unprotected",
                False,
                f"re-protecting with {self.peer.name}: {self.progress or 'in COLO'}",
                "reprotecting",
            )
        if self.state is State.ALONE and self.switch is False:
            return health.Verdict(
                "unprotected", False, "protection switched off by the operator", "protection-off"
            )
        if self.state is State.ALONE:
            return health.Verdict(
                "unprotected", False, f"running alone on {self.node.name}", "running-alone"
            )
        if self.state is State.STOPPED or (self.qemu is not None and self.qemu.guest_shutdown):
            return health.Verdict("stopped", False, self.reason, "guest-shutdown")
        if self.state in (State.FENCED, State.DOWN):
            return health.Verdict("failed", False, self.reason, self.state.value)
        if self.state is State.SPARE:
            return health.Verdict("spare", False, self.reason, "spare")
        if self.state is not State.PRIMARY:
            msg, heard, _ = self._peer(now)
            p = msg.get("protection") if heard else None
            if self.state is State.SECONDARY and isinstance(p, dict):
                return health.Verdict(
                    str(p["phase"]), bool(p["protected"]), str(p["reason"]), str(p.get("code", ""))
                )
            return health.Verdict("starting", False, self.reason, "starting")
        if self.busy is not None and not self.busy.done():
            return health.Verdict("failing-over", False, self.reason, "failing-over")
        msg, _, _ = self._peer(now)
        if not o.peer_qemu_alive:
            return health.Verdict("degraded", False, self.reason, "secondary-lost")
        if not o.repl_ok:
            return health.Verdict("degraded", False, self.reason, "replication-path-lost")
        if msg.get("qemu_hung"):
            return health.Verdict(
                "degraded",
                False,
                f"secondary {self.peer.name}: QEMU stalled (no answer in or out of band)",
                "secondary-stalled",
            )
        assert self.qemu is not None
        primary = self.side or SideStatus(self.node.name, "primary", self.qemu.pid, True)
        secondary = SideStatus(
            self.peer.name, "secondary", None, True, colo_mode=msg.get("colo_mode")
        )
        age, stopped = msg.get("checkpoint_age_s"), msg.get("stopped_for_s")
        cp = health.Checkpoints(
            count=int(msg.get("checkpoints") or 0),
            last_at=None if age is None else now - float(age),
            stopped_at=None if stopped is None else now - float(stopped),
        )
        interval = self.spec.tuning.checkpoint_interval_ms
        v = health.verdict(primary, secondary, cp, interval, now, self.qemu.checkpoints.stopped_at)
        if v.code == "checkpoint-stalled":
            # Name the replication channel that holds the checkpoint up, if one shows it.
            held = [
                b for b in channels.broken(self.channels, {}) if b.channel in ("migration", "nbd")
            ]
            if held:
                return health.Verdict(v.phase, False, f"{v.reason}: {held[0].text}", held[0].code)
        # A checkpoint request or a disk write the secondary never acknowledges: the
        # COLO thread waits for the reply with the guest still running, so neither a
        # stall nor the probe shows it, only the socket (policy: run alone).
        stuck = channels.replication_stuck(self.channels) if v.phase != "failed" else None
        if stuck is not None:
            return health.Verdict("degraded", False, f"{stuck.text}; {v.reason}", stuck.code)
        c = self.compare
        if c.unreadable is not None and v.phase != "failed":
            return health.Verdict(
                "degraded",
                False,
                "colo-compare stopped reading an input for good (malformed frame); "
                "nothing is compared any more",
                c.unreadable,
            )
        if not v.protected:
            return v
        if self.sync != self.peer.name:
            # Until the arbiter names it, the secondary may not take over: no protection.
            return health.Verdict(
                "starting",
                False,
                f"{v.reason}; naming {self.peer.name} the sync node",
                "sync-pending",
            )
        path = self._path_verdict(now, msg, v)
        # A broken channel fills the queues too: its reason comes first.
        if path.protected and compare_log.overflowing(c, now):
            return health.Verdict(
                "degraded",
                False,
                f"colo-compare queue full: {c.overflows} packets dropped so far "
                f"(max_queue_size {self.spec.tuning.max_queue_size})",
                "compare-queue-overflow",
            )
        return path

    def _path_verdict(self, now: float, msg: dict[str, Any], v: health.Verdict) -> health.Verdict:
        """Protected only while the comparison path itself is shown to work."""
        breaks = channels.broken(self.channels, msg.get("channels") or {})
        if self.probe is not None and self.qemu is not None:
            self.probe.collect()
            self.probe.settle(now, self.qemu.checkpoints.starts)
        probe = self.probe
        if probe is not None and probe.rtts_ms and not self.path_broken:
            # The margin a healthy pair keeps to the proof window (status, benchmark).
            self.worst_unproven_s = max(self.worst_unproven_s, probe.unproven_s(now))
        late = 0.0 if probe is None else probe.late_s(now)
        overdue = probe is not None and probe.overdue(now)
        # A conclusively broken channel degrades even while checkpoint flushes keep
        # the probe answered.
        if overdue or any(b.conclusive for b in breaks):
            if not self.path_broken:
                self.worst_unproven_s = 0.0  # the margin is a healthy pair's
            self.path_broken = True
            what = "; ".join(b.text for b in breaks) or "no channel identified"
            why = f"no probe reply for {late * 1000:.0f} ms; " if overdue else ""
            code = breaks[0].code if breaks else policy.PROBE_TIMEOUT
            reset = None if self.qemu is None else self.qemu.guest_reset_at
            if not breaks and reset is not None and now - reset < REBOOT_GRACE_S:
                # Unproven all the same, but the reason is the guest's own reboot.
                return health.Verdict(
                    "degraded",
                    False,
                    f"the guest rebooted {now - reset:.0f} s ago and does not answer the "
                    f"probe yet ({late * 1000:.0f} ms)",
                    "guest-rebooting",
                )
            return health.Verdict("degraded", False, f"comparison path broken: {why}{what}", code)
        if self.path_broken:
            streak = 0 if probe is None else probe.on_time_streak
            if probe is not None and (streak < PROBE_RECOVER_STREAK or probe.unproven_s(now) > 1.0):
                return health.Verdict(
                    "degraded",
                    False,
                    f"comparison path recovering: {streak}/{PROBE_RECOVER_STREAK} "
                    "probe replies on time, the last matched "
                    f"{probe.unproven_s(now):.1f} s ago",
                    "path-recovering",
                )
            self.path_broken = False
        if self.spec.vm.service is None:
            return v
        if self.probe is None or not self.probe.rtts_ms:
            return health.Verdict(
                "starting",
                False,
                f"{v.reason}; waiting for the first probe reply through colo-compare",
                "first-probe",
            )
        return health.Verdict(
            "protected", True, f"{v.reason}, probe {self.probe.rtts_ms[-1]:.0f} ms"
        )

    def _judged(self, v: health.Verdict) -> None:
        """Take the new verdict; a leader announces each new reason and applies its policy."""
        before, self.protection = self.protection, v
        if v.code == before.code or self.state not in (State.PRIMARY, State.ALONE):
            return
        if v.protected:
            self.give_up = None
            self.note("protection", f"protected again: {v.reason}", phase=v.phase, code="")
            r = self.reprotect
            if r is not None and r["colo_unix"] is not None and r["protected_unix"] is None:
                r["protected_unix"] = time.time()
                self.note(
                    "reprotect",
                    f"protected again with {self.peer.name}, "
                    f"{r['protected_unix'] - r['started_unix']:.1f} s after re-protection began",
                )
            return
        level = logging.WARNING
        self.note("protection", f"{v.phase}: {v.reason}", level, phase=v.phase, code=v.code)
        chosen = policy.policy_for(v.code, self.spec.policy)
        if chosen is None:
            return
        if chosen is not Policy.RUN_ALONE:
            self._note_policy(chosen, v.code)
        elif self.give_up is None and (self.giving_up is None or self.giving_up.done()):
            self.giving_up = asyncio.create_task(self._give_up(v.code))

    def _note_policy(self, chosen: Policy, code: str) -> None:
        self.note(
            "policy",
            f"{code}: {policy.meaning(chosen, code)}",
            logging.WARNING,
            code=code,
            policy=chosen.value,
            applied=policy.applied_at_once(chosen, code),
        )

    async def _give_up(self, code: str) -> None:
        """Drop the secondary for `code` once my QEMU has answered once more. A channel
        also closes when my own QEMU dies, and when its guest powers off (the secondary
        closes the checkpoint stream right after my QEMU emitted SHUTDOWN); the socket
        table can show the close before the exit or the event is read. Dropping the
        secondary then would clear sync and leave nobody to take over. A reply is only
        read after every event QEMU sent before it."""
        q = self.qemu
        if q is None or q.session is None:
            return
        while True:
            if q is not self.qemu or not q.alive():
                return
            try:
                await q.session.execute("query-status", deadline_s=0.5)
                break
            except ColoftError:
                # Dead or hung: its exit or the hang check decides, and sync stays.
                if await q.wait_exit(0.5):
                    return
        await asyncio.sleep(0)  # the event pump runs before this task resumes
        if q.guest_shutdown or not q.alive() or self.protection.protected:
            return
        if self.give_up is None and self.state in (State.PRIMARY, State.ALONE):
            self._note_policy(Policy.RUN_ALONE, code)
            self.give_up = code
            self.wake.set()

    def _reestablish(self, now: float) -> None:
        """Yank this host's half-open channel ends (policy re-establish)."""
        q = self.qemu
        msg, heard, _ = self._peer(now)
        if q is None or not heard or (self.busy is not None and not self.busy.done()):
            return
        if self.yanking is not None and not self.yanking.done():
            return
        dead = policy.dead_ends(self.channels, msg.get("channels") or {}, self.spec.policy)
        due = self.reconnector.due(now, dead)
        if due:
            self.yanking = asyncio.create_task(self._yank(q, due))

    async def _yank(self, q: LocalQemu, names: list[str]) -> None:
        steps = policy.reestablish(self.node.name, q.role, names)
        oob = {self.node.name: q.oob} if q.oob else {}
        try:
            await run_steps({self.node.name: q.session}, steps, None, oob)  # type: ignore[dict-item]
        except ColoftError as e:
            self.note("error", f"re-establishing {', '.join(names)} failed: {e}", logging.ERROR)
            return
        for n in names:
            code = f"{n}-disconnected"
            self.note(
                "policy",
                f"{code}: re-established: yanked my end {policy.CHARDEVS[q.role][n]}; "
                "the secondary reconnects",
                logging.WARNING,
                code=code,
                policy=Policy.REESTABLISH.value,
                applied=True,
            )

    # ---------------------------------------------------------------- loops

    async def _poll_qemu(self) -> None:
        full_at = 0.0
        while True:
            q = self.qemu
            if q is not None and q.alive() and (self.busy is None or self.busy.done()):
                now = time.monotonic()
                # Settled in COLO, COLO mode and migration status change by our own
                # steps or with a QEMU event; between those, the run state alone keeps
                # the monitor watched (hung) and a full answer every FULL_POLL_S bounds
                # staleness, unless QEMU is slow to answer the glance: then the full one
                # waits. Anywhere else (a bring-up entering COLO) every poll is full.
                settled = self.state in (State.PRIMARY, State.SECONDARY) and self._in_colo()
                before = self.side
                due = now - full_at >= FULL_POLL_S and not q.waiting()
                full = not settled or self.side_due or due
                if full:
                    # Cleared before asking: an event during the query asks again.
                    self.side_due, full_at = False, now
                    self.side = await q.query()
                elif self.side is not None and q.can_glance(self.side):
                    self.side = q.glance(self.side, now)
                else:
                    self.side = await q.query(self.side)
                if self.calm and _moved(before, self.side):
                    self.wake.set()  # e.g. out of COLO: the tick woken by the event saw it not yet
                hung = await q.hung(time.monotonic())
                if hung and not self.hung:
                    self.note(
                        "detected", "my QEMU is hung (no answer in or out of band)", logging.WARNING
                    )
                    self.wake.set()
                self.hung = hung
            else:
                self.side_due = True
                if q is not None:
                    q.skim()
            await asyncio.sleep(until_beat(POLL_S, time.monotonic()))

    async def _watch_path(self) -> None:
        """Channel sockets on both sides; the probe on the leader while in COLO."""
        while True:
            q = self.qemu
            seen = (self.channels, self.compare)
            if q is not None and q.alive() and self._in_colo():
                wanted = channels.endpoints(q.role, self.node, self.peer)
                try:
                    self.channels = channels.assess(sockets.tcp_sockets(), wanted)
                except OSError as e:
                    log.warning("cannot read the TCP socket table: %s", e)
                else:
                    self._reestablish(time.monotonic())
                self._read_link()
                if q.role is Role.PRIMARY:
                    lines = q.new_log_lines()
                    self.compare = compare_log.read_lines(self.compare, lines, time.monotonic())
            else:
                self.channels = {}
            probing = self.state is State.PRIMARY and self.spec.vm.service is not None
            if probing and self.probe_task is None:
                assert self.spec.vm.service is not None
                self.probe = IcmpProbe(
                    self.spec.vm.service[0], self.node.lan_address, paused=self._paused_s
                )
                self.probe_task = asyncio.create_task(self.probe.run())
            elif not probing and self.probe_task is not None:
                self.probe_task.cancel()
                self.probe_task, self.probe = None, None
            if self.calm and self._alarm(seen, time.monotonic()):
                self.wake.set()
            await asyncio.sleep(until_beat(CHANNEL_POLL_S, time.monotonic()))

    def _alarm(self, seen: tuple[dict[str, str], compare_log.CompareSigns], now: float) -> bool:
        """What a calm tick must not wait for: a channel or colo-compare sign changed,
        the probe overdue, a checkpoint under way (its stall is judged at once)."""
        q = self.qemu
        if (self.channels, self.compare) != seen or q is None:
            return True
        if q.checkpoints.stopped_at is not None:
            return True
        # Replies still unread can only make it overdue sooner (a spare wake, whose
        # verdict reads them): no read here.
        return self.probe is not None and self.probe.overdue(now)

    def _paused_s(self, since: float, until: float) -> float:
        """How long checkpoints stopped this QEMU's guest in between (the probe's clock)."""
        q = self.qemu
        return 0.0 if q is None else health.paused_s(q.checkpoints, since, until)

    def _read_link(self) -> None:
        if self.link_iface is None:
            # Looked up once; "" when no interface here holds the address.
            self.link_iface = link.iface_of(self.node.replication_address) or ""
        if self.link_iface:
            self.link = link.counters(self.link_iface)
            self.metrics.link_seen(self.link)

    def _qemu_event(self, kind: str, data: dict[str, object]) -> None:
        r = self.reprotect
        if kind in SYNC_EVENTS and data.get("device") == choreography.RESYNC_JOB and r:
            # The disk copy's own figures; it may end between two progress polls.
            offset, length = data.get("offset"), data.get("len")
            if isinstance(offset, int) and isinstance(length, int):
                self._count_sync((offset, length), r)
        # COLO_EXIT and the like: shown on the timeline; state comes from polling.
        self.side_due = True
        if kind in QEMU_EVENTS_SHOWN:
            self.note("qemu", f"QEMU event {kind} {data}", logging.WARNING)
            self.wake.set()

    def _qemu_exited(self) -> None:
        q = self.qemu
        if q is not None and q.guest_shutdown:
            self.note("qemu", f"my QEMU (pid {q.pid}) exited: the guest powered itself off")
        elif q is not None and not q.stopping:
            how = q.proc.death() if q.proc is not None else "unknown"
            self.note("detected", f"my QEMU (pid {q.pid}) exited ({how})", logging.WARNING)
        self.heartbeat.send_now()
        self.wake.set()

    async def _bring_up(self) -> None:
        try:
            await self._start()
        except ColoftError as e:
            # E.g. etcd stopped answering between two calls: this agent sits the
            # pair out; a leader's lease runs out and the tick loop fences it.
            self.note("error", f"bring-up failed: {e}", logging.ERROR)
            self.progress = f"bring-up failed: {e}"
            if self.qemu is not None:
                self.qemu.kill()
            self.failed_role = self.planned_role
        self.wake.set()

    async def _start(self) -> None:
        end = time.monotonic() + START_ARBITER_WAIT_S
        while True:
            await self._read_arbiter()
            if self.arbiter_ok:
                break
            if time.monotonic() > end:
                self.note("error", f"arbiter unreachable: {self.arbiter_error}", logging.ERROR)
                self.state, self.reason = State.DOWN, f"arbiter unreachable: {self.arbiter_error}"
                return
            await asyncio.sleep(0.5)
        if self.node.name not in self.members:
            a, b = self.members
            why = f"not a member of the pair ({a} and {b} run it): standing by as its spare"
            self.note("start", why)
            self.state, self.reason = State.SPARE, why
            return
        if self.leader is not None and self.leader.node == self.peer.name:
            # Whether the leader still brings the pair up, only its heartbeats say.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PEER_WAIT_S):
                    while self.heartbeat.peer.message is None:
                        self.peer_news.clear()
                        await self.peer_news.wait()
        msg, heard, _ = self._peer(time.monotonic())
        peer_state = msg.get("state") if heard else None
        role, why = first_role(
            self.node.name,
            self.spec.primary.name,
            self.leader,
            peer_state,
            rejoin=self._may_reprotect(time.monotonic()),
            source=self.source,
        )
        self.planned_role = role
        self.note("start", why)
        if role is None:
            if self.leader is not None and self.leader.node == self.node.name:
                await self.arbiter.resign(self.pair, self.node.name, self.leader.epoch)
            self.state, self.reason = State.DOWN, why
            return
        if role is Role.PRIMARY:
            if not await self._acquire():
                self.state, self.reason = State.DOWN, "another node took the lead first"
                return
            assert self.my_epoch is not None
            await self.arbiter.clear_sync(self.pair, self.my_epoch)
        if self.state in TERMINAL:
            return
        qemu = LocalQemu(
            self.spec, self.node, role, self.choice, self._qemu_exited, self._qemu_event
        )
        # Prepared before it counts as ours: until it is launched, no QEMU runs to watch.
        await qemu.prepare()
        if self.state in TERMINAL:  # fenced or stopped meanwhile: launch nothing
            await asyncio.to_thread(qemu.cleanup)
            return
        self.qemu = qemu
        await self._run_bring_up(role)

    async def _run_bring_up(self, role: Role) -> None:
        assert self.qemu is not None
        self.progress = "starting QEMU"
        await self.qemu.start()
        sessions = {self.node.name: self.qemu.session}
        started = time.monotonic()

        def done(step: Step, took: float) -> None:
            self.progress = f"{step.describe()} done"
            log.info("%s: %s (%.0f ms)", self.node.name, step.describe(), took * 1000)

        if role is Role.SECONDARY:
            steps = choreography.secondary_bringup(self.spec, self.peer, self.node)
            await run_steps(sessions, steps, done)  # type: ignore[arg-type]
            self.ready = True
            self.progress = "ready; waiting for the primary"
            self.heartbeat.send_now()
        else:
            self.progress = f"waiting for secondary {self.peer.name} to be ready"
            while not (self.heartbeat.peer.message or {}).get("ready"):
                self.peer_news.clear()
                await self.peer_news.wait()
            if self.state in TERMINAL:
                raise FatalError(f"bring-up abandoned: {self.reason}")
            steps = choreography.primary_bringup(self.spec, self.node, self.peer)
            await run_steps(sessions, steps, done)  # type: ignore[arg-type]
            self.progress = ""
        self.note(
            "start",
            f"bring-up as {role.value} done: {len(steps)} steps, "
            f"{time.monotonic() - started:.1f} s",
        )

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._tick()
            self.notifier.alive(self.pair)
            now = time.monotonic()
            self.calm = self._calm(now)
            wait = until_beat(CALM_TICK_S if self.calm else TICK_S, now)
            if self.renew_sent_at is not None:
                # A leader renews on its beat and never sleeps past its fencing point.
                wait = min(wait, until_beat(self.timing.renew_every_s, now))
                left = fence_at(self.renew_sent_at, self.timing) - now
                wait = max(MIN_WAIT_S, min(wait, left))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()
            self.wake.clear()

    async def run(self, stop: asyncio.Event) -> None:
        await self.heartbeat.open()
        server = await api.serve(api.socket_path(self.spec, self.node.name), self)
        self.notifier.ready()
        crashed = False
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self.heartbeat.run()),
                    tg.create_task(self._poll_qemu()),
                    tg.create_task(self._bring_up()),
                    tg.create_task(self._watch_path()),
                ]
                await self._tick_loop(stop)
                for t in helpers:
                    t.cancel()
        except Exception:
            crashed = True
            raise
        finally:
            server.close()
            self.notifier.forget(self.pair)
            if stop.is_set():
                self.notifier.stopping()
            await self.shutdown(on_purpose=not crashed)

    async def shutdown(self, on_purpose: bool = True) -> None:
        """Stop on purpose: the secondary must not take over, so clear sync first and
        resign. After a failed loop, stop our QEMU as a dead agent's would stop and
        leave the lease and sync record, so that an in-sync peer takes over as from
        any agent death."""
        for task in (self.busy, self.probe_task, self.yanking, self.joining):
            if task is not None:
                task.cancel()
        epoch = self.my_epoch if on_purpose else None
        if epoch is not None:
            with contextlib.suppress(ColoftError):
                await self.arbiter.clear_sync(self.pair, epoch)
        if self.qemu is not None:
            try:
                await self.qemu.close()
            except Exception:
                if on_purpose:
                    raise
                # After a failure the session may be what broke: QEMU must stop anyway.
            self.qemu.cleanup()
        if epoch is not None:
            with contextlib.suppress(ColoftError):
                await self.arbiter.resign(self.pair, self.node.name, epoch)
        self.heartbeat.close()
        api.socket_path(self.spec, self.node.name).unlink(missing_ok=True)
        if on_purpose:
            self.note("stop", "agent stopped")
        else:
            self.note(
                "stop", "agent loop failed: QEMU stopped, lease left to expire", logging.ERROR
            )

    # ---------------------------------------------------------------- API

    def protection_summary(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "phase": self.protection.phase,
            "protected": self.protection.protected,
            "protection_reason": self.protection.reason,
            "protection_code": self.protection.code,
        }

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        msg, heard, repl = self._peer(now)
        view = self.heartbeat.peer
        q = self.qemu
        cp = q.checkpoints if q else health.Checkpoints()
        age = cp.age(now)
        leader = self.leader
        return {
            "vm": self.pair,
            "node": self.node.name,
            "peer": self.peer.name,
            "members": list(self.members),
            "agent_pid": os.getpid(),
            "boot": self.boot,
            "state": self.state.value,
            "role": None if q is None else q.role.value,
            "reason": self.reason,
            "progress": self.progress,
            "epoch": self.my_epoch,
            "leader": None if leader is None else {"node": leader.node, "epoch": leader.epoch},
            "sync": self.sync,
            "source": self.source,
            "protection_switch": {True: "on", False: "off", None: "spec"}[self.switch],
            "arbiter": {"ok": self.arbiter_ok, "error": self.arbiter_error},
            "qemu": {
                "pid": None if q is None else q.pid,
                "alive": q is not None and q.alive(),
                "hung": self.hung,
                "in_checkpoint_ms": None
                if cp.stopped_at is None
                else round((now - cp.stopped_at) * 1000, 1),
                **(
                    {}
                    if self.side is None
                    else {
                        "run_state": self.side.run_state,
                        "colo_mode": self.side.colo_mode,
                        "migration": self.side.migration,
                        "qmp_ms": self.side.qmp_ms,
                    }
                ),
            },
            "peer_health": {
                "heard": heard,
                "replication": repl,
                "state": msg.get("state"),
                "qemu_alive": bool(msg.get("qemu_alive")) and heard,
                "paths_ms": {
                    p: (None if (a := view.age(p, now)) is None else round(a * 1000, 1))
                    for p in view.paths
                },
                "rejected_heartbeats": self.heartbeat.rejected,
                "clock_offset_ms": None
                if (off := view.clock_offset_s()) is None
                else round(off * 1000, 1),
            },
            "phase": self.protection.phase,
            "protected": self.protection.protected,
            "protection_reason": self.protection.reason,
            "protection_code": self.protection.code,
            "unprotected_s": round(self.unprotected_s, 1),
            "checkpoints": {
                "count": cp.count,
                "forced": cp.forced,
                "per_min": cp.per_minute(now),
                "last_age_s": None if age is None else round(age, 3),
                "last_pause_ms": None if cp.last_pause_ms is None else round(cp.last_pause_ms, 1),
                "pause_ms_p50": _one_decimal(health.percentile(cp.pauses_ms, 50)),
                "pause_ms_p99": _one_decimal(health.percentile(cp.pauses_ms, 99)),
                "interval_ms": self.spec.tuning.checkpoint_interval_ms,
            },
            "probe": None
            if self.probe is None
            else {
                "sent": self.probe.sent,
                "matched_rtt_ms_p50": _one_decimal(health.percentile(list(self.probe.rtts_ms), 50)),
                "matched_rtt_ms_p99": _one_decimal(health.percentile(list(self.probe.rtts_ms), 99)),
                "flushed_by_checkpoint": self.probe.flushed,
                "worst_unmatched_s": round(self.worst_unproven_s, 3),
            },
            "compare": {
                # Primary packets released by a forced checkpoint after compare_timeout.
                "timed_out_packets": self.compare.timeouts,
                "dropped_packets": self.compare.overflows,
                "unreadable": self.compare.unreadable,
            },
            "replication_link": {"iface": self.link_iface, **self.link},
            "failover": self.failover,
            "reprotect": self.reprotect,
            "events": list(self.events),
            "updated_unix": time.time(),
        }

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def events_since(self, since: float) -> list[dict[str, Any]]:
        """Journal events after `since`: more than the status keeps."""
        return journal.read(self.journal.path, since)

    async def request_protection(self, on: bool) -> dict[str, Any]:
        """The operator's switch: only the leader writes it (under its epoch)."""
        if self.state not in (State.PRIMARY, State.ALONE) or self.my_epoch is None:
            raise ColoftError(f"{self.node.name} does not lead this pair ({self.state.value})")
        if not await self.arbiter.set_protection(self.pair, on, self.my_epoch):
            raise ColoftError(f"{self.node.name}: leadership changed; ask the new leader")
        self.switch = on
        self.backoff = self.backoff.succeeded()  # an operator's word starts afresh
        self.note("intent", f"operator switched protection {'on' if on else 'off'}")
        self.heartbeat.send_now()
        self.wake.set()
        return {"node": self.node.name, "state": self.state.value, "protection": on}

    async def request_failover(self, force: bool) -> dict[str, Any]:
        """An operator's failover: the leader hands over (or refuses); a forced
        secondary may then acquire without `sync`."""
        self.intent = Intent.FORCE_FAILOVER if force else Intent.FAILOVER
        self.intent_until = time.monotonic() + self.timing.ttl_s + 2.0
        self.intent_answer = None
        self.answered.clear()
        self.note("intent", f"operator asked for {'forced ' if force else ''}failover")
        self.wake.set()
        if self.state in (State.PRIMARY, State.ALONE):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INTENT_ANSWER_S):
                    await self.answered.wait()
            if self.intent_answer is not None:
                return self.intent_answer
        return {"node": self.node.name, "state": self.state.value, "reason": self.reason}


def _moved(before: SideStatus | None, after: SideStatus | None) -> bool:
    """Whether QEMU's answer changed anything the verdicts read (not its timing)."""
    if before is None or after is None:
        return before is not after
    return dataclasses.replace(before, qmp_ms=None) != dataclasses.replace(after, qmp_ms=None)


def _one_decimal(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
