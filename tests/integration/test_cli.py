"""The `coloft` command end to end: up/status/down and the demo's JSON contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from coloft.effects.process import pid_alive
from tests.integration.conftest import EXAMPLE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

COLOFT = [sys.executable, "-m", "coloft.cli"]


def coloft(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COLOFT, *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def status_json() -> dict[str, Any]:
    done = coloft("status", str(EXAMPLE), "--json")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def wait_protected(up: subprocess.Popen[str], within_s: float = 240) -> dict[str, Any]:
    end = time.monotonic() + within_s
    pairs: list[dict[str, Any]] = []
    while time.monotonic() < end:
        assert up.poll() is None, f"coloft up exited: {up.communicate()}"
        pairs = status_json()["pairs"]
        if pairs and pairs[0]["protected"]:
            return pairs[0]
        time.sleep(1)
    raise AssertionError(f"never protected: {pairs}")


def all_pids(pair: dict[str, Any]) -> list[int]:
    """Agents and QEMUs of a pair, from `coloft status --json`."""
    pids = [a["agent_pid"] for a in pair["agents"].values()]
    return pids + [a["qemu"]["pid"] for a in pair["agents"].values()]


def etcd_pids() -> list[int]:
    done = subprocess.run(
        ["pgrep", "-f", "etcd --name=coloft"], capture_output=True, text=True, check=False
    )
    return [int(p) for p in done.stdout.split()]


def test_up_status_down(lab: None) -> None:
    up = subprocess.Popen(
        [*COLOFT, "up", str(EXAMPLE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        pair = wait_protected(up)
        assert (pair["leader"], pair["sync"]) == ("a", "b"), pair
        assert isinstance(pair["epoch"], int) and pair["epoch"] > 0
        states = {n["node"]: (n["state"], n["colo_mode"]) for n in pair["nodes"]}
        assert states == {"a": ("primary", "primary"), "b": ("secondary", "secondary")}
        # Both heartbeat paths hear the peer.
        for n in pair["nodes"]:
            assert set(n["peer_paths_ms"]) == {"replication", "lan"}, n
        pids = all_pids(pair) + etcd_pids()
        assert len(pids) == 5 and all(pid_alive(p) for p in pids), pids
        line = coloft("status", str(EXAMPLE))
        assert line.returncode == 0
        assert line.stdout.startswith("demo: PROTECTED | leader a (epoch "), line.stdout
        assert "b secondary" in line.stdout and "last checkpoint" in line.stdout, line.stdout
        table = coloft("status", "--table")
        assert "checkpoints" in table.stdout and "peer heard" in table.stdout, table.stdout
        down = coloft("down", str(EXAMPLE))
        assert down.returncode == 0 and "demo: stopped" in down.stdout, down.stderr
        up.wait(timeout=30)
        assert not any(pid_alive(p) for p in pids), "a process survived coloft down"
        assert coloft("status", str(EXAMPLE)).returncode == 1
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGKILL)
            up.wait()


def test_everything_dies_with_its_parent(lab: None) -> None:
    """A dead agent never leaves its QEMU running, nor a dead `coloft up` its agents."""
    up = subprocess.Popen(
        [*COLOFT, "up", str(EXAMPLE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        pair = wait_protected(up)
        b = pair["agents"]["b"]
        os.kill(b["agent_pid"], signal.SIGKILL)
        assert_gone([b["qemu"]["pid"]], "QEMU outlived its SIGKILLed agent")
        pids = all_pids(pair) + etcd_pids()
    finally:
        os.kill(up.pid, signal.SIGKILL)
        up.wait()
    assert_gone(pids, "a process outlived the SIGKILLed `coloft up`")


def assert_gone(pids: list[int], message: str) -> None:
    end = time.monotonic() + 5
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), message


def test_bad_spec_is_rejected_by_every_command(tmp_path: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("memory_mib = 128", "memory_mib = 12"))
    for command in ("plan", "check", "up"):
        done = coloft(command, str(bad))
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert f"coloft: error: {bad}: [vm].memory_mib: 12 MiB is out of range" in done.stderr


def demo_summary(*args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run `coloft demo --json ARGS`; its last stdout line is the summary."""
    done = coloft("demo", "--duration", "20", "--json", *args, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary (exit {done.returncode}): {done.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary, done


def assert_keys(found: dict[str, Any], keys: str) -> None:
    missing = [k for k in keys.split() if k not in found]
    assert not missing, f"missing keys {missing} in {found}"


def test_demo_json_contract(lab: None) -> None:
    summary, done = demo_summary()
    assert_keys(
        summary,
        "protected checkpoints requests_ok requests_failed acked_writes "
        "lost_acked_writes latency_ms_p50 latency_ms_p99",
    )
    assert done.returncode == 0, (summary, done.stderr[-2000:])
    assert summary["protected"] is True, summary
    assert summary["checkpoints"] >= 5 and summary["requests_failed"] == 0, summary
    assert 0 <= summary["checkpoints_forced"] <= summary["checkpoints"], summary
    assert summary["acked_writes"] > 0 and summary["lost_acked_writes"] == 0, summary
    leftover = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64 -name demo-"], capture_output=True, check=False
    )
    assert leftover.returncode == 1, "QEMU left running"


def test_demo_reprotect_json_contract(lab: None) -> None:
    """The failover contract (issue 3) and the re-protection contract (issue 7) in one run."""
    summary, done = demo_summary("--fault", "kill-primary", "--reprotect", "--duration", "30")
    failover, again = summary["failover"], summary["reprotect"]
    assert_keys(
        failover, "detected_ms gap_ms connection_resets lost_acked_writes active_overlap_ms"
    )
    assert_keys(again, "protected_again_ms synced_bytes")
    assert done.returncode == 0, (summary, done.stderr[-2000:])
    assert failover["action"] == "secondary-takes-over" and failover["error"] is None, failover
    assert failover["lost_acked_writes"] == 0 and failover["connection_resets"] == 0, failover
    assert failover["active_overlap_ms"] == 0.0, failover
    assert again["error"] is None and again["secondary"] == "a", again
    assert again["protected_again_ms"] is not None and again["protected_again_ms"] > 0, again
    # The whole disk image and all of the guest's memory went to the new secondary.
    assert again["disk_bytes"] >= 96 << 20 and again["memory_bytes"] == 128 << 20, again
    assert again["synced_bytes"] == again["disk_bytes"] + again["memory_bytes"], again
    assert summary["protected"] is True and summary["requests_failed"] == 0, summary


@pytest.mark.parametrize(
    ("fault", "named", "policy"),
    [("reset-compare", "compare", "re-establish"), ("drop-replication", "", "run-alone")],
)
def test_demo_channel_fault_json_contract(lab: None, fault: str, named: str, policy: str) -> None:
    summary, done = demo_summary("--fault", fault, "--duration", "30")
    protection = summary["protection"]
    assert_keys(protection, "degraded_after_ms reason policy_applied_ms protected_again_ms")
    assert done.returncode == 0, (summary, done.stderr[-2000:])
    assert protection["degraded_after_ms"] is not None, protection
    assert protection["policy"] == policy, protection
    assert protection["policy_applied_ms"] is not None, protection
    assert summary["lost_acked_writes"] == 0, summary
    if policy == "re-establish":
        assert protection["degraded_after_ms"] < 1100, protection
        assert named in protection["reason"], protection
        assert protection["policy_applied_ms"] < 2000, protection
        # Re-established and proven by the probe again after the fault was lifted.
        assert protection["protected_again_ms"] is not None, protection
        assert summary["protected"] is True and summary["requests_failed"] == 0, summary
    else:
        # Ran alone; once the fault was lifted, the secondary's host was re-protected.
        # The link is named when its socket shows the loss by then; a checkpoint held
        # past the stall limit first is the same fault seen from the guest's side.
        reasons = ("migration-unacknowledged", "nbd-unacknowledged", "checkpoint-stalled")
        assert protection["reason"] in reasons, protection
        assert protection["protected_again_ms"] is not None, protection
        assert summary["protected"] is True and summary["requests_failed"] == 0, summary
