"""Debian's own Redis clients against the Redis guest (examples/guests/redis.toml).

Both run in the client namespace, unmodified:

- ``redis-benchmark``: SET requests from a few connections, pipelining off. It never
  reconnects: any read or write error ends it with ``Error: ...`` on stderr and a
  non-zero exit, so a run that finishes proves none of its connections failed. Its
  own CSV report gives the request rate and latency percentiles. One run after the
  other, each a request count sized from a calibration run to take about RUN_S.
- ``redis-cli``: the acknowledged writes. One long-running redis-cli gets a write
  typed into it every :data:`WRITE_EVERY_S`; each write is a SET that answers with
  its own number (a one-line Lua script), so every answer names the write it
  acknowledges even if an error line comes in between. Afterwards a second
  redis-cli reads every acknowledged key back.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from coloft.effects.process import die_with_parent, netns_argv

WRITE_EVERY_S = 0.05
CLIENTS = 4
RUN_S = 5.0
# A run stalled this long has failed (a failover takes a second or two).
RUN_TIMEOUT_S = 120.0
VALUE_BYTES = 16
# A SET that returns its value: the reply line itself says which write it acknowledges.
_ACKED_SET = "EVAL \"redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]\" 1 w:{n} {n}"


class RedisLoadError(Exception):
    """A Redis client could not run or its output made no sense; the message says which."""


def benchmark_report(text: str) -> dict[str, float]:
    """redis-benchmark's ``--csv`` report -> the SET row as numbers:
    rps, avg/min/p50/p95/p99/max latency (ms)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        if row.get("test") == "SET":
            try:
                return {k: float(v) for k, v in row.items() if k != "test" and v is not None}
            except ValueError as exc:
                raise RedisLoadError(f"redis-benchmark report: {exc}: {text[:300]!r}") from exc
    raise RedisLoadError(f"redis-benchmark printed no SET row: {text[:300]!r}")


def resets(lines: list[str]) -> int:
    return sum(1 for line in lines if re.search(r"reset", line, re.I))


class Benchmark:
    """redis-benchmark from namespace `ns` against `host:port`, run after run of
    RUN_S each until stopped (each run opens its connections anew, as every
    redis-benchmark test does)."""

    def __init__(self, ns: str | None, host: str, port: int) -> None:
        self.ns, self.host, self.port = ns, host, port
        self.runs: list[dict[str, Any]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _argv(self, requests: int) -> list[str]:
        argv = ["redis-benchmark", "-h", self.host, "-p", str(self.port), "-c", str(CLIENTS)]
        argv += ["-n", str(requests), "-t", "set", "-d", str(VALUE_BYTES), "-r", "100000"]
        argv += ["-P", "1", "--csv"]
        return netns_argv(self.ns, argv)

    def run_once(self, requests: int, timeout: float) -> dict[str, Any]:
        """One run: its report, or the error lines it died with."""
        started = time.time()
        try:
            proc = subprocess.Popen(
                self._argv(requests),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        except FileNotFoundError as exc:
            raise RedisLoadError("redis-benchmark not found (Debian package redis-tools)") from exc
        self._proc = proc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            errors = [f"redis-benchmark did not finish {requests} requests in {timeout:g} s"]
            return {"requests": 0, "errors": errors, "start": started, "end": time.time()}
        errors = [line for line in err.splitlines() if line.strip()]
        report: dict[str, float] = {}
        if proc.returncode == 0:
            report = benchmark_report(out)
        elif not errors:
            errors = [f"redis-benchmark exited with {proc.returncode}"]
        return {
            "requests": requests if report else 0,
            "errors": errors,
            "report": report,
            "start": started,
            "end": time.time(),
        }

    def calibrate(self, requests: int = 200) -> float:
        """Requests per second of a short run."""
        run = self.run_once(requests, 120.0)
        if run["errors"]:
            raise RedisLoadError(f"redis-benchmark calibration failed: {run['errors'][:3]}")
        rps: float = run["report"]["rps"]
        return rps

    def start(self, requests: int) -> None:
        """Runs of `requests` each, one after the other, until finish()."""

        def loop() -> None:
            while not self._stop.is_set():
                started = time.time()
                try:
                    self.runs.append(self.run_once(requests, RUN_TIMEOUT_S))
                except Exception as e:  # a run we could not read is a failed run
                    self.runs.append(
                        {"requests": 0, "errors": [repr(e)], "start": started, "end": time.time()}
                    )

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def kill(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def finish(self) -> dict[str, Any]:
        """Let the current run end, then summarize all of them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(RUN_TIMEOUT_S + 10)
        return combine(self.runs)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs -> requests, errors, rate and latency. The p50 is the request-weighted
    median of the runs' medians, the p99 the highest of their p99s (an upper bound:
    redis-benchmark's CSV report gives percentiles, not the samples)."""
    done = [r for r in runs if r["requests"]]
    requests = sum(r["requests"] for r in done)
    p50 = None
    if done:
        ordered = sorted(done, key=lambda r: r["report"]["p50_latency_ms"])
        seen = 0
        for r in ordered:
            seen += r["requests"]
            if seen * 2 >= requests:
                p50 = r["report"]["p50_latency_ms"]
                break
    seconds = sum(r["end"] - r["start"] for r in done)
    return {
        "runs": len(runs),
        "requests": requests,
        "errors": [e for r in runs for e in r["errors"]],
        "latency_ms_p50": p50,
        "latency_ms_p99": max((r["report"]["p99_latency_ms"] for r in done), default=None),
        "requests_per_s": round(requests / seconds, 1) if seconds else None,
        "latency_ms_max": max((r["report"]["max_latency_ms"] for r in done), default=None),
        "spans": [(r["start"], r["end"], r["report"]["max_latency_ms"]) for r in done],
    }


@dataclass
class AckedWriter:
    """One redis-cli in namespace `ns`, a write typed into it every WRITE_EVERY_S."""

    ns: str | None
    host: str
    port: int
    acked: list[int] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    sent: int = 0
    _proc: subprocess.Popen[str] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        argv = ["redis-cli", "-h", self.host, "-p", str(self.port)]
        self._proc = subprocess.Popen(
            netns_argv(self.ns, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._threads = [
            threading.Thread(target=self._feed, args=(self._proc.stdin,), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _feed(self, stdin: IO[str]) -> None:
        try:
            while not self._stop.wait(WRITE_EVERY_S):
                stdin.write(_ACKED_SET.format(n=self.sent) + "\n")
                stdin.flush()
                self.sent += 1
        except (BrokenPipeError, ValueError):
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            line = line.strip()
            if line.isdigit():
                self.acked.append(int(line))
            elif line:
                self.other.append(line)

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """Stop typing, let redis-cli answer what it has, and summarize."""
        self._stop.set()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                self.other.append(f"redis-cli still answering after {timeout:g} s: killed")
        for t in self._threads:
            t.join(5)
        return {"sent": self.sent, "acked": len(self.acked), "errors": list(self.other)}


def lost_writes(ns: str | None, host: str, port: int, acked: list[int]) -> list[int]:
    """The acknowledged writes a fresh redis-cli does not read back with their value."""
    if not acked:
        return []
    argv = ["redis-cli", "-h", host, "-p", str(port)]
    done = subprocess.run(
        netns_argv(ns, argv),
        input="".join(f"GET w:{n}\n" for n in acked),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(acked):
        raise RedisLoadError(
            f"redis-cli read back {len(lines)} of {len(acked)} keys (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    return [n for n, value in zip(acked, lines, strict=True) if value.strip() != str(n)]


def summary(
    bench: dict[str, Any], writer: dict[str, Any], lost: int, fault_at: float | None = None
) -> dict[str, Any]:
    """The demo's `workload` object; `fault_inside_a_run` says whether a redis-benchmark
    run that finished cleanly was under way when the fault came, `gap_ms` is that
    run's longest wait for an answer."""
    errors = [*bench["errors"], *writer["errors"]]
    spanning = [m for a, b, m in bench["spans"] if fault_at is not None and a <= fault_at <= b]
    return {
        "name": "redis",
        "client": "redis-benchmark",
        "requests": bench["requests"],
        "errors": len(errors),
        "resets": resets(errors),
        "latency_ms_p50": bench["latency_ms_p50"],
        "latency_ms_p99": bench["latency_ms_p99"],
        "lost_acked_writes": lost,
        "requests_per_s": bench["requests_per_s"],
        "runs": bench["runs"],
        "latency_ms_max": bench["latency_ms_max"],
        "fault_inside_a_run": bool(spanning),
        "gap_ms": max(spanning, default=None),
        "acked_writes": writer["acked"],
        "error_lines": errors[:5],
    }


class RedisRun:
    """redis-benchmark runs of about RUN_S each, and the acknowledged writer, until finish()."""

    def __init__(self, ns: str | None, host: str, port: int) -> None:
        self.ns, self.host, self.port = ns, host, port
        self.bench = Benchmark(ns, host, port)
        self.writer = AckedWriter(ns, host, port)

    def start(self) -> None:
        rps = self.bench.calibrate()
        self.bench.start(max(200, int(rps * RUN_S)))
        self.writer.start()

    def finish(self, fault_at: float | None = None) -> dict[str, Any]:
        bench = self.bench.finish()
        writer = self.writer.stop()
        lost = lost_writes(self.ns, self.host, self.port, self.writer.acked)
        return summary(bench, writer, len(lost), fault_at)

    def kill(self) -> None:
        self.bench.kill()
        self.writer.stop(timeout=1.0)
