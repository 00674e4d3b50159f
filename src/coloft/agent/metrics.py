"""The agent's Prometheus metrics, rendered by prometheus_client.

Sources only grow (checkpoint counts, matched probe replies, QMP calls), and the
agent hands them over each tick: what is new since the last tick is observed, so
no hook sits in the hot paths of QEMU's events or the probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coloft.core.ha import State

LABELS = ("pair", "node")
PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RTT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35)
QMP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
STATES = tuple(s.value for s in State)
T = TypeVar("T")


def _new(window: Sequence[T], total: int, seen: int) -> list[T]:
    """The values of a bounded window (a deque, a tuple) that came after `seen` of
    `total` so far. Read from the end: the window may be long and is read every tick."""
    fresh = min(max(0, total - seen), len(window))
    return [window[-i] for i in range(fresh, 0, -1)]


class Families:
    """Every metric of an agent process, in one registry: the pairs it runs share them,
    told apart by their `pair` label, so one scrape shows the whole host."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, text: str, *extra: str) -> Counter:
            return Counter(name, text, (*LABELS, *extra), registry=r)

        def gauge(name: str, text: str, *extra: str) -> Gauge:
            return Gauge(name, text, (*LABELS, *extra), registry=r)

        def histogram(name: str, text: str, buckets: Sequence[float], *extra: str) -> Histogram:
            return Histogram(name, text, (*LABELS, *extra), buckets=buckets, registry=r)

        self.checkpoints = counter(
            "coloft_checkpoints", "Checkpoints of this node's QEMU (a STOP/RESUME each)"
        )
        self.forced = counter(
            "coloft_forced_checkpoints",
            "Checkpoints that began well before the interval was up: asked for by "
            "colo-compare (miscompare or timeout) or an operator",
        )
        self.pause = histogram(
            "coloft_checkpoint_pause_seconds",
            "How long the guest stood still per checkpoint",
            PAUSE_BUCKETS,
        )
        self.protected = gauge(
            "coloft_protected", "1 while this agent leads the pair and judges it PROTECTED"
        )
        self.state = gauge("coloft_agent_state", "1 for the agent's current state", "state")
        self.unprotected = counter(
            "coloft_unprotected_seconds", "Time this agent led the pair without protection"
        )
        self.failovers = counter(
            "coloft_failovers", "Failovers this agent ran, by action and cause", "action", "cause"
        )
        self.detection = gauge(
            "coloft_last_detection_seconds",
            "From the peer's last heartbeat to this agent's verdict that it was lost",
        )
        self.reprotections = counter(
            "coloft_reprotections", "Re-protections this leader ran, by result", "result"
        )
        self.resync_bytes = gauge(
            "coloft_resync_bytes", "Disk and memory bytes brought in sync by the last re-protection"
        )
        self.resync_progress = gauge(
            "coloft_resync_progress_ratio", "Share of the current re-protection's copy done"
        )
        self.probe = histogram(
            "coloft_probe_rtt_seconds", "Probe replies matched through colo-compare", RTT_BUCKETS
        )
        self.qmp = histogram(
            "coloft_qmp_command_seconds", "QMP command latency, by command", QMP_BUCKETS, "command"
        )
        self.qmp_errors = counter(
            "coloft_qmp_errors", "QMP commands that failed or got no answer, by command", "command"
        )
        self.compare_timeouts = counter(
            "coloft_compare_timed_out_packets",
            "Primary packets colo-compare released by a forced checkpoint after its timeout",
        )
        self.compare_drops = counter(
            "coloft_compare_dropped_packets", "Packets colo-compare dropped on a full queue"
        )
        # The link belongs to the host, not to a pair: no pair label, and counted once
        # however many pairs hand over the same readings.
        self.link_bytes = Counter(
            "coloft_replication_link_bytes",
            "Bytes through this host's replication-link interface, by direction",
            ("node", "direction"),
            registry=r,
        )
        self.link_dropped = Counter(
            "coloft_replication_link_dropped_packets",
            "Packets this host's replication-link interface dropped, by direction",
            ("node", "direction"),
            registry=r,
        )
        self._link: dict[str, dict[str, int]] = {}
        self._link_reading: dict[str, dict[str, int]] = {}

    def link_seen(self, node: str, counters: dict[str, int]) -> None:
        # Every pair of the host hands over the same reading (effects.link keeps it).
        if self._link_reading.get(node) is counters:
            return
        self._link_reading[node] = counters
        seen = self._link.setdefault(node, {})
        for key, metric, direction in (
            ("rx_bytes", self.link_bytes, "rx"),
            ("tx_bytes", self.link_bytes, "tx"),
            ("rx_dropped", self.link_dropped, "rx"),
            ("tx_dropped", self.link_dropped, "tx"),
        ):
            if key not in counters:
                continue
            before = seen.get(key, counters[key])
            # The interface counts from zero again when it is made anew.
            delta = counters[key] - before if counters[key] >= before else counters[key]
            if delta or key not in seen:
                metric.labels(node=node, direction=direction).inc(delta)
            seen[key] = counters[key]


class Metrics:
    """One pair's view of the process's metric families."""

    def __init__(self, pair: str, node: str, families: Families | None = None) -> None:
        f = families or Families()
        self.registry = f.registry
        self.labels = {"pair": pair, "node": node}
        self.checkpoints = f.checkpoints
        self.forced = f.forced
        self.pause = f.pause
        self.protected = f.protected
        self.state = f.state
        self.unprotected = f.unprotected
        self.failovers = f.failovers
        self.detection = f.detection
        self.reprotections = f.reprotections
        self.resync_bytes = f.resync_bytes
        self.resync_progress = f.resync_progress
        self.probe = f.probe
        self.qmp = f.qmp
        self.qmp_errors = f.qmp_errors
        self.compare_timeouts = f.compare_timeouts
        self.compare_drops = f.compare_drops
        self.families = f
        self._seen = {
            "checkpoints": 0,
            "forced": 0,
            "probe": 0,
            "qmp": 0,
            "timeouts": 0,
            "drops": 0,
        }
        # The children this pair updates every tick, looked up once: labels() is
        # the costliest part of an update.
        self._states = {s: self.state.labels(**self.labels, state=s) for s in STATES}
        for child in self._states.values():
            child.set(0)
        self._state: str | None = None
        self._protected = self.protected.labels(**self.labels)
        self._unprotected = self.unprotected.labels(**self.labels)
        self._checkpoints = self.checkpoints.labels(**self.labels)
        self._forced = self.forced.labels(**self.labels)
        self._pause = self.pause.labels(**self.labels)
        self._probe = self.probe.labels(**self.labels)
        self._compare = {
            "timeouts": self.compare_timeouts.labels(**self.labels),
            "drops": self.compare_drops.labels(**self.labels),
        }

    def tick(self, state: str, leading: bool, protected: bool, dt: float) -> None:
        if state != self._state:
            if self._state is not None:
                self._states[self._state].set(0)
            self._states[state].set(1)
            self._state = state
        self._protected.set(1 if leading and protected else 0)
        if leading and not protected and dt > 0:
            self._unprotected.inc(dt)

    def checkpoints_seen(self, count: int, pauses_ms: Sequence[float], forced: int = 0) -> None:
        if forced < self._seen["forced"]:
            self._seen["forced"] = 0
        if forced > self._seen["forced"]:
            self._forced.inc(forced - self._seen["forced"])
            self._seen["forced"] = forced
        if count < self._seen["checkpoints"]:
            self._seen["checkpoints"] = 0  # a new QEMU counts from zero
        if count == self._seen["checkpoints"]:
            return
        for p in _new(pauses_ms, count, self._seen["checkpoints"]):
            self._pause.observe(p / 1000.0)
        self._checkpoints.inc(count - self._seen["checkpoints"])
        self._seen["checkpoints"] = count

    def probe_seen(self, matched: int, rtts_ms: Sequence[float]) -> None:
        if matched < self._seen["probe"]:
            self._seen["probe"] = 0  # a new probe counts from zero
        for v in _new(rtts_ms, matched, self._seen["probe"]):
            self._probe.observe(v / 1000.0)
        self._seen["probe"] = matched

    def qmp_seen(self, total: int, calls: Sequence[tuple[str, float, bool]]) -> None:
        if total < self._seen["qmp"]:
            self._seen["qmp"] = 0
        for command, seconds, ok in _new(calls, total, self._seen["qmp"]):
            self.qmp.labels(**self.labels, command=command).observe(seconds)
            if not ok:
                self.qmp_errors.labels(**self.labels, command=command).inc()
        self._seen["qmp"] = total

    def compare_seen(self, timeouts: int, drops: int) -> None:
        for key, total in (("timeouts", timeouts), ("drops", drops)):
            if total < self._seen[key]:
                self._seen[key] = 0
            if total > self._seen[key]:
                self._compare[key].inc(total - self._seen[key])
                self._seen[key] = total

    def link_seen(self, counters: dict[str, int]) -> None:
        self.families.link_seen(self.labels["node"], counters)

    def failover(self, action: str, cause: str) -> None:
        self.failovers.labels(**self.labels, action=action, cause=cause or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
