"""Bring-up of a real COLO pair in the lab (patched QEMU, TCG)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coloft.agent.pair import Pair
from coloft.core import choreography
from coloft.core.argv import tap_name
from coloft.effects.executor import run_steps
from coloft.errors import StepError
from coloft.lab import net, workload
from coloft.lab.rounds import up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from tests.integration.conftest import EXAMPLE, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def wait_protected(pair: Pair, within_s: float = 20.0) -> None:
    end = time.monotonic() + within_s
    status = await pair.observe()
    while not status.protected and time.monotonic() < end:
        await asyncio.sleep(0.5)
        status = await pair.observe()
    assert status.protected, f"pair not protected: {status.reason}"


def test_pair_reaches_colo_and_serves_through_colo_compare(
    make_pair: Callable[[PairSpec], Pair], tmp_path: Path
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        await up_and_serving(pair)
        await wait_protected(pair)
        status = await pair.observe()
        primary, secondary = status.sides
        assert (primary.colo_mode, primary.migration) == ("primary", "colo")
        assert secondary.colo_mode == "secondary"
        # Every guest packet goes into colo-compare (redire1) and only its output
        # (redire0) goes out: answered requests went through the comparison.
        session = pair.sessions["a"]
        for fid in ("m0", "redire0", "redire1"):
            state = await session.execute(
                "qom-get", {"path": f"/objects/{fid}", "property": "status"}
            )
            assert state == "on", f"filter {fid} is {state}"
        objects = await session.execute("qom-list", {"path": "/objects"})
        assert "comp0" in {o["name"] for o in objects}
        client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, 15)
        await asyncio.to_thread(client.wait, 60)
        checked = await asyncio.to_thread(
            workload.verify, net.CLIENT_NS, "192.0.2.10:7000", tmp_path / "acked.jsonl"
        )
        return workload.read_result(tmp_path), checked

    result, checked = run_scenario(pair, scenario)
    assert result["requests_failed"] == 0, result.get("errors")
    assert int(result["requests_ok"]) > 20, result
    assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
    assert pair.checkpoints.count >= 3


def test_bringup_failure_names_the_step_and_leaves_nothing(
    make_pair: Callable[[PairSpec], Pair],
) -> None:
    # Ports of earlier tests may linger in TIME_WAIT; use fresh ones.
    spec = lab_spec()
    a, b = (dataclasses.replace(n, port_base=9200) for n in spec.nodes)
    spec = dataclasses.replace(spec, nodes=(a, b))
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
        with pytest.raises(StepError) as info:
            asyncio.run(pair.up())
        message = str(info.value)
        assert "b: step 'start NBD server' failed" in message, message
        assert "Address already in use" in message, message
        pids = [p.pid for p in pair.procs.values()]
        assert pids == [], "a failed bring-up must kill what it started"
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


def test_secondary_steps_can_be_replayed_on_real_qemu(
    make_pair: Callable[[PairSpec], Pair],
) -> None:
    """An interrupted bring-up can be run again: QEMU's "already there" answers are accepted."""
    spec = lab_spec()
    pair = make_pair(spec)
    steps = choreography.secondary_bringup(spec, spec.primary, spec.secondary)

    async def scenario() -> None:
        await pair.start_node(spec.secondary, pair.roles[spec.secondary.name])
        await run_steps(pair.sessions, steps[:5])
        await run_steps(pair.sessions, steps)
        await run_steps(pair.sessions, steps)

    run_scenario(pair, scenario)


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


def test_cli_check_names_a_missing_disk(tmp_path: Path, lab: None) -> None:
    text = EXAMPLE.read_text().replace("/var/lib/coloft/lab/disk-b.raw", str(tmp_path / "x.raw"))
    spec = tmp_path / "pair.toml"
    spec.write_text(text)
    done = _coloft("check", str(spec))
    assert done.returncode == 1
    assert f"FAIL disk b: {tmp_path / 'x.raw'}" in done.stdout, done.stdout
    assert "fix: copy the VM's disk image" in done.stdout
