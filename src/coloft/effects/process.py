"""Launch and supervise QEMU processes.

QEMU gets PR_SET_PDEATHSIG=SIGKILL so it can never outlive the process that
supervises it: a dead supervisor must not leave an unsupervised primary running.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coloft.errors import FatalError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec of a threaded parent only
# async-signal-safe work is safe, and dlopen is not.
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(
    sig: signal.Signals = signal.SIGKILL, nice: int | None = None
) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it ends.

    PR_SET_PDEATHSIG follows the forking *thread*: start children from a
    long-lived thread (the event loop's), never from a worker thread. `nice`
    sets the child's priority (a raised agent's QEMU goes back to normal).
    """
    parent = os.getpid()
    prctl = _libc.prctl
    number = int(sig)

    def preexec() -> None:
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), number)

    return preexec


def netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    # `ip netns exec` execs the command in place, so the pid we get is QEMU's.
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


# Enough of QEMU's stderr to hold its last line (an assertion message is one line).
LAST_WORDS_CHARS = 600


@dataclass
class QemuProcess:
    node: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, limit: int = 2000) -> str:
        # Only the end is read: with colo-compare's trace events on, the file grows.
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text.strip()

    def how_it_ended(self) -> str:
        code = self.popen.returncode
        if code is None:
            return "still running"
        if code >= 0:
            return f"exit code {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-code}"

    def death(self) -> str:
        """How an exited QEMU ended and the last thing it wrote, for the agent's event."""
        how = self.how_it_ended()
        lines = self.stderr_tail(LAST_WORDS_CHARS).splitlines()
        return f"{how}; it last wrote: {lines[-1]}" if lines else how

    def failure(self) -> str:
        return (
            f"{self.node}: QEMU exited ({self.how_it_ended()})\n"
            f"  command: {shlex.join(self.argv)}\n  stderr: {self.stderr_tail() or '(empty)'}"
        )

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("%s: QEMU pid %d did not die after SIGKILL", self.node, self.pid)


def launch(node: str, argv: list[str], netns: str | None, run_dir: Path) -> QemuProcess:
    run_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = run_dir / "qemu.stderr"
    full = netns_argv(netns, argv)
    log.info("%s: launching %s", node, shlex.join(full))
    with open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            preexec_fn=die_with_parent(nice=0),
            close_fds=True,
        )
    return QemuProcess(node, full, popen, stderr_path)


async def wait_started(proc: QemuProcess, qmp_path: Path, deadline_s: float = 10.0) -> None:
    """Wait until QEMU created its QMP socket; a QEMU that exits first is a launch failure."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        if not proc.alive():
            raise FatalError(proc.failure())
        if os.path.exists(qmp_path):
            return
        await asyncio.sleep(0.05)
    raise FatalError(
        f"{proc.node}: QEMU (pid {proc.pid}) made no QMP socket within "
        f"{deadline_s:g} s\n  stderr: {proc.stderr_tail() or '(empty)'}"
    )


def pid_alive(pid: int) -> bool:
    """Whether pid runs; a zombie (exited, not yet reaped by its parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain ")".
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"
