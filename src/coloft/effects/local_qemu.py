"""One QEMU on this host: launch, its QMP monitors, exit and hang detection, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from coloft.core import health
from coloft.core.argv import RunPaths, qemu_argv, tap_name
from coloft.effects import tap
from coloft.effects.process import QemuProcess, launch, wait_started
from coloft.effects.qemu_binary import QemuChoice
from coloft.effects.qmp import QmpSession
from coloft.effects.qmp_poll import QmpPoll
from coloft.errors import ColoftError, FatalError
from coloft.model.spec import NodeSpec, PairSpec
from coloft.model.status import SideStatus
from coloft.model.steps import Role

log = logging.getLogger(__name__)

QUERY_DEADLINE_S = 0.5
# A QEMU whose main monitor stays silent this long is asked out of band whether it runs.
# Silence alone proves little (a primary waits in a checkpoint on a stalled peer); the
# out-of-band answer decides.
HUNG_AFTER_S = 0.5
# The out-of-band monitor runs in its own thread: only a stopped or wedged QEMU misses this.
OOB_PROBE_S = 0.3


def _qemu_img_create(path: Path, size: int) -> None:
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FatalError(f"qemu-img create {path}: {done.stderr.strip()}")


class LocalQemu:
    """The QEMU of one node. `on_exit` runs in the event loop the moment it exits;
    `on_event` gets QEMU's events other than the STOP/RESUME of each checkpoint."""

    def __init__(
        self,
        spec: PairSpec,
        node: NodeSpec,
        role: Role,
        choice: QemuChoice,
        on_exit: Callable[[], None] | None = None,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.node = node
        self.role = role
        # A former secondary keeps its filter-rewriter after taking over (core.choreography).
        self.launched_role = role
        self.choice = choice
        self.on_exit = on_exit
        self.on_event = on_event
        self.paths = RunPaths(spec.run_dir_of(node))
        self.proc: QemuProcess | None = None
        self.session: QmpSession | None = None
        self.oob: QmpSession | None = None
        self.poll: QmpPoll | None = None
        self.exited_at: float | None = None
        self.exited = asyncio.Event()
        self.stopping = False
        self.prepared = False
        # STOP -> RESUME pairs of this QEMU: one per checkpoint, on either side.
        self.checkpoints = health.Checkpoints()
        self._log_offset = 0
        # The guest's own doing: it powered off (then QEMU exits 0), or it rebooted.
        self.guest_shutdown = False
        self.guest_reset_at: float | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.exited_at is None and self.proc.alive()

    def _on_event(self, kind: str, data: dict[str, object], now: float) -> None:
        interval_s = self.spec.tuning.checkpoint_interval_ms / 1000.0
        self.checkpoints = health.on_event(self.checkpoints, kind, now, interval_s)
        if kind == "SHUTDOWN" and data.get("guest"):
            self.guest_shutdown = True
        elif kind == "RESET" and data.get("guest"):
            self.guest_reset_at = now
        if kind not in ("STOP", "RESUME") and self.on_event is not None:
            self.on_event(kind, data)

    async def prepare(self) -> None:
        """Run directory, overlays and tap, off the event loop: qemu-img and ip take tens
        of ms each on a busy host, which in the loop would silence the heartbeats of the
        agent's other pairs."""
        await asyncio.to_thread(self._prepare)
        self.prepared = True

    def _prepare(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        p = self.paths
        for stale in (p.qmp, p.qmp_oob, p.qmp_watch, p.qmp_poll, p.pidfile):
            stale.unlink(missing_ok=True)
        disk = self.spec.disk_of(self.node)
        if not disk.is_file():
            raise FatalError(f"{self.node.name}: disk image {disk} does not exist")
        try:
            if self.role is Role.SECONDARY:
                size = disk.stat().st_size
                _qemu_img_create(self.paths.active, size)
                _qemu_img_create(self.paths.hidden, size)
            tap.ensure_tap(self.node.netns, tap_name(self.spec), self.node.bridge)
        except BaseException:
            # Nothing half-made stays behind: this QEMU never becomes the agent's to clean.
            self.cleanup()
            raise

    async def start(self) -> None:
        """Launch QEMU and connect its monitors; a QEMU that fails to start is named."""
        if not self.prepared:
            await self.prepare()
        argv = qemu_argv(self.spec, self.node, self.role, self.choice.binary, self.choice.accel)
        # The agent already runs inside the node's namespace when it has one.
        netns = self.node.netns if _outside(self.node.netns) else None
        self.proc = launch(self.node.name, argv, netns, self.paths.run_dir)
        self._watch_exit(self.proc)
        try:
            await wait_started(self.proc, self.paths.qmp)
            name = f"{self.spec.vm.name}/{self.node.name}"
            self.session = QmpSession(name, self.paths.qmp, self._on_event)
            await self.session.connect()
            self.oob = QmpSession(f"{name}/oob", self.paths.qmp_oob)
            await self.oob.connect()
            self.poll = QmpPoll(f"{name}/poll", self.paths.qmp_poll)
            await self.poll.connect()
        except ColoftError as e:
            if self.proc is not None and not self.proc.alive():
                raise FatalError(f"{e}\n{self.proc.failure()}") from e
            raise

    def new_log_lines(self, limit: int = 1 << 20) -> list[str]:
        """Whole lines QEMU wrote to its stderr file since the last call."""
        if self.proc is None:
            return []
        try:
            # Asked ten times a second; QEMU seldom writes.
            if os.stat(self.proc.stderr_path).st_size <= self._log_offset:
                return []
            with open(self.proc.stderr_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read(limit)
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        return data[:end].decode(errors="replace").splitlines()

    def _watch_exit(self, proc: QemuProcess) -> None:
        """Learn of QEMU's death the moment it happens (pidfd), not at the next poll."""
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(proc.pid)

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if self.exited_at is None:
                self.exited_at = time.monotonic()
            # coloft never asks a running QEMU to quit: a clean exit is the guest's.
            if proc.popen.poll() == 0 and not self.stopping:
                self.guest_shutdown = True
            self.exited.set()
            level = logging.INFO if self.stopping else logging.WARNING
            log.log(level, "%s: QEMU pid %d exited", self.node.name, proc.pid)
            if self.on_exit is not None:
                self.on_exit()

        loop.add_reader(fd, exited)

    async def query(self, last: SideStatus | None = None) -> SideStatus:
        """Run state, COLO mode and migration status, each call bounded; errors become
        part of the status. Given the last full answer, only the run state is asked
        for and the rest kept (the cheap poll between full ones)."""
        role = self.role.value
        if self.proc is None or self.session is None or not self.alive():
            return SideStatus(self.node.name, role, self.pid, False)
        session = self.session
        t0 = time.monotonic()
        answered_at = t0

        async def run_state() -> dict[str, Any]:
            nonlocal answered_at
            answer: dict[str, Any] = await session.execute(
                "query-status", deadline_s=QUERY_DEADLINE_S
            )
            answered_at = time.monotonic()
            return answer

        self.skim()
        try:
            if last is not None and last.alive and last.error is None and last.role == role:
                run = await run_state()
                qmp_ms = round((answered_at - t0) * 1000.0, 2)
                return replace(last, run_state=run.get("status"), qmp_ms=qmp_ms)
            # Asked together: QEMU answers in order, and the loop wakes once or twice, not
            # three times.
            run, colo, mig = await asyncio.gather(
                run_state(),
                session.execute("query-colo-status", deadline_s=QUERY_DEADLINE_S),
                session.execute("query-migrate", deadline_s=QUERY_DEADLINE_S),
            )
            qmp_ms = round((answered_at - t0) * 1000.0, 2)
        except ColoftError as e:
            return SideStatus(self.node.name, role, self.pid, True, error=str(e))
        return SideStatus(
            self.node.name,
            role,
            self.pid,
            True,
            run_state=run.get("status"),
            colo_mode=colo.get("mode"),
            colo_reason=colo.get("reason"),
            migration=mig.get("status"),
            qmp_ms=qmp_ms,
        )

    def can_glance(self, last: SideStatus) -> bool:
        """A glance only updates a clean full answer about this QEMU."""
        return (
            self.poll is not None
            and self.poll.connected
            and last.alive
            and last.error is None
            and last.role == self.role.value
            and last.pid == self.pid
        )

    def glance(self, last: SideStatus, now: float) -> SideStatus:
        """The settled pair's poll, without a round trip: `last` updated with the answers
        to the previous glance's questions, then the run state asked for again. None of
        QEMU's answers yet, or no poll monitor, leaves `last` as it was."""
        p = self.poll
        if p is None or not self.alive():
            return last
        p.read()
        answered = p.answers.pop("query-status", None)
        error = p.errors.get("query-status")
        p.ask(["query-status"], now)
        if error is not None:
            return replace(last, error=f"{p.name}: query-status: {error}")
        if answered is None:
            return last
        return replace(last, run_state=answered.get("status"))

    def waiting(self) -> bool:
        """Whether QEMU has yet to answer the poll monitor's last question: its main loop
        is busy or stopped, and a full query now would only sit out its deadline while
        the silence it is part of could already be judged."""
        if self.poll is None:
            return False
        self.poll.read()
        return self.poll.silent_since() is not None

    def skim(self) -> None:
        """Read the poll monitor and drop what it said: the caller asks by its session,
        and QEMU's events, sent to every monitor, must not pile up here."""
        if self.poll is not None:
            self.poll.read()
            self.poll.forget()

    def answered_since(self, t: float) -> bool:
        """Whether QEMU answered, on any of its monitors, a question asked at `t` or later."""
        if self.poll is not None:
            self.poll.read()
        monitors = (self.session, self.oob, self.poll)
        return any(m is not None and m.answered is not None and m.answered >= t for m in monitors)

    async def hung(self, now: float) -> bool:
        """Main monitor silent past HUNG_AFTER_S and no out-of-band answer either.

        A primary whose main loop waits on a stalled checkpoint still answers out of
        band; only a stopped or wedged process does not. Killing the former would
        fence the side that still works.
        """
        if self.session is None or not self.alive():
            return False
        if self.poll is not None:
            self.poll.read()  # an answer already in is no silence
        silences = (
            self.session.silent_since,
            None if self.poll is None else self.poll.silent_since(),
        )
        since = min((t for t in silences if t is not None), default=None)
        if since is None or now - since < HUNG_AFTER_S:
            return False
        if self.oob is None:
            return True
        try:
            await self.oob.execute("query-yank", deadline_s=OOB_PROBE_S, oob=True)
        except ColoftError:
            return True
        return False

    async def wait_exit(self, timeout_s: float) -> bool:
        """True once the process is gone (immediately if it never started)."""
        if self.proc is None or self.exited_at is not None:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.exited.wait()
        return self.exited_at is not None

    def kill(self) -> None:
        """SIGKILL, without waiting: the caller's loop must not block on a dying process
        (its exit is seen through the pidfd; cleanup() reaps it)."""
        if self.proc is not None and self.proc.alive():
            self.proc.popen.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        self.stopping = True
        for s in (self.session, self.oob):
            if s is not None:
                await s.close()
        if self.poll is not None:
            self.poll.close()
        self.session = self.oob = self.poll = None

    def cleanup(self) -> None:
        """Kill QEMU by pid, remove its tap and run files; needs no event loop."""
        self.stopping = True
        if self.proc is not None:
            self.proc.kill()
        tap.remove_tap(self.node.netns, tap_name(self.spec))
        p = self.paths
        for f in (p.qmp, p.qmp_oob, p.qmp_watch, p.qmp_poll, p.active, p.hidden, p.pidfile):
            f.unlink(missing_ok=True)


def _outside(netns: str | None) -> bool:
    """Whether this process runs outside `netns` (so commands must enter it)."""
    if netns is None:
        return False
    try:
        return os.stat(f"/run/netns/{netns}").st_ino != os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return True
