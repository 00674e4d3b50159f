"""TLS on the replication channels, seen from a stranger on the replication network
(the witness host, routed there for the test) and from the hosts' own sockets."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coloft.agent.launch import LocalPair
from coloft.core import ports
from coloft.core.argv import tls_objects
from coloft.effects import qemu_binary
from coloft.effects.preflight import listening_ports
from coloft.effects.process import launch, wait_started
from coloft.effects.qmp import QmpSession
from coloft.lab import intruder
from coloft.lab.rounds import fault_round
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from tests.integration.test_failover import assert_oracles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MakePair = Callable[[PairSpec], LocalPair]


def test_strangers_are_refused_everywhere_and_do_not_delay_a_failover(
    make_pair: MakePair, tmp_path: Path
) -> None:
    spec = lab_spec(interval_ms=2000, reprotect=False)
    a, b = spec.primary, spec.secondary
    pair = make_pair(spec)
    held: list[subprocess.Popen[bytes]] = []
    nbd_errors: dict[str, str] = {}

    def knock() -> None:
        # Every TCP listener of each host is on its replication address.
        for node in spec.nodes:
            assert node.netns is not None
            found = listening_ports(node.netns)
            assert found and {addr for addr, _ in found} == {node.replication_address}, found
        # QEMU's packet-channel and migration ports: nobody is served.
        tries = [
            (victim, port, who)
            for victim, port in (
                (a, ports.MIRROR),
                (a, ports.COMPARE_SECONDARY_IN),
                (b, ports.MIGRATION),
            )
            for who in intruder.identities(spec, victim.name, tmp_path / victim.name)
        ]
        with ThreadPoolExecutor(len(tries)) as pool:
            got = list(
                pool.map(
                    lambda t: intruder.attempt(
                        t[0].replication_address, ports.port(t[0], t[1]), t[2]
                    ),
                    tries,
                )
            )
        reached = set()
        for (victim, port, who), outcome in zip(tries, got, strict=True):
            print(victim.name, port, who.name, outcome)
            assert not outcome.served, (victim.name, port, who.name, outcome)
            if outcome.connected:
                reached.add((victim.name, port))
        # QEMU's listen backlog is short: a port it does not accept on takes a
        # connection or two in the kernel, then no more.
        assert len(reached) == 3, reached
        # The NBD export (several clients may connect): every stranger is turned away.
        for who in intruder.identities(spec, b.name, tmp_path / "nbd"):
            nbd_errors[who.name] = intruder.nbd_attempt(
                b.replication_address, ports.port(b, ports.NBD), who
            )
        # The same door opens for the peer's certificate, from the same stranger host.
        d = spec.certs_of(a)
        peer = intruder.Identity(
            "a", d / "ca-cert.pem", d / "client-cert.pem", d / "client-key.pem"
        )
        nbd_errors["peer"] = intruder.nbd_attempt(
            b.replication_address, ports.port(b, ports.NBD), peer
        )
        # The agent API is a UNIX socket; the one TCP door, the metrics port, serves a
        # stranger GET /metrics and nothing else (no intent, no status).
        for request in ("POST /failover", "GET /status", "POST /protection"):
            answer = intruder.http(a.replication_address, spec.metrics_port, request)
            assert answer.startswith("HTTP/1.1 404"), (request, answer)
        assert intruder.http(a.replication_address, spec.metrics_port, "GET /metrics").startswith(
            "HTTP/1.1 200"
        )
        # Heartbeats forged in a's name (no key) are turned away by b's agent.
        intruder.forge_heartbeats(
            b.replication_address,
            ports.heartbeat_port(b, spec.heartbeat.port),
            spec.vm.name,
            a.name,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = pair.status(b.name)
            if seen is not None and seen["peer_health"]["rejected_heartbeats"] >= 20:
                break
            time.sleep(0.2)
        assert seen is not None and seen["peer_health"]["rejected_heartbeats"] >= 20, seen
        # Strangers that stay connected to the secondary while the primary dies.
        for node, port in ((b, ports.NBD), (b, ports.MIGRATION)):
            held.append(intruder.hold(node.replication_address, ports.port(node, port)))
        view = pair.status(a.name)
        assert view is not None and view["protected"], view

    try:
        with intruder.routed():
            found = asyncio.run(
                fault_round(
                    pair, "kill-primary", tmp_path, load_s=15.0, fault_after_s=5.0, serving=knock
                )
            )
    finally:
        for proc in held:
            proc.kill()
            proc.wait()
    print(nbd_errors)
    refused = {k: v for k, v in nbd_errors.items() if k != "peer"}
    assert len(refused) == 3 and all(refused.values()) and nbd_errors["peer"] == "", nbd_errors
    assert "TLS negotiation required" in nbd_errors["no certificate"], nbd_errors
    # Refused by the server, not by the stranger's own checks.
    assert not any("Our own certificate" in e for e in nbd_errors.values()), nbd_errors
    record = found.failover
    assert record is not None and (record["survivor"], record["error"]) == ("b", None), record
    assert_oracles(found)
    assert found.result["max_reply_gap_ms"] < 1000, found.result["max_reply_gap_ms"]


def test_a_packet_channel_takes_only_the_peer(lab: None, tmp_path: Path) -> None:
    """A QEMU with a's credentials and a TLS channel end on a's replication address,
    as the primary's mirror channel has: strangers are refused one after the other and
    it stays free; then the peer (b's certificate) connects."""
    spec = lab_spec(interval_ms=2000, reprotect=False)
    a, b = spec.primary, spec.secondary
    port = a.port_base + 100
    binary = qemu_binary.choose(spec.vm.accel, spec.qemu_binary).binary
    qmp = tmp_path / "qmp.sock"
    argv = [str(binary), "-machine", "none", "-nodefaults", "-display", "none"]
    argv += tls_objects(spec, a)
    argv += [
        "-chardev",
        f"socket,id=ch0,host={a.replication_address},port={port},server=on,wait=off,"
        "tls-creds=tls-server,tls-authz=tls-peers",
        "-chardev",
        f"socket,id=m,path={qmp},server=on,wait=off",
        "-mon",
        "chardev=m,mode=control",
    ]
    proc = launch("tls-check", argv, a.netns, tmp_path)

    async def channel_state() -> str:
        session = QmpSession("tls-check", qmp)
        await session.connect()
        try:
            found = await session.execute("query-chardev", deadline_s=5)
        finally:
            await session.close()
        return next(str(c["filename"]) for c in found if c["label"] == "ch0")

    try:
        asyncio.run(wait_started(proc, qmp))
        with intruder.routed():
            for who in intruder.identities(spec, a.name, tmp_path / "ids"):
                outcome = intruder.attempt(a.replication_address, port, who)
                print(who.name, outcome)
                assert outcome.connected and not outcome.served, (who.name, outcome)
                assert outcome.refused, (who.name, outcome)
                assert asyncio.run(channel_state()).startswith("disconnected"), who.name
        peer = intruder.Identity(
            "b",
            spec.certs_of(b) / "ca-cert.pem",
            spec.certs_of(b) / "client-cert.pem",
            spec.certs_of(b) / "client-key.pem",
        )
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(intruder.attempt, a.replication_address, port, peer, 4.0, b.netns)
            states = []
            for _ in range(30):
                states.append(asyncio.run(channel_state()))
                if not states[-1].startswith("disconnected"):
                    break
                time.sleep(0.1)
            outcome = pending.result()
        print("peer", outcome, states)
        assert outcome.handshake and not outcome.refused, outcome
        assert not states[-1].startswith("disconnected"), states
    finally:
        proc.kill()
