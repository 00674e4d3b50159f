"""The protection oracle: is `GET /protected` ever 200 when it must not be?

A thread samples, every 100 ms, both agents' /protected and both QEMUs through a
monitor socket of its own (core.argv's watch monitor), so what it sees of QEMU
does not come from the agents it checks. A 200 is a violation when, for longer
than GRACE_S before it, the answering node's QEMU was not the COLO primary with
its migration in "colo" (a sync still running counts), the other node's QEMU was
not the COLO secondary (or did not answer at all), or no checkpoint completed on
the secondary within the agents' freshness bound (two checkpoint intervals).
GRACE_S is the detection budget: an agent must notice within it, not sooner.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coloft.agent import api
from coloft.core.argv import RunPaths
from coloft.errors import ColoftError
from coloft.model.spec import PairSpec

SAMPLE_S = 0.1
GRACE_S = 1.0
CALL_S = 0.5


class _Monitor:
    """A blocking QMP client on the watch socket; events STOP/RESUME are kept."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_S)
        self.sock.connect(str(path))
        self.buf = b""
        self.resumed_at: float | None = None
        self._read_one()  # the greeting
        self.call("qmp_capabilities")

    def _read_one(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("monitor closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") == "RESUME":
            self.resumed_at = time.monotonic()
        return msg

    def call(self, command: str) -> Any:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        end = time.monotonic() + CALL_S
        while time.monotonic() < end:
            msg = self._read_one()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise ConnectionError(str(msg["error"]))
        raise TimeoutError(command)

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Node:
    name: str
    path: Path
    monitor: _Monitor | None = None
    mode: str | None = None
    migration: str | None = None
    bad_as_primary_since: float | None = None
    bad_as_secondary_since: float | None = None
    first_seen: float | None = None

    def sample(self) -> None:
        try:
            if self.monitor is None:
                self.monitor = _Monitor(self.path)
                self.first_seen = time.monotonic()
            self.mode = self.monitor.call("query-colo-status").get("mode")
            self.migration = self.monitor.call("query-migrate").get("status")
        except (OSError, ValueError, TimeoutError, ConnectionError):
            if self.monitor is not None:
                self.monitor.close()
            self.monitor, self.mode, self.migration = None, None, None

    def judge(self, started: float) -> None:
        """Track since when this QEMU could not back a 200 in either role."""
        ok_primary = self.mode == "primary" and self.migration == "colo"
        ok_secondary = self.mode == "secondary"
        if ok_primary:
            self.bad_as_primary_since = None
        elif self.bad_as_primary_since is None:
            self.bad_as_primary_since = started
        if ok_secondary:
            self.bad_as_secondary_since = None
        elif self.bad_as_secondary_since is None:
            self.bad_as_secondary_since = started


def _best_secondary(nodes: dict[str, _Node], primary: str) -> _Node:
    """The other node most able to back the claim (with a spare there are two): the
    one that is a COLO secondary now, else the one that stopped being one last."""
    others = [o for o in nodes.values() if o.name != primary]

    def unfit(o: _Node) -> float:
        since = o.bad_as_secondary_since
        return float("-inf") if since is None else -since

    return min(others, key=unfit)


@dataclass
class ProtectionOracle:
    spec: PairSpec
    samples: int = 0
    yes: int = 0
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="protection-oracle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        nodes = {
            n.name: _Node(n.name, RunPaths(self.spec.run_dir_of(n)).qmp_watch)
            for n in self.spec.nodes
        }
        fresh_s = 2 * self.spec.tuning.checkpoint_interval_ms / 1000.0
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                for n in nodes.values():
                    n.sample()
                    n.judge(started)
                for name, n in nodes.items():
                    if self._protected(name):
                        self.yes += 1
                        self._check(started, n, _best_secondary(nodes, name), fresh_s)
                self.samples += 1
                self._stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - started)))
        finally:
            for n in nodes.values():
                if n.monitor is not None:
                    n.monitor.close()

    def _protected(self, node: str) -> bool:
        try:
            answer = api.call(api.socket_path(self.spec, node), "GET", "/protected", timeout=1.0)
        except ColoftError:
            return False
        return bool(answer.get("protected"))

    def _check(self, now: float, primary: _Node, secondary: _Node, fresh_s: float) -> None:
        def late(since: float | None) -> bool:
            return since is not None and now - since > GRACE_S

        wall = time.strftime("%H:%M:%S")
        if late(primary.bad_as_primary_since):
            self.violations.append(
                f"{wall} {primary.name} said protected while its QEMU was mode "
                f"{primary.mode}, migration {primary.migration}"
            )
        if late(secondary.bad_as_secondary_since):
            self.violations.append(
                f"{wall} {primary.name} said protected while {secondary.name}'s QEMU was "
                f"mode {secondary.mode}"
            )
        m = secondary.monitor
        since = None if m is None else (m.resumed_at or secondary.first_seen)
        if since is not None and now - since > fresh_s + GRACE_S:
            self.violations.append(
                f"{wall} {primary.name} said protected with no checkpoint for {now - since:.1f} s"
            )
