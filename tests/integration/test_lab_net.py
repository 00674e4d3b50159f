"""The simulated hosts: namespaces, bridges, veths, fault injection (needs root + iproute2,
nftables and ping)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coloft.effects import tap
from coloft.lab import net, workload

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
]


@pytest.fixture(autouse=True, scope="module")
def _needs() -> None:
    assert os.geteuid() == 0, "needs root for network namespaces"
    assert shutil.which("nft") and shutil.which("ping"), "needs nftables and iputils-ping"


def _coloft_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith("coloft-")]


def _ping(ns: str, addr: str) -> bool:
    argv = net.netns_argv(ns, ["ping", "-c", "1", "-W", "1", "-q", addr])
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _ping_soon(ns: str, addr: str, within_s: float = 5.0) -> bool:
    """Ping until one succeeds (ARP may need a retry after a fault is lifted)."""
    deadline = time.monotonic() + within_s
    while True:
        if _ping(ns, addr):
            return True
        if time.monotonic() > deadline:
            return False


def _link_ids() -> dict[tuple[str, str], Any]:
    """(ns, ifname) -> ifindex for every lab interface, to prove a second lab_up changes
    nothing."""
    ids: dict[tuple[str, str], Any] = {}
    for host in net.HOSTS.values():
        out = subprocess.run(
            ["ip", "-n", host.ns, "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        for entry in json.loads(out):
            ids[(host.ns, entry["ifname"])] = (entry["ifindex"], entry.get("address"))
    return ids


@pytest.fixture
def lab() -> Iterator[None]:
    with net.lab_lock():
        net.lab_down()
        try:
            net.lab_up()
            yield
        finally:
            net.lab_down()
            assert _coloft_namespaces() == []


def test_lab_up_is_idempotent_and_connected(lab: None) -> None:
    before = _link_ids()
    net.lab_up()
    assert _link_ids() == before, "second lab_up must leave a correct lab untouched"

    status = net.lab_status()
    assert status["ok"] is True, status["problems"]
    hosts: Any = status["hosts"]
    assert hosts["a"]["links"]["br0"]["addrs"] == ["192.0.2.1/24"]
    assert hosts["b"]["links"]["repl"]["addrs"] == ["198.51.100.2/24"]
    assert hosts["a"]["links"]["uplink"]["master"] == net.VM_BRIDGE
    assert hosts["lan"]["links"]["to-client"]["master"] == "lan0"
    assert hosts["client"]["links"]["eth0"]["addrs"] == ["192.0.2.100/24"]
    for host in hosts.values():
        assert host["links"]["lo"]["up"] is True
    assert set(_coloft_namespaces()) == {h.ns for h in net.HOSTS.values()}

    assert _ping_soon(net.CLIENT_NS, "192.0.2.1")
    assert _ping_soon(net.CLIENT_NS, "192.0.2.2")
    assert _ping_soon(net.CLIENT_NS, "192.0.2.3")
    # The replication switch: every host reaches every other.
    for src, dst in (("a", "b"), ("b", "a"), ("c", "a"), ("b", "c")):
        assert _ping_soon(net.HOST_NS[src], net.REPLICATION_IP[dst]), (src, dst)
    assert _ping_soon(net.HOST_NS["c"], net.WITNESS_IP)

    # only TEST-NET connected routes: no default route anywhere
    for host in net.HOSTS.values():
        routes = subprocess.run(
            ["ip", "-n", host.ns, "route", "show", "default"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert routes.strip() == ""


def test_lab_up_repairs(lab: None) -> None:
    subprocess.run(["ip", "-n", "coloft-a", "link", "del", "repl"], check=True)
    subprocess.run(["ip", "-n", "coloft-b", "addr", "flush", "dev", "br0"], check=True)
    subprocess.run(["ip", "-n", "coloft-lan", "link", "set", "to-client", "down"], check=True)
    status = net.lab_status()
    assert status["ok"] is False
    problems = status["problems"]
    assert isinstance(problems, list)
    assert any("repl missing" in p for p in problems)
    assert any("192.0.2.2/24" in p for p in problems)
    assert any("to-client is down" in p for p in problems)

    net.lab_up()
    assert net.lab_status()["ok"] is True
    assert _ping_soon(net.HOST_NS["a"], net.REPLICATION_IP["b"])
    assert _ping_soon(net.CLIENT_NS, "192.0.2.2")


def test_blackhole_and_link_down(lab: None) -> None:
    a, b = net.HOST_NS["a"], net.HOST_NS["b"]
    assert _ping_soon(a, net.REPLICATION_IP["b"])

    net.blackhole(b, "repl")
    net.blackhole(b, "repl")  # idempotent
    assert not _ping(a, net.REPLICATION_IP["b"])
    assert not _ping(b, net.REPLICATION_IP["a"])
    status: Any = net.lab_status()
    assert status["hosts"]["b"]["blackholed"] == ["repl"]
    assert status["hosts"]["a"]["blackholed"] == []
    # silent: the link itself still looks fine
    assert status["hosts"]["b"]["links"]["repl"]["carrier"] is True
    # the LAN is untouched
    assert _ping_soon(net.CLIENT_NS, "192.0.2.2")

    net.unblackhole(b, "repl")
    net.unblackhole(b, "repl")  # idempotent
    assert _ping_soon(a, net.REPLICATION_IP["b"])
    status = net.lab_status()
    assert status["hosts"]["b"]["blackholed"] == []

    # a bridge port (bridged frames never reach the inet hooks)
    net.blackhole(a, "uplink")
    assert not _ping(net.CLIENT_NS, "192.0.2.1")
    assert _ping_soon(net.CLIENT_NS, "192.0.2.2")
    net.unblackhole(a, "uplink")
    assert _ping_soon(net.CLIENT_NS, "192.0.2.1")

    net.link_down(a, "repl")
    status = net.lab_status()
    assert status["hosts"]["a"]["links"]["repl"]["up"] is False
    # A switched network: b's own link to the replication switch stays up.
    assert status["hosts"]["b"]["links"]["repl"]["carrier"] is True
    assert not _ping(a, net.REPLICATION_IP["b"])
    net.link_up(a, "repl")
    assert _ping_soon(a, net.REPLICATION_IP["b"])


def test_tap(lab: None) -> None:
    ns = net.HOST_NS["a"]
    tap.ensure_tap(ns, "tap-test", net.VM_BRIDGE)
    tap.ensure_tap(ns, "tap-test", net.VM_BRIDGE)  # idempotent
    link: Any = net.lab_status()["hosts"]
    found = link["a"]["links"]["tap-test"]
    assert found["kind"] == "tun" and found["master"] == net.VM_BRIDGE and found["up"] is True
    tap.remove_tap(ns, "tap-test")
    tap.remove_tap(ns, "tap-test")  # absent is fine
    assert "tap-test" not in net.lab_status()["hosts"]["a"]["links"]  # type: ignore[index]


def test_lab_down_twice_and_after_a_crash() -> None:
    with net.lab_lock():
        _lab_down_twice_and_after_a_crash()


def _lab_down_twice_and_after_a_crash() -> None:
    try:
        net.lab_up()
        # a crash mid-creation leaves a temporary veth in the root namespace
        tmp = f"{net.TEMP_PREFIX}test0"
        subprocess.run(
            ["ip", "link", "add", tmp, "type", "veth", "peer", "name", f"{net.TEMP_PREFIX}test1"],
            check=True,
        )
        assert net.lab_status()["ok"] is False
    finally:
        net.lab_down()
    net.lab_down()
    assert _coloft_namespaces() == []
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    assert net.TEMP_PREFIX not in links.stdout
    status = net.lab_status()
    assert status["ok"] is False
    assert all(h["exists"] is False for h in status["hosts"].values())  # type: ignore[attr-defined]


def test_netns_argv() -> None:
    assert net.netns_argv(None, ["true"]) == ["true"]
    assert net.netns_argv("coloft-a", ["ip", "a"]) == ["ip", "netns", "exec", "coloft-a", "ip", "a"]
    with pytest.raises(net.LabError, match="ip -n coloft-nonexistent-x link show"):
        net._ip("coloft-nonexistent-x", "link", "show")


def test_workload_through_the_lan(lab: None, tmp_path: Path) -> None:
    """The client in coloft-client drives the reference server on host A across lan0; a
    blackholed uplink shows up as failures, then the run recovers and nothing acked is lost."""
    server = subprocess.Popen(
        net.netns_argv(
            net.HOST_NS["a"],
            [sys.executable, "-m", "coloft.lab.workload", "serve", "--listen", "192.0.2.1:7000"],
        )
    )
    out = tmp_path / "run"
    client = workload.start_workload(
        net.CLIENT_NS, "192.0.2.1:7000", out, duration=6, timeout=0.5, run_id="lan"
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            live = workload.read_live(out)
            if live is not None and live["requests_ok"] >= 20:
                break
            time.sleep(0.1)
        net.blackhole(net.HOST_NS["a"], "uplink")
        time.sleep(1.5)
        net.unblackhole(net.HOST_NS["a"], "uplink")
        client.wait(30)
        result = workload.read_result(out)
        report = workload.verify(net.CLIENT_NS, "192.0.2.1:7000", out / workload.ACKED_FILE)
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    assert client.returncode == 0, (out / "client.log").read_text()
    assert result["requests_failed"] >= 1
    assert result["reconnects"] >= 1
    assert result["max_reply_gap_ms"] >= 1000
    assert any("timeout" in e for e in result["errors"])
    assert result["acked_writes"] > 20
    assert report["checked"] == result["acked_writes"]
    assert report["lost_acked_writes"] == 0 and report["wrong_values"] == 0


def test_witness_network_and_host_isolation(lab: None) -> None:
    """Each host reaches the witness on its own network; isolating a host cuts every link
    it has (LAN, replication, witness) at once, and healing restores them."""
    assert _ping_soon("coloft-a", net.WITNESS_IP) and _ping_soon("coloft-b", net.WITNESS_IP)
    net.isolate("coloft-a")
    try:
        assert sorted(net.blackholed("coloft-a")) == sorted(net.HOST_IFACES)
        for target in (net.WITNESS_IP, "198.51.100.2", "192.0.2.2"):
            assert not _ping(ns="coloft-a", addr=target), f"isolated a still reaches {target}"
        assert _ping_soon("coloft-b", net.WITNESS_IP), "isolating a must not cut b"
    finally:
        net.heal("coloft-a")
    assert net.blackholed("coloft-a") == []
    assert _ping_soon("coloft-a", net.WITNESS_IP) and _ping_soon("coloft-a", "198.51.100.2")
