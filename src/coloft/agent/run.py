"""Entry points: `coloft agent` (one node) and `coloft up` (a whole pair on this machine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable

from coloft.agent.daemon import Agent
from coloft.agent.launch import LocalPair, pid_file
from coloft.arbiter.etcd import EtcdArbiter
from coloft.effects import qemu_binary
from coloft.model.spec import PairSpec

# Heartbeats and lease renewals must not starve behind two TCG QEMUs on a small host.
AGENT_NICE = -10


async def run_agent(spec: PairSpec, node: str, echo: Callable[[str], None]) -> None:
    choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
    echo(f"{spec.vm.name}/{node}: {choice.binary} ({choice.why})")
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    arbiter = EtcdArbiter(spec.arbiter.endpoints, deadline_s=spec.arbiter.call_deadline_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Agent(spec, node, arbiter, choice).run(stop)
    finally:
        await arbiter.close()


def _node_line(status: dict[str, object] | None, node: str) -> str:
    if status is None:
        return f"{node}: no answer"
    return f"{node}: {status['state']} ({status['reason']})"


def run_up(spec: PairSpec, echo: Callable[[str], None], verbose: bool) -> None:
    """Start etcd and both agents, report until protected, then wait for SIGTERM."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pair = LocalPair(spec, verbose=verbose)
    pair.start()
    pid_file(spec).write_text(str(os.getpid()))
    echo(f"{spec.vm.name}: etcd and agents started; logs in {pair.log_path('*')}")
    last: dict[str, str] = {}
    try:
        while not stopping and pair.alive():
            for node, s in pair.statuses().items():
                line = _node_line(s, node)
                if last.get(node) != line:
                    echo(line)
                    last[node] = line
            time.sleep(0.5)
    finally:
        pair.stop()
        pid_file(spec).unlink(missing_ok=True)
        echo(f"{spec.vm.name}: stopped")
