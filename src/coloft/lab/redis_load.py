"""Debian's own Redis clients against the Redis guest (examples/guests/redis.toml).

Both run in the client namespace, unmodified:

- ``redis-benchmark``: SET requests from a few connections, pipelining off. It never
  reconnects: any read or write error ends it with ``Error: ...`` on stderr and a
  non-zero exit, so a run that finishes proves none of its connections failed. Its
  own CSV report gives the request rate and latency percentiles. Its length is a
  request count, sized from a short calibration run against the same pair.
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
from pathlib import Path
from typing import IO, Any

from coloft.effects.process import die_with_parent, netns_argv

WRITE_EVERY_S = 0.05
CLIENTS = 4
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
    """redis-benchmark from namespace `ns` against `host:port`."""

    def __init__(self, ns: str | None, host: str, port: int, out: Path) -> None:
        self.ns, self.host, self.port, self.out = ns, host, port, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.requests = 0
        self.started = 0.0

    def _argv(self, requests: int) -> list[str]:
        argv = ["redis-benchmark", "-h", self.host, "-p", str(self.port), "-c", str(CLIENTS)]
        argv += ["-n", str(requests), "-t", "set", "-d", str(VALUE_BYTES), "-r", "100000"]
        argv += ["-P", "1", "--csv"]
        return netns_argv(self.ns, argv)

    def calibrate(self, requests: int = 200, timeout: float = 120.0) -> float:
        """Requests per second of a short run."""
        try:
            done = subprocess.run(
                self._argv(requests), capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise RedisLoadError("redis-benchmark not found (Debian package redis-tools)") from exc
        except subprocess.TimeoutExpired as exc:
            raise RedisLoadError(f"redis-benchmark calibration took over {timeout:g} s") from exc
        if done.returncode != 0:
            raise RedisLoadError(
                f"redis-benchmark calibration failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[:300]}"
            )
        return benchmark_report(done.stdout)["rps"]

    def start(self, requests: int) -> None:
        self.requests = requests
        self.started = time.monotonic()
        with (
            (self.out / "benchmark.csv").open("wb") as o,
            (self.out / "benchmark.err").open("wb") as e,
        ):
            self.proc = subprocess.Popen(
                self._argv(requests),
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the run to end (killed after `timeout`) and summarize it."""
        assert self.proc is not None
        killed = False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            killed = True
        err = (self.out / "benchmark.err").read_text(errors="replace").splitlines()
        errors = [line for line in err if line.strip()]
        if killed:
            errors.append(f"redis-benchmark still running after {timeout:g} s: killed")
        report: dict[str, float] = {}
        if self.proc.returncode == 0:
            report = benchmark_report((self.out / "benchmark.csv").read_text(errors="replace"))
        elif not errors:
            errors.append(f"redis-benchmark exited with {self.proc.returncode}")
        return {
            "requests": self.requests if report else 0,
            "errors": errors,
            "seconds": round(time.monotonic() - self.started, 1),
            "report": report,
        }

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


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


def summary(bench: dict[str, Any], writer: dict[str, Any], lost: int) -> dict[str, Any]:
    """The demo's `workload` object."""
    errors = [*bench["errors"], *writer["errors"]]
    report = bench["report"]
    return {
        "name": "redis",
        "client": "redis-benchmark",
        "requests": bench["requests"],
        "errors": len(errors),
        "resets": resets(errors),
        "latency_ms_p50": report.get("p50_latency_ms"),
        "latency_ms_p99": report.get("p99_latency_ms"),
        "lost_acked_writes": lost,
        "requests_per_s": report.get("rps"),
        "seconds": bench["seconds"],
        "acked_writes": writer["acked"],
        "error_lines": errors[:5],
    }


class RedisRun:
    """redis-benchmark sized to last about `duration` s, with the acknowledged writer."""

    def __init__(self, ns: str | None, host: str, port: int, out: Path) -> None:
        self.ns, self.host, self.port = ns, host, port
        out.mkdir(parents=True, exist_ok=True)
        self.bench = Benchmark(ns, host, port, out)
        self.writer = AckedWriter(ns, host, port)

    def start(self, duration: float) -> None:
        rps = self.bench.calibrate()
        self.bench.start(max(1000, int(rps * duration)))
        self.writer.start()

    def running(self) -> bool:
        return self.bench.running()

    def finish(self, timeout: float) -> dict[str, Any]:
        bench = self.bench.finish(timeout)
        writer = self.writer.stop()
        lost = lost_writes(self.ns, self.host, self.port, self.writer.acked)
        return summary(bench, writer, len(lost))

    def kill(self) -> None:
        self.bench.kill()
        self.writer.stop(timeout=1.0)
