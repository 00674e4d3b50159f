"""Entry points: `coloft agent` (one host, its pairs) and `coloft up` (a whole pair on this
machine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

from coloft.agent import api
from coloft.agent.daemon import Agent
from coloft.agent.launch import LocalPair, pid_file
from coloft.agent.metrics import Families
from coloft.arbiter.etcd import EtcdArbiter
from coloft.config.load import check_together
from coloft.effects import qemu_binary
from coloft.model.spec import PairSpec

log = logging.getLogger(__name__)

# Heartbeats and lease renewals must not starve behind two TCG QEMUs on a small host.
AGENT_NICE = -10


async def run_agents(specs: Sequence[PairSpec], node: str, echo: Callable[[str], None]) -> None:
    """The agent of host `node` for every pair placed on it: one loop per pair in one
    TaskGroup, one arbiter client per etcd cluster, one metrics endpoint per address.
    A pair whose loop fails stops alone (its peer takes over); the others go on."""
    check_together(specs, node)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    families = Families()
    arbiters: dict[tuple[str, ...], EtcdArbiter] = {}
    agents = []
    for spec in specs:
        choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
        echo(f"{spec.vm.name}/{node}: {choice.binary} ({choice.why})")
        key = tuple(spec.arbiter.endpoints)
        if key not in arbiters:
            arbiters[key] = EtcdArbiter(key, deadline_s=spec.arbiter.call_deadline_s)
        agents.append(Agent(spec, node, arbiters[key], choice, families))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scrapes = []
    try:
        # Every pair's metrics are in `families`: any of its agents renders them all.
        endpoints = {(a.node.replication_address, a.spec.metrics_port): a for a in agents}
        for (address, port), served in endpoints.items():
            if port:
                scrapes.append(await api.serve_metrics(address, port, served))
        if len(agents) == 1:
            await agents[0].run(stop)  # its failure is the process's: systemd restarts it
            return
        failed: list[BaseException] = []
        async with asyncio.TaskGroup() as tg:
            for a in agents:
                tg.create_task(_guarded(a, stop, echo, failed))
        if len(failed) == len(agents):
            raise failed[0]
    finally:
        for server in scrapes:
            server.close()
        for arbiter in arbiters.values():
            await arbiter.close()


async def _guarded(
    agent: Agent, stop: asyncio.Event, echo: Callable[[str], None], failed: list[BaseException]
) -> None:
    try:
        await agent.run(stop)
    except Exception as e:  # one pair's failure must not take the host's other pairs
        log.exception("%s: agent loop failed", agent.pair)
        echo(f"{agent.pair}/{agent.node.name}: agent loop failed: {e!r}; this pair is stopped")
        failed.append(e)


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
