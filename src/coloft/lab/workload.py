"""Workload client and verifier for the guest's durable key/value service.

The guest serves a line protocol at ``192.0.2.10:7000`` (one request per line, persistent
connection)::

    PUT <key> <value>  -> OK <key>          (only once the write is durable)
    GET <key>          -> VAL <key> <value> | NONE <key>
    PING               -> PONG
    anything bad       -> ERR <text>

The client runs as its own process inside the client namespace (Python 3.11 has no
``os.setns``)::

    ip netns exec coloft-client python -m coloft.lab.workload run \\
        --target 192.0.2.10:7000 --duration 60 --out DIR --run-id r1
    ip netns exec coloft-client python -m coloft.lab.workload verify \\
        --target 192.0.2.10:7000 --acked DIR/acked.jsonl --out DIR/verify.json

``serve --listen HOST:PORT`` runs an in-memory reference server of the protocol, for tests of
the lab without a guest.

Files written by ``run`` into ``DIR``:

- ``acked.jsonl``: one ``{"key", "value", "t", "conn"}`` line per acknowledged PUT, appended
  and flushed as soon as the ``OK`` arrives (a crash of the client loses nothing).
- ``live.json`` (every 0.5 s, atomically): running counters (totals since the start), while
  ``latency_ms_p50``/``_p99`` and ``reqs_per_s`` are over the last ``window_s``
  (:data:`WINDOW_S`) seconds only; ``last_ok_s_ago`` is the time since the last good reply.
- ``result.json`` at the end (also after SIGTERM/SIGINT).

Counting rules: a *failure* is a timeout, a connection error (including a failed connection
attempt) or a wrong/unexpected answer; after any failure the connection is closed and
re-opened after a short backoff. Latencies are those of successful requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from coloft.core.health import percentile
from coloft.effects.process import die_with_parent, netns_argv

__all__ = [
    "ACKED_FILE",
    "LIVE_FILE",
    "RESULT_FILE",
    "ProtocolError",
    "RunConfig",
    "WorkloadError",
    "load_acked",
    "main",
    "parse_target",
    "percentile",
    "read_live",
    "read_result",
    "reference_answer",
    "run_workload",
    "serve",
    "start_workload",
    "stop_workload",
    "value_for",
    "verify",
    "verify_acked",
]

ACKED_FILE = "acked.jsonl"
LIVE_FILE = "live.json"
RESULT_FILE = "result.json"

LIVE_INTERVAL_S = 0.5
WINDOW_S = 5.0
MAX_ERRORS = 20
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 1.0
GET_EVERY = 4

_TOKEN_RE = re.compile(r"[A-Za-z0-9_.-]+")
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,40}")
MAX_CONNECTIONS = 999


class WorkloadError(Exception):
    """The workload could not run or verify (bad arguments, unreachable service, ...)."""


class ProtocolError(Exception):
    """An answer that does not fit the request."""


# --------------------------------------------------------------------------------------------
# Small pure helpers


def value_for(key: str) -> str:
    """The value written for ``key``: derived from it, so any reader can check it."""
    return "v." + hashlib.sha256(key.encode()).hexdigest()[:24]


def parse_target(target: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WorkloadError(f"target must be HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _utc_stamp(epoch: float) -> str:
    ms = int((epoch % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{ms:03d}Z"


def _write_json_atomic(path: Path, data: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Protocol connection


class _Conn:
    """One persistent protocol connection; every request has a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int, limit_s: float) -> _Conn:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, line: str, limit_s: float) -> str:
        async with asyncio.timeout(limit_s):
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
            raw = await self._reader.readline()
        if not raw:
            raise ConnectionError("connection closed by peer")
        if not raw.endswith(b"\n"):
            raise ConnectionError("connection closed mid-answer")
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


_TRANSPORT_ERRORS = (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError)


def _describe(exc: BaseException, what: str, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"{what}: timeout after {timeout:g} s"
    text = str(exc) or type(exc).__name__
    return f"{what}: {type(exc).__name__}: {text}"[:200]


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class RunConfig:
    target: str
    duration: float
    out_dir: Path
    run_id: str
    connections: int = 1
    rate: float = 0.0
    timeout: float = 5.0

    def validate(self) -> None:
        parse_target(self.target)
        if not _RUN_ID_RE.fullmatch(self.run_id):
            raise WorkloadError(f"run id must match {_RUN_ID_RE.pattern}: {self.run_id!r}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise WorkloadError(f"connections must be 1..{MAX_CONNECTIONS}")
        if self.rate < 0 or self.timeout <= 0 or self.duration < 0:
            raise WorkloadError("rate must be >= 0, timeout > 0, duration >= 0")


@dataclass
class _Stats:
    started_mono: float
    started_wall: float
    connections: int
    requests_ok: int = 0
    requests_failed: int = 0
    puts_ok: int = 0
    gets_ok: int = 0
    acked_writes: int = 0
    wrong_values: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    errors_total: int = 0
    last_error: str | None = None
    last_ok_mono: float | None = None
    max_reply_gap_ms: float = 0.0
    # compact: one 8-byte float per request, even for millions of requests
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    put_latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    errors: list[str] = field(default_factory=list)
    connected: list[bool] = field(default_factory=list)
    last_ok_per_conn: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono

    def ok(self, conn: int, latency_ms: float, is_put: bool, now: float) -> None:
        gap_ms = (now - self.last_ok_per_conn[conn]) * 1000.0
        self.max_reply_gap_ms = max(self.max_reply_gap_ms, gap_ms)
        self.last_ok_per_conn[conn] = now
        self.requests_ok += 1
        self.latencies_ms.append(latency_ms)
        if is_put:
            self.puts_ok += 1
            self.put_latencies_ms.append(latency_ms)
        else:
            self.gets_ok += 1
        self.recent.append((now, latency_ms))
        self.last_ok_mono = now

    def fail(self, conn: int, message: str) -> None:
        self.requests_failed += 1
        self.errors_total += 1
        now = time.time()
        text = f"{_utc_stamp(now)} +{self.elapsed():.3f}s c{conn}: {message}"
        self.last_error = text
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def _prune(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()

    def live(self, run_id: str, done: bool) -> dict[str, object]:
        now = time.monotonic()
        self._prune(now)
        elapsed = now - self.started_mono
        window = max(min(WINDOW_S, elapsed), 1e-3)
        recent = [lat for _, lat in self.recent]
        return {
            "run_id": run_id,
            "time": round(time.time(), 3),
            "elapsed_s": round(elapsed, 3),
            "done": done,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "acked_writes": self.acked_writes,
            "wrong_values": self.wrong_values,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "window_s": WINDOW_S,
            "reqs_per_s": round(len(recent) / window, 2),
            # over the window, not the run: sorting the whole run every 0.5 s would not scale
            "latency_ms_p50": _round(percentile(recent, 50)),
            "latency_ms_p99": _round(percentile(recent, 99)),
            "last_ok_s_ago": (
                None if self.last_ok_mono is None else round(now - self.last_ok_mono, 3)
            ),
            "last_error": self.last_error,
            "connected": all(self.connected),
            "connections_connected": sum(self.connected),
            "connections": self.connections,
        }

    def result(self, cfg: RunConfig) -> dict[str, object]:
        now = time.monotonic()
        # The longest time any connection went without a good reply (incl. the final stretch).
        max_gap_ms = max(
            [self.max_reply_gap_ms, *((now - t) * 1000.0 for t in self.last_ok_per_conn)]
        )
        return {
            "run_id": cfg.run_id,
            "target": cfg.target,
            "connections": cfg.connections,
            "rate_per_connection": cfg.rate,
            "timeout_s": cfg.timeout,
            "started": _utc_stamp(self.started_wall),
            "duration_s": round(self.elapsed(), 3),
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "puts_ok": self.puts_ok,
            "gets_ok": self.gets_ok,
            "acked_writes": self.acked_writes,
            "wrong_values": self.wrong_values,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "latency_ms_p50": _round(percentile(self.latencies_ms, 50)),
            "latency_ms_p99": _round(percentile(self.latencies_ms, 99)),
            "latency_ms_max": _round(max(self.latencies_ms, default=None)),
            "put_latency_ms_p50": _round(percentile(self.put_latencies_ms, 50)),
            "put_latency_ms_p99": _round(percentile(self.put_latencies_ms, 99)),
            "max_reply_gap_ms": round(max_gap_ms, 3),
            "errors_total": self.errors_total,
            "errors": list(self.errors),
        }


class _Workload:
    def __init__(self, cfg: RunConfig, acked_fp: TextIO) -> None:
        self.cfg = cfg
        self.host, self.port = parse_target(cfg.target)
        self.acked_fp = acked_fp
        self.acked_keys: list[str] = []
        self.stats = _Stats(
            started_mono=time.monotonic(),
            started_wall=time.time(),
            connections=cfg.connections,
            connected=[False] * cfg.connections,
        )
        self.stats.last_ok_per_conn = [self.stats.started_mono] * cfg.connections

    def _record_ack(self, idx: int, key: str, value: str) -> None:
        # Synchronous and before any await: a cancellation cannot slip in between.
        line = json.dumps({"key": key, "value": value, "t": round(time.time(), 6), "conn": idx})
        self.acked_fp.write(line + "\n")
        self.acked_fp.flush()
        self.acked_keys.append(key)
        self.stats.acked_writes += 1

    async def _put(self, conn: _Conn, idx: int, key: str) -> tuple[bool, str | None]:
        value = value_for(key)
        answer = await conn.request(f"PUT {key} {value}", self.cfg.timeout)
        if answer == f"OK {key}":
            self._record_ack(idx, key, value)
            return True, None
        raise ProtocolError(f"PUT {key}: unexpected answer {answer[:80]!r}")

    async def _get(self, conn: _Conn, key: str) -> tuple[bool, str | None]:
        expected = value_for(key)  # what _put wrote
        answer = await conn.request(f"GET {key}", self.cfg.timeout)
        parts = answer.split(" ")
        if parts[:2] == ["VAL", key] and len(parts) == 3:
            if parts[2] == expected:
                return True, None
            self.stats.wrong_values += 1
            return False, f"GET {key}: wrong value {parts[2][:40]!r}, acked {expected!r}"
        if parts == ["NONE", key]:
            self.stats.wrong_values += 1
            return False, f"GET {key}: NONE for an acknowledged write"
        raise ProtocolError(f"GET {key}: unexpected answer {answer[:80]!r}")

    async def conn_loop(self, idx: int) -> None:
        cfg, stats = self.cfg, self.stats
        conn: _Conn | None = None
        ever_connected = False
        seq = 0
        attempts = 0
        backoff = BACKOFF_MIN_S
        next_at = time.monotonic()
        try:
            while True:
                if conn is None:
                    try:
                        conn = await _Conn.open(self.host, self.port, cfg.timeout)
                    except _TRANSPORT_ERRORS as exc:
                        stats.connect_failures += 1
                        stats.fail(idx, _describe(exc, f"connect {cfg.target}", cfg.timeout))
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        continue
                    if ever_connected:
                        stats.reconnects += 1
                    ever_connected = True
                    stats.connected[idx] = True
                if cfg.rate > 0:
                    next_at += 1.0 / cfg.rate
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -1.0:  # far behind (e.g. after a stall): do not burst
                        next_at = time.monotonic()
                attempts += 1
                is_get = attempts % GET_EVERY == 0 and bool(self.acked_keys)
                if is_get:
                    key = random.choice(self.acked_keys)
                    what = f"GET {key}"
                else:
                    seq += 1
                    key = f"{cfg.run_id}-{idx}-{seq}"
                    what = f"PUT {key}"
                t0 = time.monotonic()
                try:
                    good, problem = await (
                        self._get(conn, key) if is_get else self._put(conn, idx, key)
                    )
                except (*_TRANSPORT_ERRORS, ProtocolError) as exc:
                    good, problem = False, _describe(exc, what, cfg.timeout)
                now = time.monotonic()
                if good:
                    stats.ok(idx, (now - t0) * 1000.0, not is_get, now)
                    backoff = BACKOFF_MIN_S
                    continue
                stats.fail(idx, problem or what)
                conn.close()
                conn = None
                stats.connected[idx] = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            stats.connected[idx] = False
            if conn is not None:
                conn.close()


async def _live_loop(work: _Workload, live_path: Path) -> None:
    while True:
        _write_json_atomic(live_path, work.stats.live(work.cfg.run_id, done=False))
        await asyncio.sleep(LIVE_INTERVAL_S)


def _open_append(path: Path) -> TextIO:
    return open(path, "a", encoding="utf-8")


async def run_workload(cfg: RunConfig, stop: asyncio.Event | None = None) -> dict[str, object]:
    """Run the load until ``cfg.duration`` passes or ``stop`` is set; returns result.json's
    content (also written to ``cfg.out_dir``)."""
    cfg.validate()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or asyncio.Event()
    with _open_append(cfg.out_dir / ACKED_FILE) as acked_fp:
        work = _Workload(cfg, acked_fp)
        conn_tasks = [
            asyncio.create_task(work.conn_loop(i), name=f"workload-conn-{i}")
            for i in range(cfg.connections)
        ]
        live_task = asyncio.create_task(_live_loop(work, cfg.out_dir / LIVE_FILE))
        stop_task = asyncio.create_task(stop.wait())
        crashed: BaseException | None = None
        try:
            done, _ = await asyncio.wait(
                {stop_task, live_task, *conn_tasks},
                timeout=cfg.duration,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                if task is not stop_task and not task.cancelled():
                    crashed = task.exception()
        finally:
            everything = [stop_task, live_task, *conn_tasks]
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            result = work.stats.result(cfg)
            if crashed is not None:
                result["internal_error"] = repr(crashed)
            _write_json_atomic(cfg.out_dir / LIVE_FILE, work.stats.live(cfg.run_id, done=True))
            _write_json_atomic(cfg.out_dir / RESULT_FILE, result)
    if crashed is not None:
        raise WorkloadError(f"workload task crashed: {crashed!r}") from crashed
    return result


# --------------------------------------------------------------------------------------------
# Verification


def load_acked(path: Path) -> tuple[dict[str, str], int]:
    """Acknowledged writes in file order as {key: value}, and the number of unreadable lines
    (a client killed mid-write may leave a torn last line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise WorkloadError(f"no acknowledged-writes file at {path}") from exc
    acked: dict[str, str] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key, value = str(entry["key"]), str(entry["value"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        acked[key] = value
    return acked, bad


async def verify_acked(
    target: str,
    acked_file: Path,
    *,
    request_timeout: float = 5.0,
    connections: int = 4,
    attempts: int = 5,
) -> dict[str, object]:
    """Read back every acknowledged write. Transport errors are retried (``attempts`` per key,
    with backoff); a service that stays unreachable raises :class:`WorkloadError` rather than
    reporting everything as lost."""
    host, port = parse_target(target)
    acked, unreadable = load_acked(acked_file)
    keys = list(acked)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    found: dict[str, str | None] = {}  # key -> value read back (None: NONE)

    async def worker() -> None:
        conn: _Conn | None = None
        try:
            while True:
                try:
                    key = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                last = ""
                for attempt in range(attempts):
                    if attempt:
                        await asyncio.sleep(min(BACKOFF_MIN_S * 2**attempt, 2.0))
                    try:
                        if conn is None:
                            conn = await _Conn.open(host, port, request_timeout)
                        answer = await conn.request(f"GET {key}", request_timeout)
                        parts = answer.split(" ")
                        if parts[:2] == ["VAL", key] and len(parts) == 3:
                            found[key] = parts[2]
                            break
                        if parts == ["NONE", key]:
                            found[key] = None
                            break
                        raise ProtocolError(f"unexpected answer {answer[:80]!r}")
                    except (*_TRANSPORT_ERRORS, ProtocolError) as exc:
                        last = _describe(exc, f"GET {key} from {target}", request_timeout)
                        if conn is not None:
                            conn.close()
                            conn = None
                else:
                    raise WorkloadError(f"service unreachable after {attempts} attempts: {last}")
        finally:
            if conn is not None:
                conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(connections, len(keys))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    missing = [k for k in keys if found.get(k, "") is None]
    wrong = [k for k in keys if found.get(k) is not None and found[k] != acked[k]]
    return {
        "target": target,
        "checked": len(keys),
        "lost_acked_writes": len(missing),
        "wrong_values": len(wrong),
        "missing": missing[:20],
        "wrong": [{"key": k, "acked": acked[k], "read": found[k]} for k in wrong[:20]],
        "unreadable_lines": unreadable,
    }


# --------------------------------------------------------------------------------------------
# A reference server (in memory) for tests of the lab without a guest

_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def reference_answer(store: dict[str, str], line: str) -> str:
    """The guest service's answer to one request line, with ``store`` as the disk."""
    parts = line.split(" ")
    if parts[0] == "PUT" and len(parts) == 3:
        if not _KEY_RE.fullmatch(parts[1]) or not _VALUE_RE.fullmatch(parts[2]):
            return "ERR bad key or value"
        store[parts[1]] = parts[2]
        return f"OK {parts[1]}"
    if parts[0] == "GET" and len(parts) == 2:
        if not _KEY_RE.fullmatch(parts[1]):
            return "ERR bad key"
        value = store.get(parts[1])
        return f"NONE {parts[1]}" if value is None else f"VAL {parts[1]} {value}"
    if parts == ["PING"]:
        return "PONG"
    return "ERR bad request"


async def serve(listen: str, stop: asyncio.Event | None = None) -> None:
    """Serve the protocol from memory on ``listen`` (HOST:PORT) until ``stop`` is set."""
    host, port = parse_target(listen)
    store: dict[str, str] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while raw := await reader.readline():
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                writer.write((reference_answer(store, line) + "\n").encode())
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: an over-long line
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    async with server:
        await (stop or asyncio.Event()).wait()


# --------------------------------------------------------------------------------------------
# API for the caller in the root namespace


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "coloft.lab.workload", *args]


def start_workload(
    ns: str | None,
    target: str,
    out_dir: Path,
    duration: float,
    *,
    connections: int = 1,
    rate: float = 0.0,
    timeout: float = 5.0,
    run_id: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start the client in namespace ``ns`` (``None``: this namespace); it dies with us.

    Its stdout/stderr go to ``out_dir/client.log``. Read progress with :func:`read_live`,
    end it early with :func:`stop_workload`, read the outcome with :func:`read_result`.
    """
    run_id = run_id or f"w{int(time.time()):x}{random.randrange(16**4):04x}"
    cfg = RunConfig(target, duration, out_dir, run_id, connections, rate, timeout)
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = _module_argv(
        "run",
        "--target", target,
        "--duration", str(duration),
        "--connections", str(connections),
        "--rate", str(rate),
        "--timeout", str(timeout),
        "--out", str(out_dir.resolve()),
        "--run-id", run_id,
    )  # fmt: skip
    with open(out_dir / "client.log", "ab") as log:
        return subprocess.Popen(
            netns_argv(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )


def read_live(out_dir: Path) -> dict[str, Any] | None:
    """The latest ``live.json``, or ``None`` before the client wrote one."""
    try:
        data: dict[str, Any] = json.loads((out_dir / LIVE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return data


def read_result(out_dir: Path) -> dict[str, Any]:
    """``result.json``; :class:`WorkloadError` if the client has not written it."""
    try:
        data: dict[str, Any] = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WorkloadError(f"no {RESULT_FILE} in {out_dir}: the client did not finish") from exc
    return data


def stop_workload(
    proc: subprocess.Popen[bytes], out_dir: Path, timeout: float = 15.0
) -> dict[str, Any]:
    """SIGTERM the client (if still running), wait, and return its result."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise WorkloadError(f"workload client ignored SIGTERM for {timeout} s") from None
    return read_result(out_dir)


def verify(
    ns: str | None,
    target: str,
    acked_file: Path,
    *,
    timeout: float = 5.0,
    connections: int = 4,
    out_file: Path | None = None,
    deadline_s: float = 900.0,
) -> dict[str, Any]:
    """Run the verifier in ``ns`` and return its JSON (default output: ``verify.json`` next
    to ``acked_file``). :class:`WorkloadError` if it could not verify."""
    out_file = out_file or acked_file.with_name("verify.json")
    argv = _module_argv(
        "verify",
        "--target", target,
        "--acked", str(acked_file.resolve()),
        "--out", str(out_file.resolve()),
        "--timeout", str(timeout),
        "--connections", str(connections),
    )  # fmt: skip
    try:
        proc = subprocess.run(
            netns_argv(ns, argv), capture_output=True, text=True, check=False, timeout=deadline_s
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkloadError(f"verifier did not finish within {deadline_s} s") from exc
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip()
        raise WorkloadError(f"verifier failed (exit {proc.returncode}): {msg}")
    data: dict[str, Any] = json.loads(out_file.read_text(encoding="utf-8"))
    return data


# --------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coloft.lab.workload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate load, record acknowledged writes")
    run.add_argument("--target", required=True, help="HOST:PORT")
    run.add_argument("--duration", type=float, required=True, help="seconds")
    run.add_argument("--connections", type=int, default=1)
    run.add_argument(
        "--rate", type=float, default=0.0, help="requests/s per connection; 0 = closed loop"
    )
    run.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--run-id", required=True)
    ver = sub.add_parser("verify", help="read back every acknowledged write")
    ver.add_argument("--target", required=True, help="HOST:PORT")
    ver.add_argument("--acked", type=Path, required=True, help="acked.jsonl of a run")
    ver.add_argument("--out", type=Path, required=True, help="JSON report to write")
    ver.add_argument("--timeout", type=float, default=5.0)
    ver.add_argument("--connections", type=int, default=4)
    srv = sub.add_parser("serve", help="reference in-memory server of the protocol (tests)")
    srv.add_argument("--listen", required=True, help="HOST:PORT")
    return parser


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_main(cfg: RunConfig) -> None:
    await run_workload(cfg, _stop_on_signals())


async def _serve_main(listen: str) -> None:
    await serve(listen, _stop_on_signals())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            cfg = RunConfig(
                target=args.target,
                duration=args.duration,
                out_dir=args.out,
                run_id=args.run_id,
                connections=args.connections,
                rate=args.rate,
                timeout=args.timeout,
            )
            asyncio.run(_run_main(cfg))
            return 0
        if args.command == "serve":
            asyncio.run(_serve_main(args.listen))
            return 0
        report = asyncio.run(
            verify_acked(
                args.target, args.acked, request_timeout=args.timeout, connections=args.connections
            )
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(args.out, report)
        return 0
    except WorkloadError as exc:
        print(f"{args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
