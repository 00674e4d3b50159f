"""The agent's local API: HTTP/1.1 over a root-only UNIX socket.

    GET  /status            the agent's status (JSON)
    GET  /protected         200 only while this agent leads a pair it judges PROTECTED,
                            503 otherwise; the body says why
    POST /failover          body {"force": bool}: ask for a failover; answers with
                            the leader's decision
    GET  /metrics           Prometheus text exposition of this agent's metrics
    GET  /events?since=T    this agent's journal events after T (unix seconds), as
                            {"events": [...]}, oldest first
    POST /protection        body {"on": bool}: the leader switches protection on
                            (re-protect now) or off (drop the secondary); 409 when
                            this agent does not lead

Small on purpose: one request per connection, bounded header and body sizes,
every read under a deadline. Only root (or the agent's own user, checked by the
peer's credentials) is answered. The CLI uses only this.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from coloft.errors import ColoftError, TransientError
from coloft.model.spec import PairSpec

MAX_HEAD = 8192
MAX_BODY = 65536
READ_DEADLINE_S = 5.0
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Served(Protocol):
    def status(self) -> dict[str, Any]: ...

    # The few status fields /protected needs: it is polled often, status is large.
    def protection_summary(self) -> dict[str, Any]: ...

    async def request_failover(self, force: bool) -> dict[str, Any]: ...

    async def request_protection(self, on: bool) -> dict[str, Any]: ...

    def events_since(self, since: float) -> list[dict[str, Any]]: ...

    def metrics_text(self) -> bytes: ...


def run_base() -> Path:
    """Where every pair's run directory lives on this host."""
    return Path(os.environ.get("COLOFT_RUN", "/run/coloft"))


def run_root(spec: PairSpec) -> Path:
    return run_base() / spec.vm.name


def socket_path(spec: PairSpec, node: str) -> Path:
    return run_base() / spec.vm.name / f"agent-{node}.sock"


def agent_sockets(vm: str) -> dict[str, Path]:
    """The agents of pair `vm` that serve on this host, by node."""
    return {
        p.stem.removeprefix("agent-"): p for p in sorted((run_base() / vm).glob("agent-*.sock"))
    }


def pairs_here() -> list[str]:
    """Names of the pairs with an agent socket on this host."""
    return sorted({p.parent.name for p in run_base().glob("*/agent-*.sock")})


def status_or_none(path: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """An agent's status; None when it does not answer (stopped, killed, hung)."""
    try:
        data: dict[str, Any] = call(path, "GET", "/status", timeout=timeout)
    except ColoftError:
        return None
    return data


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as e:
        raise BadRequest(431, "request head too large") from e
    except asyncio.IncompleteReadError as e:
        raise BadRequest(400, "incomplete request") from e
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"bad request line {lines[0][:80]!r}")
    method, target = parts[0], parts[1]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise BadRequest(400, "bad Content-Length")
            length = int(value.strip())
    if length > MAX_BODY:
        raise BadRequest(413, f"body of {length} bytes exceeds {MAX_BODY}")
    body = await reader.readexactly(length) if length else b""
    return method, target, body


async def _route(agent: Served, method: str, target: str, body: bytes) -> tuple[int, Any]:
    path, _, query = target.partition("?")
    if path == "/metrics":
        if method != "GET":
            raise BadRequest(405, "use GET /metrics")
        return 200, agent.metrics_text()
    if path == "/events":
        if method != "GET":
            raise BadRequest(405, "use GET /events")
        args = urllib.parse.parse_qs(query)
        try:
            since = float(args.get("since", ["0"])[0])
        except ValueError as e:
            raise BadRequest(400, "since: expected unix seconds") from e
        return 200, {"events": agent.events_since(since)}
    if target == "/status":
        if method != "GET":
            raise BadRequest(405, "use GET /status")
        return 200, agent.status()
    if target == "/protected":
        if method != "GET":
            raise BadRequest(405, "use GET /protected")
        s = agent.protection_summary()
        # Only the leader judges protection; a secondary's word is second-hand.
        yes = bool(s.get("protected")) and s.get("state") == "primary"
        answer = {
            "protected": yes,
            "phase": s.get("phase"),
            "reason": s.get("protection_reason"),
            "code": s.get("protection_code"),
        }
        return (200 if yes else 503), answer
    if target == "/failover":
        if method != "POST":
            raise BadRequest(405, "use POST /failover")
        request = _json_object(body)
        if not isinstance(request.get("force", False), bool):
            raise BadRequest(400, 'expected {"force": true|false}')
        return 200, await agent.request_failover(bool(request.get("force", False)))
    if target == "/protection":
        if method != "POST":
            raise BadRequest(405, "use POST /protection")
        request = _json_object(body)
        if set(request) != {"on"} or not isinstance(request["on"], bool):
            raise BadRequest(400, 'expected {"on": true|false}')
        try:
            return 200, await agent.request_protection(request["on"])
        except ColoftError as e:
            raise BadRequest(409, str(e)) from e
    raise BadRequest(
        404,
        f"no such endpoint {target[:80]!r} "
        "(try /status, /protected, /metrics, /events, /failover, /protection)",
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body or b"{}")
    except ValueError as e:
        raise BadRequest(400, f"body is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise BadRequest(400, "body is not a JSON object")
    return request


def _response(status: int, payload: Any) -> bytes:
    # Bytes are the metrics' text exposition; everything else is JSON.
    kind = METRICS_TYPE if isinstance(payload, bytes) else "application/json"
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reason = http.client.responses.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


Route = Callable[[Served, str, str, bytes], Awaitable[tuple[int, Any]]]


async def _metrics_only(agent: Served, method: str, target: str, body: bytes) -> tuple[int, Any]:
    if target != "/metrics" or method != "GET":
        raise BadRequest(404, "only GET /metrics here")
    return await _route(agent, method, target, body)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user id of the process at the other end of a UNIX socket."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def _authorized(writer: asyncio.StreamWriter) -> bool:
    """Only root or the agent's own user may talk to the agent. The socket's mode
    already says so; this holds even if someone loosens it."""
    uid = _peer_uid(writer)
    return uid is None or uid in (0, os.geteuid())


def _handler(agent: Served, route: Route) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_DEADLINE_S):
                method, target, body = await _read_request(reader)
            if not _authorized(writer):
                raise BadRequest(403, "only root may use the agent's API")
            status, payload = await route(agent, method, target, body)
        except BadRequest as e:
            payload, status = {"error": str(e)}, e.status
        except TimeoutError:
            payload, status = {"error": "request not received in time"}, 408
        try:
            writer.write(_response(status, payload))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    return handle


async def serve(path: Path, agent: Served) -> asyncio.Server:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    # Created root-only: a chmod afterwards would leave a moment with the umask's mode.
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(_handler(agent, _route), path, limit=MAX_HEAD)
    finally:
        os.umask(old)
    return server


async def serve_metrics(host: str, port: int, agent: Served) -> asyncio.Server:
    """GET /metrics alone over TCP, for a Prometheus server; nothing else is reachable."""
    return await asyncio.start_server(
        _handler(agent, _metrics_only), host, port, limit=MAX_HEAD, reuse_address=True
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.unix_path))
        self.sock = sock


def call(path: Path, method: str, target: str, body: Any = None, timeout: float = 5.0) -> Any:
    """One request to an agent; raises TransientError when nobody answers."""
    conn = _UnixConnection(path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        payload = json.loads(resp.read() or b"null")
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise TransientError(f"agent at {path}: {e}") from e
    finally:
        conn.close()
    if resp.status != 200:
        message = payload.get("error") if isinstance(payload, dict) else payload
        raise ColoftError(f"agent at {path}: {resp.status}: {message}")
    return payload
