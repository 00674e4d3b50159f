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
from coloft.arbiter.etcd import EtcdArbiter, SharedLink
from coloft.config.load import check_together
from coloft.effects import qemu_binary, sdnotify
from coloft.effects.heartbeat import Hub
from coloft.model.spec import PairSpec

log = logging.getLogger(__name__)

# Heartbeats and lease renewals must not starve behind two TCG QEMUs on a small host.
AGENT_NICE = -10
# After one pair's loop failed, the wait before it starts again (systemd's RestartSec).
RESTART_S = 2.0


async def run_agents(specs: Sequence[PairSpec], node: str, echo: Callable[[str], None]) -> None:
    """The agent of host `node` for every pair placed on it: one loop per pair in one
    TaskGroup, one metrics endpoint per address. A pair whose loop fails stops its QEMU
    as a dead agent would (its peer takes over) and starts again after RESTART_S; the
    other pairs go on."""
    check_together(specs, node)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    families = Families()
    hub = Hub()  # pairs sharing a heartbeat port share its sockets and datagrams
    notifier = sdnotify.Notifier()  # systemd's watchdog hears every pair's loop turn
    # One etcd client per pair for its rare calls: one that times out drops its client's
    # channel, and that must not cancel the other pairs' calls. Their steady calls
    # (record reads, lease keep-alives) go out together on one shared link.
    arbiters: list[EtcdArbiter] = []
    links: dict[tuple[str, ...], SharedLink] = {}

    def make(spec: PairSpec) -> Agent:
        choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
        deadline = spec.arbiter.call_deadline_s
        endpoints = tuple(spec.arbiter.endpoints)
        if endpoints not in links:
            links[endpoints] = SharedLink(endpoints, deadline)
        arbiter = EtcdArbiter(endpoints, deadline_s=deadline, link=links[endpoints])
        arbiters.append(arbiter)
        return Agent(spec, node, arbiter, choice, families, hub, notifier)

    agents = [make(spec) for spec in specs]
    for a in agents:
        echo(f"{a.pair}/{node}: {a.choice.binary} ({a.choice.why})")
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
        async with asyncio.TaskGroup() as tg:
            for a in agents:
                tg.create_task(_restarting(a, make, stop, echo))
    finally:
        for server in scrapes:
            server.close()
        for arbiter in arbiters:
            await arbiter.close()
        for link in links.values():
            await link.close()


async def _restarting(
    agent: Agent,
    make: Callable[[PairSpec], Agent],
    stop: asyncio.Event,
    echo: Callable[[str], None],
) -> None:
    while True:
        try:
            await agent.run(stop)
            return
        except Exception as e:  # one pair's failure must not take the host's other pairs
            log.exception("%s: agent loop failed", agent.pair)
            where = f"{agent.pair}/{agent.node.name}"
            echo(f"{where}: agent loop failed: {e!r}; starting it again in {RESTART_S:g} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RESTART_S)
        if stop.is_set():
            return
        await agent.arbiter.close()
        agent = make(agent.spec)


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
