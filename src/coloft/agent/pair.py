"""Bring up, observe, fail over and tear down one COLO pair whose two nodes this
process reaches.

In the lab both nodes are namespaces of this machine, so one supervisor drives
both QEMUs and its kill of a QEMU is the fence. Per-host agents that run
core.ha against the etcd lease replace this where the nodes are separate hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coloft.core import choreography, failover, health
from coloft.core.argv import RunPaths, qemu_argv, tap_name
from coloft.effects import tap
from coloft.effects.executor import run_steps
from coloft.effects.process import QemuProcess, launch, wait_started
from coloft.effects.qemu_binary import QemuChoice
from coloft.effects.qmp import QmpSession
from coloft.errors import ColoftError, FatalError
from coloft.model.spec import NodeSpec, PairSpec
from coloft.model.status import PairStatus, SideStatus
from coloft.model.steps import Role, Step

log = logging.getLogger(__name__)

QUERY_DEADLINE_S = 0.5
# A QEMU silent on QMP for this long is hung (e.g. SIGSTOP) and gets killed.
HUNG_AFTER_S = 1.0
# The out-of-band monitor runs in its own thread: only a stopped or dead QEMU misses this.
OOB_PROBE_S = 0.5
TICK_S = 0.5
Progress = Callable[[Step, float], None]


@dataclass
class FailoverRecord:
    action: str
    lost: str
    survivor: str
    lost_at: float
    detected_at: float
    done_at: float | None = None
    error: str | None = None

    @property
    def detected_ms(self) -> float:
        return (self.detected_at - self.lost_at) * 1000.0

    @property
    def steps_ms(self) -> float | None:
        return None if self.done_at is None else (self.done_at - self.detected_at) * 1000.0


def status_path(spec: PairSpec) -> Path:
    return Path(os.environ.get("COLOFT_RUN", "/run/coloft")) / spec.vm.name / "status.json"


def _qemu_img_create(path: Path, size: int) -> None:
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FatalError(f"qemu-img create {path}: {done.stderr.strip()}")


class Pair:
    def __init__(self, spec: PairSpec, choice: QemuChoice) -> None:
        self.spec = spec
        self.choice = choice
        self.procs: dict[str, QemuProcess] = {}
        self.sessions: dict[str, QmpSession] = {}
        self.oob: dict[str, QmpSession] = {}
        self.checkpoints = health.Checkpoints()
        self.roles = {spec.primary.name: Role.PRIMARY, spec.secondary.name: Role.SECONDARY}
        # Set when something changed that the supervisor must look at now (a QEMU exited).
        self.wake = asyncio.Event()
        self.exited_at: dict[str, float] = {}
        self.alone: str | None = None
        self.failovers: list[FailoverRecord] = []
        self.refused: str | None = None
        self.stopping = False
        # The primary's own STOP/RESUME per checkpoint: a checkpoint that never ends.
        self.primary_checkpoints = health.Checkpoints()
        # What the supervisor did, newest last, for the live view: (wall time, text).
        self.events: deque[tuple[float, str]] = deque(maxlen=50)

    def note(self, text: str, level: int) -> None:
        self.events.append((time.time(), text))
        log.log(level, "%s: %s", self.spec.vm.name, text)

    def _on_secondary_event(self, kind: str, data: dict[str, object], now: float) -> None:
        self.checkpoints = health.on_event(self.checkpoints, kind, now)

    def _on_primary_event(self, kind: str, data: dict[str, object], now: float) -> None:
        self.primary_checkpoints = health.on_event(self.primary_checkpoints, kind, now)

    def _prepare(self, node: NodeSpec, role: Role) -> RunPaths:
        paths = RunPaths(self.spec.run_dir_of(node))
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (paths.qmp, paths.qmp_oob, paths.pidfile):
            stale.unlink(missing_ok=True)
        disk = self.spec.disk_of(node)
        if not disk.is_file():
            raise FatalError(f"{node.name}: disk image {disk} does not exist")
        if role is Role.SECONDARY:
            size = disk.stat().st_size
            _qemu_img_create(paths.active, size)
            _qemu_img_create(paths.hidden, size)
        tap.ensure_tap(node.netns, tap_name(self.spec), node.bridge)
        return paths

    async def start_node(self, node: NodeSpec, role: Role) -> None:
        paths = self._prepare(node, role)
        argv = qemu_argv(self.spec, node, role, self.choice.binary, self.choice.accel)
        proc = launch(node.name, argv, node.netns, paths.run_dir)
        self.procs[node.name] = proc
        self._watch_exit(node.name, proc)
        await wait_started(proc, paths.qmp)
        on_event = self._on_secondary_event if role is Role.SECONDARY else self._on_primary_event
        name = f"{self.spec.vm.name}/{node.name}"
        session = QmpSession(name, paths.qmp, on_event)
        await session.connect()
        self.sessions[node.name] = session
        oob = QmpSession(f"{name}/oob", paths.qmp_oob)
        await oob.connect()
        self.oob[node.name] = oob

    def _watch_exit(self, node: str, proc: QemuProcess) -> None:
        """Learn of a QEMU's death the moment it happens (pidfd), not at the next poll."""
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(proc.pid)

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self.exited_at.setdefault(node, time.monotonic())
            level = logging.INFO if self.stopping else logging.WARNING
            log.log(level, "%s: QEMU of node %s exited", self.spec.vm.name, node)
            self.wake.set()

        loop.add_reader(fd, exited)

    async def up(self, progress: Progress | None = None) -> None:
        """Launch both QEMUs and run the bring-up; on any failure tear everything down."""
        started = time.monotonic()
        try:
            await self.start_node(self.spec.secondary, Role.SECONDARY)
            await self.start_node(self.spec.primary, Role.PRIMARY)
            steps = choreography.bringup(self.spec)
            await run_steps(self.sessions, steps, progress)
            self.note(
                f"bring-up done: {len(steps)} QMP steps, {time.monotonic() - started:.1f} s",
                logging.INFO,
            )
        except BaseException as e:
            detail = self._dead_process_detail()
            await self.down()
            if detail and isinstance(e, ColoftError):
                raise FatalError(f"{e}\n{detail}") from e
            raise

    def _dead_process_detail(self) -> str:
        return "\n".join(p.failure() for p in self.procs.values() if not p.alive())

    async def _observe_side(self, node: NodeSpec) -> SideStatus:
        role = self.roles[node.name].value
        proc = self.procs.get(node.name)
        session = self.sessions.get(node.name)
        if proc is None or session is None or not proc.alive():
            return SideStatus(node.name, role, proc.pid if proc else None, False)
        try:
            t0 = time.monotonic()
            run = await session.execute("query-status", deadline_s=QUERY_DEADLINE_S)
            qmp_ms = (time.monotonic() - t0) * 1000.0
            colo = await session.execute("query-colo-status", deadline_s=QUERY_DEADLINE_S)
            mig = await session.execute("query-migrate", deadline_s=QUERY_DEADLINE_S)
        except ColoftError as e:
            return SideStatus(node.name, role, proc.pid, True, error=str(e))
        return SideStatus(
            node.name,
            role,
            proc.pid,
            True,
            run_state=run.get("status"),
            colo_mode=colo.get("mode"),
            colo_reason=colo.get("reason"),
            migration=mig.get("status"),
            qmp_ms=round(qmp_ms, 2),
        )

    def _node_in_role(self, role: Role) -> NodeSpec:
        return next(n for n in self.spec.nodes if self.roles[n.name] is role)

    async def handle_failures(self, progress: Progress | None = None) -> None:
        """Fail over when one side is gone: the decision is core.failover.decide's."""
        if self.alone is not None:
            return
        silent = {n: t for n, q in self.sessions.items() if (t := q.silent_since) is not None}
        for node in failover.unresponsive(silent, time.monotonic(), HUNG_AFTER_S):
            proc = self.procs.get(node)
            if proc is None or not proc.alive():
                continue
            if await self._answers_out_of_band(node):
                # Its main loop waits (e.g. a checkpoint blocked on a stalled peer) but
                # the process runs: fencing it would kill the side that still works.
                continue
            self.note(
                f"{node}: QEMU silent for {HUNG_AFTER_S:.0f} s, also out-of-band: "
                "killing it (fence)",
                logging.WARNING,
            )
            self.exited_at.setdefault(node, time.monotonic())
            proc.kill()
        p, s = self._node_in_role(Role.PRIMARY), self._node_in_role(Role.SECONDARY)
        alive = {n: n in self.procs and self.procs[n].alive() for n in (p.name, s.name)}
        decision = failover.decide(
            SideStatus(p.name, "primary", None, alive[p.name]),
            SideStatus(s.name, "secondary", None, alive[s.name]),
            in_sync=self.checkpoints.count > 0,
        )
        if decision.action is failover.Action.REFUSE:
            if self.refused is None:
                self.note(decision.reason, logging.ERROR)
            self.refused = decision.reason
            return
        if decision.action is failover.Action.NONE:
            return
        takeover = decision.action is failover.Action.SECONDARY_TAKES_OVER
        lost, survivor = (p, s) if takeover else (s, p)
        steps = (
            failover.secondary_takeover(survivor.name)
            if takeover
            else failover.primary_continue_alone(survivor.name)
        )
        detected = time.monotonic()
        record = FailoverRecord(
            decision.action.value,
            lost.name,
            survivor.name,
            self.exited_at.get(lost.name, detected),
            detected,
        )
        self.failovers.append(record)
        self.note(
            f"{decision.reason} (detected {record.detected_ms:.0f} ms after exit)", logging.WARNING
        )
        await self._forget(lost.name)

        def step_done(step: Step, took: float) -> None:
            self.note(f"  {step.describe()} ({took * 1000:.0f} ms)", logging.INFO)
            if progress is not None:
                progress(step, took)

        try:
            await run_steps(self.sessions, steps, step_done, self.oob)
        except ColoftError as e:
            record.error = str(e)
            self.note(f"failover failed: {e}", logging.ERROR)
            raise
        finally:
            record.done_at = time.monotonic()
        self.note(
            f"{survivor.name} serves alone; failover took {record.steps_ms:.0f} ms of QMP",
            logging.WARNING,
        )
        self.roles[survivor.name] = Role.PRIMARY
        self.roles[lost.name] = Role.SECONDARY
        self.alone = survivor.name

    async def _answers_out_of_band(self, node: str) -> bool:
        oob = self.oob.get(node)
        if oob is None:
            return False
        try:
            await oob.execute("query-yank", deadline_s=OOB_PROBE_S, oob=True)
        except ColoftError:
            return False
        return True

    async def _forget(self, node: str) -> None:
        for sessions in (self.sessions, self.oob):
            session = sessions.pop(node, None)
            if session is not None:
                await session.close()
        proc = self.procs.get(node)
        if proc is not None:
            proc.kill()

    async def observe(self) -> PairStatus:
        now = time.monotonic()
        primary, secondary = await asyncio.gather(
            self._observe_side(self._node_in_role(Role.PRIMARY)),
            self._observe_side(self._node_in_role(Role.SECONDARY)),
        )
        cp = self.checkpoints
        interval = self.spec.tuning.checkpoint_interval_ms
        v = health.verdict(
            primary, secondary, cp, interval, now, self.primary_checkpoints.stopped_at
        )
        if self.alone is not None:
            v = health.Verdict(
                "unprotected",
                False,
                f"running alone on {self.alone} since failover ({self.failovers[-1].lost} lost)",
            )
        elif self.refused is not None:
            v = health.Verdict("failed", False, self.refused)
        age = cp.age(now)
        return PairStatus(
            vm=self.spec.vm.name,
            phase=v.phase,
            protected=v.protected,
            reason=v.reason,
            checkpoints=cp.count,
            checkpoints_per_min=cp.per_minute(now),
            last_checkpoint_age_s=None if age is None else round(age, 3),
            last_pause_ms=None if cp.last_pause_ms is None else round(cp.last_pause_ms, 1),
            checkpoint_interval_ms=interval,
            sides=(primary, secondary),
            supervisor_pid=os.getpid(),
            updated_unix=time.time(),
        )

    async def down(self) -> None:
        self.stopping = True
        for session in (*self.sessions.values(), *self.oob.values()):
            await session.close()
        self.sessions.clear()
        self.oob.clear()
        self.cleanup()

    def cleanup(self) -> None:
        """Kill both QEMUs by pid and remove taps and run files; needs no event loop."""
        self.stopping = True
        self.sessions.clear()
        self.oob.clear()
        for proc in self.procs.values():
            proc.kill()
        self.procs.clear()
        for node in self.spec.nodes:
            tap.remove_tap(node.netns, tap_name(self.spec))
            paths = RunPaths(self.spec.run_dir_of(node))
            for f in (paths.qmp, paths.qmp_oob, paths.active, paths.hidden, paths.pidfile):
                f.unlink(missing_ok=True)


def publish(spec: PairSpec, status: PairStatus | None) -> None:
    """Write the status file `coloft status` reads (atomically), or remove it."""
    path = status_path(spec)
    if status is None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status.to_json(), indent=1))
    tmp.replace(path)


async def supervise(
    pair: Pair,
    stop: asyncio.Event,
    tick_s: float = TICK_S,
    on_status: Callable[[PairStatus], None] | None = None,
) -> PairStatus:
    """Observe and publish until asked to stop; returns the last status."""
    last_phase, last_reason = "", ""
    await pair.handle_failures()
    status = await pair.observe()
    while True:
        publish(pair.spec, status)
        # A protected pair's reason changes every tick (checkpoint age): note phases.
        if status.phase != last_phase or (
            status.phase != "protected" and status.reason != last_reason
        ):
            pair.note(f"{status.phase}: {status.reason}", logging.INFO)
        last_phase, last_reason = status.phase, status.reason
        if on_status is not None:
            on_status(status)
        await _sleep_until(tick_s, stop, pair.wake)
        pair.wake.clear()
        if stop.is_set():
            return status
        await pair.handle_failures()
        status = await pair.observe()


async def _sleep_until(timeout_s: float, *events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def remove_run_dirs(spec: PairSpec) -> None:
    for node in spec.nodes:
        shutil.rmtree(spec.run_dir_of(node), ignore_errors=True)
