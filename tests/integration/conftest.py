"""Shared fixtures for tests against real QEMU, real etcd and real agents in the lab."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.effects.process import pid_alive
from coloft.lab import faults, net, setup
from coloft.lab.protection import ProtectionOracle
from coloft.lab.watchdog import NotifyListener, watchdog_s
from coloft.model.spec import PairSpec

EXAMPLE = setup.EXAMPLE_SPEC


def lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("coloft-")]


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    """The lab's namespaces and fresh guest disks for one test module; removed after it."""
    assert os.geteuid() == 0, "integration tests need root (namespaces, taps)"
    with net.lab_lock():
        setup.lab_up(fresh_disks=True)
        try:
            yield
        finally:
            net.lab_down()
            assert lab_namespaces() == [], "lab namespaces left behind"


def pids_of(pair: LocalPair) -> list[int]:
    """Every process of the pair: agents, their QEMUs, etcd."""
    pids = [p.pid for p in pair.agents.values()]
    if pair.etcd is not None:
        pids.append(pair.etcd.pid)
    for s in pair.statuses().values():
        if s is not None and s["qemu"]["pid"] is not None:
            pids.append(int(s["qemu"]["pid"]))
    return pids


@pytest.fixture
def watchdog(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """A stand-in for systemd's notify socket for the agents a test starts: one that
    would have been killed by the units' watchdog (WatchdogSec) fails the test."""
    notify_dir = Path(tempfile.mkdtemp(prefix="coloft-notify-"))
    listener = NotifyListener(notify_dir / "notify")
    listener.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    yield listener
    listener.stop()
    shutil.rmtree(notify_dir, ignore_errors=True)
    limit = watchdog_s()
    for pid, h in listener.senders.items():
        print(f"watchdog: agent {pid}: {h.pings} pings, longest wait {h.longest_wait_s:.3f} s")
    assert any(h.pings for h in listener.senders.values()), "no agent told the watchdog"
    late = {pid: h for pid, h in listener.senders.items() if h.longest_wait_s >= limit}
    assert not late, f"systemd's watchdog ({limit:g} s) would have killed: {late}"
    assert all(h.ready for h in listener.senders.values()), listener.senders


@pytest.fixture
def make_pair(lab: None, watchdog: NotifyListener) -> Iterator[Callable[[PairSpec], LocalPair]]:
    """Pairs a test starts are stopped after it, pass or fail, and checked gone by pid.

    Through every such test the protection oracle samples /protected and both
    QEMUs every 100 ms; a 200 that QEMU's state does not back fails the test; the
    watchdog oracle listens to the agents (above).
    """
    pairs: list[tuple[LocalPair, ProtectionOracle]] = []

    def make(spec: PairSpec) -> LocalPair:
        setup.reset_disks()
        pair = LocalPair(spec)
        oracle = ProtectionOracle(spec)
        oracle.start()
        pairs.append((pair, oracle))
        return pair

    yield make
    violations = []
    for pair, oracle in pairs:
        oracle.stop()
        violations += oracle.violations
        if oracle.samples == 0:
            violations.append("the protection oracle never sampled")
        print(f"protection oracle: {oracle.samples} samples, {oracle.yes} said protected")
        pids = pids_of(pair)
        faults.heal(pair)
        pair.stop()
        for node in pair.agents:
            # Shown by pytest when the test failed: what each agent decided and did.
            print(f"--- agent {node} log (tail) ---\n{pair.log_tail(node, 6000)}")
        for n in pair.spec.nodes:
            # The last QEMU of each node (an earlier one's last words are in its agent's log).
            stderr = pair.spec.run_dir_of(n) / "qemu.stderr"
            if stderr.exists():
                tail = stderr.read_text(errors="replace")[-1500:]
                print(f"--- {n.name}'s QEMU stderr (tail) ---\n{tail}")
        shutil.rmtree(api.run_root(pair.spec), ignore_errors=True)
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"pids still alive after teardown: {alive}"
    assert not violations, f"/protected said 200 when it must not: {violations[:5]}"


def spec_variant(tmp_path: Path, replace: dict[str, str]) -> Path:
    """examples/lab.toml with some lines replaced, as a file agents can read."""
    text = EXAMPLE.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "pair.toml"
    path.write_text(text)
    return path
