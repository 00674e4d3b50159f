"""Run a whole pair from one machine: the embedded etcd and one agent per node.

This is what `coloft up`, the demo, the tests and the benchmarks use in the lab,
where every node is a network namespace of this machine: each agent runs inside
its node's namespace, exactly as it would run on its own host, and the etcd runs
in the witness namespace. On real hosts, run `coloft agent SPEC --node NAME` on
each host instead (systemd), against an existing etcd cluster.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.arbiter.base import parse_endpoint
from coloft.arbiter.embedded import EtcdProcess, start_etcd
from coloft.effects.process import die_with_parent, netns_argv, pid_alive
from coloft.errors import FatalError
from coloft.model.spec import PairSpec

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
# How long every agent may sit in a dead end before a wait gives up early.
HOPELESS_S = 5.0
DEAD_ENDS = ("fenced", "down", "stopped")
# Each agent's status by node; None where the agent did not answer.
Statuses = dict[str, dict[str, Any] | None]


class LocalPair:
    """Handles to the processes of a pair started on this machine."""

    def __init__(self, spec: PairSpec, verbose: bool = True) -> None:
        self.spec = spec
        self.verbose = verbose
        self.etcd: EtcdProcess | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, node: str) -> Path:
        return api.run_root(self.spec) / f"agent-{node}.log"

    def start(self) -> None:
        """Start etcd (when embedded) and both agents; on failure stop what started."""
        try:
            root = api.run_root(self.spec)
            root.mkdir(parents=True, exist_ok=True)
            a = self.spec.arbiter
            if a.embedded_netns is not None:
                # The embedded witness starts empty: no stale leader or sync record.
                shutil.rmtree(a.data_dir, ignore_errors=True)
                host, port = parse_endpoint(a.endpoints[0])
                self.etcd = start_etcd(
                    a.data_dir,
                    client_url=f"http://{host}:{port}",
                    peer_url=f"http://{host}:{port + 1}",
                    netns=a.embedded_netns or None,
                )
            for node in self.nodes():
                self.start_agent(node)
        except BaseException:
            self.stop()
            raise

    def nodes(self) -> list[str]:
        return [n.name for n in self.spec.nodes]

    def specs_of(self, node: str) -> list[PairSpec]:
        return [self.spec]

    def start_agent(self, node: str) -> None:
        mine = self.specs_of(node)
        n = mine[0].node(node)
        argv = [sys.executable, "-m", "coloft.cli"]
        if self.verbose:
            argv.append("-v")
        argv += ["agent", *(str(s.source) for s in mine), "--node", node]
        with self.log_path(node).open("ab") as out:
            self.agents[node] = subprocess.Popen(
                netns_argv(n.netns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=die_with_parent(),
            )

    def signal_agent(self, node: str, sig: signal.Signals) -> None:
        proc = self.agents[node]
        if proc.poll() is None:
            proc.send_signal(sig)
        if sig is signal.SIGKILL:
            proc.wait()

    def status(self, node: str, timeout: float = 2.0) -> dict[str, Any] | None:
        return api.status_or_none(api.socket_path(self.spec, node), timeout)

    def statuses(self) -> Statuses:
        return {n.name: self.status(n.name) for n in self.spec.nodes}

    def wait_for(
        self,
        check: Callable[[Statuses], bool],
        timeout_s: float,
        what: str,
        hopeless: Callable[[Statuses], bool] = lambda s: False,
    ) -> Statuses:
        """Poll both agents until check(statuses) is true; names what never happened,
        at once when `hopeless` has held for HOPELESS_S."""
        end = time.monotonic() + timeout_s
        since: float | None = None
        while True:
            s = self.statuses()
            if check(s):
                return s
            since = (since or time.monotonic()) if hopeless(s) else None
            if since is not None and time.monotonic() - since > HOPELESS_S:
                end = 0.0
            for node, proc in self.agents.items():
                if proc.poll() is not None and not any(s.values()):
                    raise FatalError(
                        f"agent {node} exited with code {proc.returncode}; "
                        f"log: {self.log_path(node)}\n{self.log_tail(node)}"
                    )
            if time.monotonic() > end:
                summary = "; ".join(
                    f"{n}: {v['state']} ({v['reason']}) {v.get('progress') or ''}"
                    if v
                    else f"{n}: no answer"
                    for n, v in s.items()
                )
                raise FatalError(f"{what} not reached within {timeout_s:g} s: {summary}")
            time.sleep(0.2)

    def wait_protected(self, timeout_s: float = 240.0) -> Statuses:
        return self.wait_for(
            lambda s: any(v and v["state"] == "primary" and v["protected"] for v in s.values()),
            timeout_s,
            "protection",
            hopeless=_hopeless,
        )

    def log_tail(self, node: str, limit: int = 3000) -> str:
        try:
            return self.log_path(node).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM every agent (each stops its QEMU and cleans up), then etcd."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_S
        for node, proc in self.agents.items():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("agent %s did not stop in %.0f s; killing it", node, STOP_GRACE_S)
                proc.kill()
                proc.wait()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
            shutil.rmtree(self.spec.arbiter.data_dir, ignore_errors=True)

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.agents.values())


def _hopeless(s: Statuses) -> bool:
    """An agent stopped its copy and none leads: nothing will start by itself (a QEMU
    that refused the spec, say); the reasons say why."""
    seen = [v for v in s.values() if v]
    leads = any(v["state"] in ("primary", "alone") or v.get("epoch") is not None for v in seen)
    return not leads and any(v["state"] in DEAD_ENDS for v in seen)


def pid_file(spec: PairSpec) -> Path:
    return api.run_root(spec) / "up.pid"


def running_launcher(spec: PairSpec) -> int | None:
    try:
        pid = int(pid_file(spec).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


class LocalFleet(LocalPair):
    """Several pairs on the same hosts and etcd: one agent per host runs every pair
    placed on it (`coloft agent SPEC... --node NAME`), as on real hosts."""

    def __init__(self, specs: list[PairSpec], verbose: bool = True) -> None:
        super().__init__(specs[0], verbose)
        self.specs = specs
        for s in specs[1:]:
            if s.arbiter.endpoints != self.spec.arbiter.endpoints:
                raise FatalError(f"{s.source}: a fleet shares one etcd; endpoints differ")

    def nodes(self) -> list[str]:
        return list(dict.fromkeys(n.name for s in self.specs for n in s.nodes))

    def specs_of(self, node: str) -> list[PairSpec]:
        return [s for s in self.specs if node in {n.name for n in s.nodes}]

    def log_path(self, node: str) -> Path:
        return api.run_root(self.spec).parent / f"fleet-agent-{node}.log"

    def start(self) -> None:
        for s in self.specs:
            api.run_root(s).mkdir(parents=True, exist_ok=True)
        super().start()

    def statuses_of(self, spec: PairSpec) -> Statuses:
        return {n.name: api.status_or_none(api.socket_path(spec, n.name)) for n in spec.nodes}
