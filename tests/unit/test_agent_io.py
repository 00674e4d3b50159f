"""The agent's two small protocols on real local sockets: heartbeats (UDP) and the
status API (HTTP over a UNIX socket). The agent behind them is a stand-in; the
agent itself is exercised against real QEMU in the integration suite."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from coloft.agent import api
from coloft.effects.heartbeat import LAN, REPLICATION, Heartbeat
from coloft.errors import ColoftError
from coloft.model.status import one_line, pair_view


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_heartbeats_tell_a_lost_path_from_a_lost_peer() -> None:
    async def scenario() -> None:
        # Different ports on each side, as with different port_base values.
        ports = (free_udp_port(), free_udp_port())
        # Two paths per node: 127.0.0.1 plays the replication net, 127.0.0.2 the LAN.
        paths_a = {REPLICATION: ("127.0.0.1", "127.0.0.3"), LAN: ("127.0.0.2", "127.0.0.4")}
        paths_b = {REPLICATION: ("127.0.0.3", "127.0.0.1"), LAN: ("127.0.0.4", "127.0.0.2")}
        changes: list[str] = []
        a = Heartbeat(
            "p", "a", "b", paths_a, ports, 0.02, lambda: {"state": "primary"}, lambda: None
        )
        b = Heartbeat(
            "p",
            "b",
            "a",
            paths_b,
            (ports[1], ports[0]),
            0.02,
            lambda: {"state": "secondary"},
            lambda: changes.append("x"),
        )
        await a.open()
        await b.open()
        tasks = [asyncio.create_task(h.run()) for h in (a, b)]
        await asyncio.sleep(0.2)
        t = time.monotonic()
        assert b.peer.fresh(REPLICATION, t, 0.1) and b.peer.fresh(LAN, t, 0.1)
        assert b.peer.message is not None and b.peer.message["state"] == "primary"
        assert changes, "the first message from the peer is news"
        # a stops using its replication path: b still hears a on the LAN.
        await a.retarget("b", {LAN: paths_a[LAN]}, ports[1])
        await asyncio.sleep(0.2)
        t = time.monotonic()
        assert not b.peer.fresh(REPLICATION, t, 0.1) and b.peer.fresh(LAN, t, 0.1)
        for task in tasks:
            task.cancel()
        a.close()
        await asyncio.sleep(0.2)
        assert not b.peer.any_fresh(time.monotonic(), 0.1)
        b.close()

    asyncio.run(scenario())


def test_the_sender_tells_a_pair_once_each_path_goes_silent_and_again_after_news() -> None:
    async def scenario() -> None:
        ports = (free_udp_port(), free_udp_port())
        paths_a = {REPLICATION: ("127.0.0.1", "127.0.0.3"), LAN: ("127.0.0.2", "127.0.0.4")}
        paths_b = {REPLICATION: ("127.0.0.3", "127.0.0.1"), LAN: ("127.0.0.4", "127.0.0.2")}
        limit = 0.15  # 7 beats: a busy test host does not fake a silence
        told: list[tuple[float, bool]] = []

        def silent() -> None:
            now = time.monotonic()
            told.append((now, b.peer.any_fresh(now, limit)))

        def sender() -> Heartbeat:
            return Heartbeat("p", "a", "b", paths_a, ports, 0.02, dict, lambda: None)

        b = Heartbeat(
            "p", "b", "a", paths_b, (ports[1], ports[0]), 0.02, dict, lambda: None,
            silent_after_s=limit, on_silent=silent,
        )  # fmt: skip
        a = sender()
        await a.open()
        await b.open()
        b_task, a_task = asyncio.create_task(b.run()), asyncio.create_task(a.run())
        await asyncio.sleep(0.3)
        assert not told, "a peer heard every beat is never reported silent"
        a_task.cancel()
        a.close()
        await asyncio.sleep(0.5)
        # Both paths fell silent: told once or twice (each path once), never while
        # a path was still fresh.
        assert 1 <= len(told) <= 2 and not any(fresh for _, fresh in told), told
        last = max(p.last_at or 0 for p in b.peer.paths.values())
        assert told[0][0] > last + limit
        told.clear()
        a = sender()
        await a.open()
        a_task = asyncio.create_task(a.run())
        await asyncio.sleep(0.2)
        assert not told, "the peer is back"
        a_task.cancel()
        a.close()
        await asyncio.sleep(0.5)
        assert told, "a peer lost again is reported again"
        b_task.cancel()
        b.close()

    asyncio.run(scenario())


def test_a_third_node_is_only_noted_alive_until_it_becomes_the_peer() -> None:
    async def scenario() -> None:
        ports = (free_udp_port(), free_udp_port(), free_udp_port())  # a, b, c
        b = Heartbeat(
            "p",
            "b",
            "a",
            {REPLICATION: ("127.0.0.3", "127.0.0.1")},
            (ports[1], ports[0]),
            0.02,
            dict,
            lambda: None,
        )
        c = Heartbeat(
            "p",
            "c",
            "b",
            {REPLICATION: ("127.0.0.5", "127.0.0.3")},
            (ports[2], ports[1]),
            0.02,
            lambda: {"state": "spare"},
            lambda: None,
        )
        await b.open()
        await c.open()
        task = asyncio.create_task(c.run())
        await asyncio.sleep(0.2)
        now = time.monotonic()
        assert b.peer.message is None and not b.peer.any_fresh(now, 0.1), "c is not b's peer"
        assert b.heard_from("c", now, 0.1) and not b.heard_from("a", now, 0.1)
        silent = b.silent_s(now, 0.1)
        assert silent is not None and silent >= 0.15, "a never heard: silent since listening"
        await b.retarget("c", {REPLICATION: ("127.0.0.3", "127.0.0.5")}, ports[2])
        await asyncio.sleep(0.2)
        now = time.monotonic()
        assert b.peer.fresh(REPLICATION, now, 0.1) and b.silent_s(now, 0.1) is None
        assert b.peer.message is not None and b.peer.message["state"] == "spare"
        task.cancel()
        b.close()
        c.close()

    asyncio.run(scenario())


class StandIn:
    def __init__(self) -> None:
        self.asked: list[bool] = []
        self.switched: list[bool] = []
        self.protected = True
        self.leading = True

    def status(self) -> dict[str, Any]:
        return {
            "state": "primary",
            "protected": self.protected,
            "phase": "protected" if self.protected else "degraded",
            "protection_reason": "in COLO" if self.protected else "mirror channel disconnected",
        }

    def protection_summary(self) -> dict[str, Any]:
        return self.status()

    async def request_failover(self, force: bool) -> dict[str, Any]:
        self.asked.append(force)
        return {"node": "a", "state": "fenced", "reason": "planned failover"}

    def metrics_text(self) -> bytes:
        return b"# TYPE coloft_up gauge\ncoloft_up 1.0\n"

    def events_since(self, since: float) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = [{"unix": 1.0, "kind": "a"}, {"unix": 2.0, "kind": "b"}]
        return [e for e in events if e["unix"] > since]

    async def request_protection(self, on: bool) -> dict[str, Any]:
        if not self.leading:
            raise ColoftError("b does not lead this pair (secondary)")
        self.switched.append(on)
        return {"node": "a", "state": "primary", "protection": on}


def exchange(path: Path, data: bytes) -> tuple[bytes, bytes]:
    """One raw request on the agent's socket: the answer's head and body."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head, body


def raw_text(path: Path, data: bytes) -> tuple[int, str]:
    head, body = exchange(path, data)
    assert b"Content-Type: text/plain; version=0.0.4" in head, head
    return int(head.split()[1]), body.decode()


def test_metrics_alone_are_served_over_tcp() -> None:
    agent = StandIn()

    async def scenario() -> None:
        server = await api.serve_metrics("127.0.0.1", 0, agent)
        port = server.sockets[0].getsockname()[1]
        try:

            def get(line: bytes) -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(line)
                    reply = b""
                    while chunk := s.recv(65536):
                        reply += chunk
                return reply

            ok = await asyncio.to_thread(get, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"coloft_up 1.0\n")
            for other in (b"GET /status HTTP/1.1\r\n\r\n", b"POST /failover HTTP/1.1\r\n\r\n"):
                no = await asyncio.to_thread(get, other)
                assert no.startswith(b"HTTP/1.1 404") and b"only GET /metrics" in no, no
            assert agent.asked == []
        finally:
            server.close()

    asyncio.run(scenario())


def raw(path: Path, data: bytes) -> tuple[int, dict[str, Any]]:
    head, body = exchange(path, data)
    return int(head.split()[1]), json.loads(body)


def test_api_serves_status_and_intents_and_names_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    agent = StandIn()

    async def scenario() -> None:
        server = await api.serve(path, agent)
        try:
            got = await asyncio.to_thread(api.call, path, "GET", "/status")
            assert got["state"] == "primary"
            code, body = await asyncio.to_thread(raw, path, b"GET /protected HTTP/1.1\r\n\r\n")
            assert (code, body["protected"]) == (200, True)
            agent.protected = False
            code, body = await asyncio.to_thread(raw, path, b"GET /protected HTTP/1.1\r\n\r\n")
            assert (code, body["protected"]) == (503, False) and "mirror" in body["reason"]
            answer = await asyncio.to_thread(api.call, path, "POST", "/failover", {"force": True})
            assert answer["state"] == "fenced" and agent.asked == [True]
            answer = await asyncio.to_thread(api.call, path, "POST", "/protection", {"on": False})
            assert answer["protection"] is False and agent.switched == [False]
            code, text = await asyncio.to_thread(raw_text, path, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert (code, text) == (200, "# TYPE coloft_up gauge\ncoloft_up 1.0\n")
            got = await asyncio.to_thread(api.call, path, "GET", "/events?since=1.5")
            assert got == {"events": [{"unix": 2.0, "kind": "b"}]}
            agent.leading = False
            with pytest.raises(ColoftError, match="409: b does not lead"):
                await asyncio.to_thread(api.call, path, "POST", "/protection", {"on": True})
            cases = [
                (b"GET /nope HTTP/1.1\r\n\r\n", 404, "no such endpoint"),
                (b"POST /status HTTP/1.1\r\n\r\n", 405, "use GET"),
                (b"garbage\r\n\r\n", 400, "bad request line"),
                (b"POST /failover HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope", 400, "not JSON"),
                (
                    b'POST /failover HTTP/1.1\r\nContent-Length: 16\r\n\r\n{"force": "yes"}',
                    400,
                    "expected",
                ),
                (b"POST /failover HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", 413, "exceeds"),
                (b"POST /protection HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400, "object"),
                (
                    b'POST /protection HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"on": "no"}',
                    400,
                    "expected",
                ),
                (b"GET /protection HTTP/1.1\r\n\r\n", 405, "use POST /protection"),
                (b"GET /events?since=x HTTP/1.1\r\n\r\n", 400, "since: expected unix"),
            ]
            for data, status, words in cases:
                code, body = await asyncio.to_thread(raw, path, data)
                assert code == status and words in body["error"], (data, code, body)
            with pytest.raises(ColoftError, match="404"):
                await asyncio.to_thread(api.call, path, "GET", "/other")
        finally:
            server.close()

    asyncio.run(scenario())
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ColoftError, match="agent at"):
        api.call(tmp_path / "missing.sock", "GET", "/status")


def test_the_api_answers_nobody_but_root_even_on_a_loosened_socket() -> None:
    # pytest's tmp_path lies under a root-only directory: nobody could not reach it.
    where = Path(tempfile.mkdtemp(prefix="coloft-api-"))
    path = where / "agent.sock"
    agent = StandIn()
    request = b'POST /failover HTTP/1.1\r\nContent-Length: 15\r\n\r\n{"force": true}'

    def as_nobody() -> bytes:
        # A child that drops to user nobody and sends the intent.
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            f"s.sendall({request!r}); print(s.recv(4096).decode())\n"
        )
        done = subprocess.run(
            ["/usr/bin/python3", "-c", code, str(path)], capture_output=True, timeout=20
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def scenario() -> None:
        server = await api.serve(path, agent)
        try:
            assert path.stat().st_mode & 0o777 == 0o600
            os.chmod(where, 0o755)
            os.chmod(path, 0o666)
            reply = await asyncio.to_thread(as_nobody)
            assert reply.startswith(b"HTTP/1.1 403") and b"only root" in reply, reply
            assert agent.asked == []
        finally:
            server.close()

    if os.geteuid() != 0:
        pytest.fail("the lab and its tests run as root")
    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(where)


def agent_status(node: str, state: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": node,
        "state": state,
        "role": "primary" if state in ("primary", "alone") else "secondary",
        "reason": f"{node} reason",
        "qemu": {"pid": 10, "alive": True, "colo_mode": "primary"},
        "agent_pid": 9,
        "peer_health": {"paths_ms": {"replication": 12.0, "lan": 14.0}},
        "epoch": 7 if state in ("primary", "alone") else None,
        "sync": "b",
        "phase": "protected",
        "protected": True,
        "protection_reason": "in COLO, last checkpoint 0.5 s ago",
        "checkpoints": {"count": 3},
        "failover": None,
    }
    return {**base, **extra}


def test_pair_view_trusts_the_leader_and_says_so_in_one_line() -> None:
    view = pair_view(
        "web", {"a": agent_status("a", "primary"), "b": agent_status("b", "secondary")}
    )
    assert (view["phase"], view["protected"], view["leader"], view["epoch"]) == (
        "protected",
        True,
        "a",
        7,
    )
    line = one_line(view)
    assert line.startswith("web: PROTECTED | leader a (epoch 7) | a primary [peer heard: lan 14 ms")
    assert line.endswith("-- in COLO, last checkpoint 0.5 s ago")
    # No leader answering: never protected, whatever the secondary last heard.
    lone = pair_view("web", {"a": None, "b": agent_status("b", "secondary")})
    assert not lone["protected"] and lone["phase"] == "unprotected"
    assert "no leader" in lone["reason"] and lone["nodes"][0]["state"] == "no-agent"
    assert pair_view("web", {"a": None, "b": None})["phase"] == "stopped"
    # A degraded pair says why, machine-readably, right after its state.
    broken = agent_status(
        "a",
        "primary",
        phase="degraded",
        protected=False,
        protection_reason="comparison path broken: mirror channel disconnected",
        protection_code="mirror-disconnected",
    )
    view = pair_view("web", {"a": broken, "b": agent_status("b", "secondary")})
    assert view["code"] == "mirror-disconnected"
    assert one_line(view).startswith("web: DEGRADED(mirror-disconnected) | leader a")


def test_one_line_shows_the_checkpoint_rate_and_the_time_unprotected() -> None:
    lead = agent_status("a", "alone", checkpoints={"count": 9, "per_min": 30.0}, unprotected_s=12.4)
    line = one_line(pair_view("web", {"a": lead, "b": None}))
    assert "| 30 checkpoints/min | unprotected 12 s so far --" in line, line
    lead["checkpoints"]["forced"] = 3
    line = one_line(pair_view("web", {"a": lead, "b": None}))
    assert "| 30 checkpoints/min (33 % forced) |" in line, line


def on_one_port(
    hub: Any,
    port: int,
    nodes: tuple[str, str],
    here_there: tuple[str, str],
    keys: dict[str, bytes] | None = None,
    state: Any = dict,
) -> dict[str, Heartbeat]:
    """Pairs p and q of one agent, sharing its heartbeat port on one path."""
    return {
        name: Heartbeat(
            name,
            *nodes,
            {REPLICATION: here_there},
            (port, port),
            0.05,
            functools.partial(state, vm=name),
            lambda: None,
            None if keys is None else keys[name],
            hub,
        )
        for name in ("p", "q")
    }


def test_pairs_sharing_a_heartbeat_port_share_one_datagram_per_path_and_beat() -> None:
    from coloft.effects import heartbeat as hb

    async def scenario() -> None:
        shared = free_udp_port()
        keys = {"p": b"p" * 32, "q": b"q" * 32}
        hub = hb.Hub()
        sending: Any = functools.partial(dict, boot="a1", state="primary")
        beats = list(
            on_one_port(hub, shared, ("a", "b"), ("127.0.0.1", "127.0.0.3"), keys, sending).values()
        )
        # The peer host: one plain socket where both pairs' heartbeats go.
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.3", shared))
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        for h in beats:
            await h.open()
        tasks = [asyncio.create_task(h.run()) for h in beats]
        datagrams = [await asyncio.wait_for(loop.sock_recv(peer, 65536), 1) for _ in range(3)]
        for data in datagrams:
            items = data.split(b"\n")
            assert len(items) == 2, data
            bodies = {}
            for item in items:
                body = json.loads(item[hb.MAC_LEN :])
                assert hb.seal(keys[body["pair"]], item[hb.MAC_LEN :]) == item, "own pair's key"
                bodies[body["pair"]] = body
            assert {n: b["vm"] for n, b in bodies.items()} == {"p": "p", "q": "q"}
        # The other side: b's pairs on their shared socket hear a's, each its own.
        hub_b = hb.Hub()
        heard = on_one_port(hub_b, shared, ("b", "a"), ("127.0.0.4", "127.0.0.1"), keys)
        for h in heard.values():
            await h.open()
        ep = next(iter(heard["p"]._endpoints.values()))
        assert ep is next(iter(heard["q"]._endpoints.values())), "one socket for both pairs"
        a_bundle = datagrams[-1].split(b"\n")
        stranger = hb.seal(b"x" * 32, json.dumps({"pair": "r", "node": "a"}).encode())
        ep.datagram_received(b"\n".join([*a_bundle, stranger]), ("127.0.0.1", shared))
        for name, h in heard.items():
            assert h.peer.message is not None and h.peer.message["vm"] == name
            assert h.peer.paths[REPLICATION].count == 1 and h.rejected == 0
        assert ep.unreadable == 0, "a pair not run here is no fault of the datagram"
        # q's message under p's key is p's problem only; garbage is counted apart.
        q_item = json.loads(a_bundle[1][hb.MAC_LEN :])
        forged = {**q_item, "pair": "p", "seq": q_item["seq"] + 10}
        forged_item = hb.seal(keys["q"], json.dumps(forged).encode())
        ep.datagram_received(b"\n".join([forged_item, b"not json"]), ("127.0.0.1", shared))
        assert (heard["p"].rejected, heard["q"].rejected, ep.unreadable) == (1, 0, 1)
        # A pair whose state cannot be read fails its own run(); the other beats on.
        calls = 0

        def broken() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            raise RuntimeError("no state")

        beats[0].state = broken
        with pytest.raises(RuntimeError, match="no state"):
            await asyncio.wait_for(tasks[0], 1)
        while True:
            data = await asyncio.wait_for(loop.sock_recv(peer, 65536), 1)
            if len(data.split(b"\n")) == 1:
                break
        assert json.loads(data[hb.MAC_LEN :])["pair"] == "q" and calls == 1
        tasks[1].cancel()
        for h in [*beats, *heard.values()]:
            h.close()
        assert not hub._endpoints and not hub_b._endpoints, "the last pair closes the socket"
        peer.close()

    asyncio.run(scenario())


def test_pairs_of_one_agent_opening_a_shared_port_at_once_share_its_socket() -> None:
    """The pairs of an agent start together: both must get the one socket, not one of
    them a port its sibling bound a moment before (as a fleet's start once did)."""
    from coloft.effects import heartbeat as hb

    async def scenario() -> None:
        hub = hb.Hub()
        beats = on_one_port(hub, free_udp_port(), ("a", "b"), ("127.0.0.1", "127.0.0.3"))
        await asyncio.gather(*(h.open() for h in beats.values()))
        ep = next(iter(beats["p"]._endpoints.values()))
        assert ep is next(iter(beats["q"]._endpoints.values()))
        assert set(ep.members) == {"p", "q"} and len(hub._endpoints) == 1
        for h in beats.values():
            h.close()

    asyncio.run(scenario())


def test_a_heartbeat_port_another_agent_holds_is_named() -> None:
    async def scenario() -> None:
        port = free_udp_port()
        paths = {REPLICATION: ("127.0.0.1", "127.0.0.3")}
        first = Heartbeat("p", "a", "b", paths, (port, port), 0.05, dict, lambda: None)
        other_agent = Heartbeat("q", "a", "b", paths, (port, port), 0.05, dict, lambda: None)
        await first.open()
        with pytest.raises(ColoftError, match=f"heartbeat port {port} on 127.0.0.1: .*in use"):
            await other_agent.open()
        first.close()

    asyncio.run(scenario())


def test_a_broken_heartbeat_sender_fails_every_pair_loop_instead_of_going_quiet() -> None:
    from coloft.effects import heartbeat as hb

    async def scenario() -> None:
        hub, port = hb.Hub(), free_udp_port()
        beats = list(on_one_port(hub, port, ("a", "b"), ("127.0.0.1", "127.0.0.3")).values())
        for h in beats:
            await h.open()

        def broken(there: tuple[str, int], items: list[bytes]) -> None:
            raise RuntimeError("send broke")

        next(iter(hub._endpoints.values())).send = broken  # type: ignore[method-assign]
        results = await asyncio.wait_for(
            asyncio.gather(*(h.run() for h in beats), return_exceptions=True), 1
        )
        assert [str(r) for r in results] == ["send broke", "send broke"]
        for h in beats:
            h.close()

    asyncio.run(scenario())


def test_keyed_heartbeats_count_only_authentic_fresh_datagrams_from_their_own_path() -> None:
    from coloft.effects import heartbeat as hb

    key = b"k" * 32
    heard: list[str] = []
    b = Heartbeat(
        "p",
        "b",
        "a",
        {REPLICATION: ("127.0.0.3", "127.0.0.1"), LAN: ("127.0.0.4", "127.0.0.2")},
        (1, 2),
        0.05,
        lambda: {"state": "secondary"},
        lambda: heard.append("x"),
        key,
    )

    def datagram(
        seq: int, path: str, k: bytes | None = key, boot: str = "b1", unix: float = 0.0
    ) -> bytes:
        body = {"pair": "p", "node": "a", "seq": seq, "boot": boot, "state": "primary"}
        body |= {"path": path, "unix": unix or 1000.0 + seq}
        return hb.seal(k, json.dumps(body).encode())

    # Each path's socket, without binding one: datagrams are handed to it directly.
    sockets = {path: hb._Endpoint(here, 1) for path, (here, _there) in b.paths.items()}
    for ep in sockets.values():
        ep.members["p"] = b
    b._endpoints = dict(sockets)

    def deliver(path: str, data: bytes) -> None:
        sockets[path].datagram_received(data, ("127.0.0.9", 1))

    deliver(REPLICATION, datagram(1, REPLICATION))
    assert b.peer.paths[REPLICATION].count == 1 and heard == ["x"]
    # Forged (no key, wrong key), replayed, and relayed from the other path: none counts.
    deliver(REPLICATION, datagram(2, REPLICATION, None))
    deliver(REPLICATION, datagram(3, REPLICATION, b"z" * 32))
    deliver(REPLICATION, datagram(1, REPLICATION))
    deliver(REPLICATION, datagram(4, LAN))
    assert b.peer.paths[REPLICATION].count == 1 and b.peer.paths[LAN].count == 0
    assert b.rejected == 2
    deliver(LAN, datagram(4, LAN))
    deliver(REPLICATION, datagram(5, REPLICATION))
    assert (b.peer.paths[REPLICATION].count, b.peer.paths[LAN].count) == (2, 1)
    assert b.peer.message is not None and b.peer.message["seq"] == 5
    # A datagram of an earlier run of the peer's agent is older by its clock: a replay.
    deliver(REPLICATION, datagram(900, REPLICATION, boot="b0", unix=500.0))
    assert b.peer.paths[REPLICATION].count == 2
    # A restarted agent starts its sequence again, later by its clock.
    deliver(REPLICATION, datagram(1, REPLICATION, boot="b2", unix=2000.0))
    assert b.peer.paths[REPLICATION].count == 3


def test_a_wait_for_protection_gives_up_when_no_agent_can_start_anything() -> None:
    from coloft.agent.launch import _hopeless

    starting = {"state": "starting", "epoch": None}
    assert not _hopeless({"a": starting, "b": starting})
    assert not _hopeless({"a": None, "b": None})
    # A QEMU that refused the spec: the leader stopped its copy, the other waits for it.
    refused = {"state": "fenced", "epoch": None}
    assert _hopeless({"a": refused, "b": starting})
    assert _hopeless({"a": refused, "b": {"state": "down", "epoch": None}})
    # Someone still leads: a rejoin or a takeover may come.
    assert not _hopeless({"a": refused, "b": {"state": "alone", "epoch": 3}})
    assert not _hopeless({"a": {"state": "starting", "epoch": 2}, "b": {"state": "down"}})


def test_heartbeats_measure_the_peers_clock_and_the_line_warns_when_it_is_off() -> None:
    from coloft.effects import heartbeat as hb

    paths = {REPLICATION: ("127.0.0.3", "127.0.0.1")}
    b = Heartbeat("p", "b", "a", paths, (1, 2), 0.05, dict, lambda: None)
    assert b.peer.clock_offset_s() is None
    now = time.time()
    for seq, lag in enumerate((3.2, 3.0, 3.4), 1):
        body = {"pair": "p", "node": "a", "seq": seq, "boot": "x", "unix": now - lag}
        b._received(REPLICATION, body)
    offset = b.peer.clock_offset_s()
    assert offset is not None and 2.9 < offset < 3.2, offset
    assert hb.CLOCK_SAMPLES >= 3
    ahead = agent_status("a", "primary")
    ahead["peer_health"]["clock_offset_ms"] = 3000.0
    line = one_line(pair_view("web", {"a": ahead, "b": agent_status("b", "secondary")}))
    assert (
        "a primary [peer heard: lan 14 ms, replication 12 ms] [clock +3.0 s from the peer's]"
        in line
    ), line
    ahead["peer_health"]["clock_offset_ms"] = 20.0
    assert "clock" not in one_line(pair_view("web", {"a": ahead, "b": None}))


def test_the_peer_is_news_when_a_verdict_input_changes_not_when_its_clocks_move() -> None:
    from coloft.effects.heartbeat import _changed

    protected = {"phase": "protected", "protected": True, "code": "", "reason": "probe 3 ms"}
    base = {
        "state": "secondary",
        "checkpoints": 7,
        "checkpoint_age_s": 0.4,
        "stopped_for_s": None,
        "channels": {"mirror": "ok"},
        "protection": protected,
    }
    moved = {**base, "checkpoints": 8, "checkpoint_age_s": 0.05}
    assert not _changed(base, moved), "counters and ages move with every message"
    assert not _changed(base, {**base, "protection": {**protected, "reason": "probe 4 ms"}})
    degraded = {**protected, "phase": "degraded", "protected": False, "code": "probe-timeout"}
    assert _changed(base, {**base, "protection": degraded})
    assert _changed(base, {**base, "channels": {"mirror": "half-open"}})
    assert _changed(base, {**base, "stopped_for_s": 0.01}), "a checkpoint began there"
    assert not _changed({**base, "stopped_for_s": 0.01}, {**base, "stopped_for_s": 0.3})
    assert _changed(base, {**base, "qemu_hung": True})
