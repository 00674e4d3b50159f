"""Bring-up of a real COLO pair in the lab (patched QEMU, TCG)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from coloft.agent.launch import LocalPair
from coloft.config.load import load_spec
from coloft.core import choreography
from coloft.core.argv import tap_name
from coloft.effects import qemu_binary
from coloft.effects.executor import run_steps
from coloft.effects.local_qemu import LocalQemu
from coloft.effects.process import pid_alive
from coloft.lab import net, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.rounds import up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from coloft.model.steps import Role
from tests.integration.conftest import EXAMPLE, spec_variant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_pair_reaches_colo_and_serves_through_colo_compare(
    make_pair: Callable[[PairSpec], LocalPair], tmp_path: Path
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    a, b = pair.status("a"), pair.status("b")
    assert a is not None and b is not None
    assert (a["state"], a["qemu"]["colo_mode"], a["qemu"]["migration"]) == (
        "primary",
        "primary",
        "colo",
    )
    assert (b["state"], b["qemu"]["colo_mode"]) == ("secondary", "secondary")
    assert (a["leader"], a["sync"]) == ({"node": "a", "epoch": a["epoch"]}, "b"), a
    watch = FrameWatch({n.name: n.netns or "" for n in pair.spec.nodes}, tap_name(pair.spec))
    watch.start()
    try:
        client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, 15)
        client.wait(60)
    finally:
        watch.stop()
    checked = workload.verify(net.CLIENT_NS, "192.0.2.10:7000", tmp_path / "acked.jsonl")
    result = workload.read_result(tmp_path)
    assert result["requests_failed"] == 0, result.get("errors")
    assert int(result["requests_ok"]) > 20, result
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
    # Only the primary's host puts the VM's frames on the LAN: the secondary's
    # output goes to colo-compare, which releases the primary's copy.
    assert watch.frames("a") > 20 and watch.frames("b") == 0, (watch.frames("a"), watch.frames("b"))
    later = pair.status("a")
    assert later is not None
    assert later["checkpoints"]["count"] >= 3, later["checkpoints"]


def test_bringup_failure_names_the_step_and_leaves_nothing(
    make_pair: Callable[[PairSpec], LocalPair], tmp_path: Path
) -> None:
    # Ports of earlier tests may linger in TIME_WAIT; use fresh ones.
    spec = load_spec(spec_variant(tmp_path, {"port_base = 9000": "port_base = 9200"}))
    ip = spec.secondary.replication_address
    nbd_port = spec.secondary.port_base + 4
    squatter = subprocess.Popen(
        net.netns_argv(
            spec.secondary.netns or "",
            [
                sys.executable,
                "-c",
                "import socket,time; s=socket.socket(); "
                f"s.bind(('{ip}', {nbd_port})); s.listen(); "
                "print('ready', flush=True); time.sleep(300)",
            ],
        ),
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == b"ready"
        pair = make_pair(spec)
        pair.start()
        # The progress names the failure a moment before the next tick says down.
        views = pair.wait_for(
            lambda s: (
                "bring-up failed" in (s["b"] or {}).get("progress", "")
                and (s["b"] or {}).get("state") == "down"
            ),
            60,
            "failure",
        )
        b = views["b"]
        assert b is not None
        assert "b: step 'start NBD server' failed" in b["progress"], b["progress"]
        assert "Address already in use" in b["progress"], b["progress"]
        assert b["state"] == "down" and not b["qemu"]["alive"], b
        # The primary never got its secondary, so it never left bring-up.
        a = views["a"]
        assert a is not None and a["state"] == "starting", a
        pair.stop()
        for node in spec.nodes:
            link = subprocess.run(
                ["ip", "-n", node.netns or "", "link", "show", tap_name(spec)],
                capture_output=True,
                check=False,
            )
            assert link.returncode != 0, f"tap left behind on {node.name}"
            assert not (spec.run_dir_of(node) / "qmp.sock").exists()
    finally:
        squatter.kill()
        squatter.wait()
    out = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64 -name demo-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.strip() == "", f"QEMU still running: {out.stdout}"


def test_secondary_steps_can_be_replayed_on_real_qemu(lab: None) -> None:
    """An interrupted bring-up can be run again: QEMU's "already there" answers are accepted."""
    spec = lab_spec()
    steps = choreography.secondary_bringup(spec, spec.primary, spec.secondary)
    choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
    qemu = LocalQemu(spec, spec.secondary, Role.SECONDARY, choice)

    async def scenario() -> None:
        try:
            await qemu.start()
            assert qemu.session is not None
            sessions = {spec.secondary.name: qemu.session}
            await run_steps(sessions, steps[:5])
            await run_steps(sessions, steps)
            await run_steps(sessions, steps)
        finally:
            await qemu.close()
            qemu.cleanup()

    asyncio.run(scenario())
    assert qemu.pid is not None and not pid_alive(qemu.pid)


def _coloft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coloft.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_cli_check_passes_in_the_lab(lab: None) -> None:
    done = _coloft("check", str(EXAMPLE), "--json")
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert done.returncode == 0 and report["ok"], failed
    names = {c["name"] for c in report["checks"]}
    assert {"qemu binary", "qemu features", "memory", "disk sizes", "ports a"} <= names
    assert {"tls a", "tls b", "exposure a", "exposure b", "arbiter"} <= names


def test_cli_check_names_missing_certificates_and_a_wildcard_listener(
    tmp_path: Path, lab: None
) -> None:
    text = EXAMPLE.read_text().replace("/var/lib/coloft/lab/tls", str(tmp_path / "none"))
    spec = tmp_path / "pair.toml"
    spec.write_text(text)
    # Something listens on a's mirror port on every address.
    squatter = subprocess.Popen(
        [
            *net.netns_argv("coloft-a", ["/usr/bin/python3", "-c"]),
            # Reuse the address: an earlier test's mirror channel may linger in TIME_WAIT.
            "import socket, time\ns = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 9000)); s.listen()\n"
            "print('up', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stderr is not None
        up = squatter.stdout.readline().strip()
        assert up == b"up", squatter.stderr.read().decode()
        done = _coloft("check", str(spec))
    finally:
        squatter.kill()
        squatter.wait()
    assert done.returncode == 1
    assert f"FAIL tls certificates: no node directory under {tmp_path / 'none'}" in done.stdout
    assert f"fix: run `coloft certs {spec}`" in done.stdout, done.stdout
    assert "FAIL exposure a: listening on every address: ports [9000]" in done.stdout, done.stdout
    assert "ok   exposure b" in done.stdout, done.stdout


def test_cli_check_names_a_missing_disk(tmp_path: Path, lab: None) -> None:
    text = EXAMPLE.read_text().replace("/var/lib/coloft/lab/disk-b.raw", str(tmp_path / "x.raw"))
    spec = tmp_path / "pair.toml"
    spec.write_text(text)
    done = _coloft("check", str(spec))
    assert done.returncode == 1
    assert f"FAIL disk b: {tmp_path / 'x.raw'}" in done.stdout, done.stdout
    assert "fix: copy the VM's disk image" in done.stdout
