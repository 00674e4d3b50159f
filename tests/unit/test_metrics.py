"""The agent's Prometheus metrics: names, types, and what each tick adds."""

from __future__ import annotations

from collections import deque

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coloft.agent.metrics import STATES, Families, Metrics
from coloft.lab.fleet_demo import failovers_by_pair


def families(m: Metrics) -> dict[str, object]:
    text = m.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(m: Metrics, sample: str, pair: str | None = "demo", **labels: str) -> float:
    want = {"node": "a", **labels} if pair is None else {"pair": pair, "node": "a", **labels}
    for f in text_string_to_metric_families(m.render().decode()):
        for s in f.samples:
            if s.name == sample and s.labels == want:
                return float(s.value)
    raise AssertionError(f"no sample {sample} {want}")


def test_names_and_types_follow_prometheus_conventions() -> None:
    m = Metrics("demo", "a")
    m.failover("secondary-takes-over", "secondary-lost")
    m.qmp_seen(1, [("query-status", 0.002, True)])
    found = families(m)
    expected = {
        "coloft_checkpoints": "counter",
        "coloft_checkpoint_pause_seconds": "histogram",
        "coloft_protected": "gauge",
        "coloft_agent_state": "gauge",
        "coloft_unprotected_seconds": "counter",
        "coloft_failovers": "counter",
        "coloft_last_detection_seconds": "gauge",
        "coloft_reprotections": "counter",
        "coloft_resync_bytes": "gauge",
        "coloft_resync_progress_ratio": "gauge",
        "coloft_probe_rtt_seconds": "histogram",
        "coloft_qmp_command_seconds": "histogram",
        "coloft_qmp_errors": "counter",
        "coloft_compare_timed_out_packets": "counter",
        "coloft_compare_dropped_packets": "counter",
    }
    for name, kind in expected.items():
        assert name in found, name
        assert found[name].type == kind, (name, found[name].type)  # type: ignore[attr-defined]


def test_each_tick_adds_only_what_is_new() -> None:
    m = Metrics("demo", "a")
    m.tick("alone", leading=True, protected=False, dt=0.5)
    m.tick("primary", leading=True, protected=True, dt=0.5)
    assert value(m, "coloft_unprotected_seconds_total") == 0.5
    assert value(m, "coloft_protected") == 1.0
    assert value(m, "coloft_agent_state", state="primary") == 1.0
    assert value(m, "coloft_agent_state", state="alone") == 0.0
    m.tick("primary", leading=True, protected=True, dt=0.1)
    m.tick("alone", leading=True, protected=False, dt=0.1)
    states = [s for s in STATES if value(m, "coloft_agent_state", state=s) == 1.0]
    assert states == ["alone"], states
    m.checkpoints_seen(3, [10.0, 20.0, 300.0], 1)
    m.checkpoints_seen(4, [10.0, 20.0, 300.0, 40.0], 2)
    assert value(m, "coloft_checkpoints_total") == 4
    assert value(m, "coloft_forced_checkpoints_total") == 2
    assert value(m, "coloft_checkpoint_pause_seconds_count") == 4
    assert value(m, "coloft_checkpoint_pause_seconds_bucket", le="0.025") == 2
    # A new QEMU counts from zero: nothing is lost or counted twice.
    m.checkpoints_seen(1, [5.0])
    assert value(m, "coloft_checkpoints_total") == 5
    # The agent's windows are deques, as the probe and the QMP session keep them.
    rtts = deque([1.0, 2.0], maxlen=2)
    m.probe_seen(2, rtts)
    m.probe_seen(2, rtts)
    rtts.append(3.0)
    m.probe_seen(3, rtts)
    assert value(m, "coloft_probe_rtt_seconds_count") == 3
    assert value(m, "coloft_probe_rtt_seconds_sum") == 0.006
    m.qmp_seen(2, deque([("stop", 0.001, True), ("cont", 0.5, False)]))
    assert value(m, "coloft_qmp_errors_total", command="cont") == 1
    # A full window: only its newest entry is new.
    calls = deque([("query-status", 0.001, True)] * 999 + [("cont", 0.2, False)], maxlen=1000)
    m.qmp_seen(3, calls)
    assert value(m, "coloft_qmp_errors_total", command="cont") == 2
    with pytest.raises(AssertionError, match="no sample"):
        value(m, "coloft_qmp_command_seconds_count", command="query-status")
    m.compare_seen(timeouts=3, drops=0)
    m.compare_seen(timeouts=1, drops=2)  # signs start over with a new pair
    assert value(m, "coloft_compare_timed_out_packets_total") == 4
    assert value(m, "coloft_compare_dropped_packets_total") == 2
    m.failover("primary-continues-alone", "")
    assert (
        value(m, "coloft_failovers_total", action="primary-continues-alone", cause="unknown") == 1
    )


def test_link_counters_count_on_when_the_interface_starts_over() -> None:
    m = Metrics("demo", "a")
    m.link_seen({"rx_bytes": 1000, "tx_bytes": 500, "rx_dropped": 0, "tx_dropped": 0})
    m.link_seen({"rx_bytes": 1600, "tx_bytes": 700, "rx_dropped": 2, "tx_dropped": 0})
    m.link_seen({"rx_bytes": 100, "tx_bytes": 50, "rx_dropped": 0, "tx_dropped": 0})
    rx = value(m, "coloft_replication_link_bytes_total", pair=None, direction="rx")
    assert rx == 700
    assert value(m, "coloft_replication_link_bytes_total", pair=None, direction="tx") == 250
    dropped = value(m, "coloft_replication_link_dropped_packets_total", pair=None, direction="rx")
    assert dropped == 2


def test_the_host_link_is_counted_once_whatever_the_number_of_pairs() -> None:
    shared = Families()
    one, two = Metrics("vm0", "a", shared), Metrics("vm1", "a", shared)
    one.link_seen({"rx_bytes": 1000, "tx_bytes": 10})
    two.link_seen({"rx_bytes": 1000, "tx_bytes": 10})
    one.link_seen({"rx_bytes": 1500, "tx_bytes": 10})
    two.link_seen({"rx_bytes": 1500, "tx_bytes": 10})
    two.link_seen({"rx_bytes": 1800, "tx_bytes": 10})
    assert value(one, "coloft_replication_link_bytes_total", pair=None, direction="rx") == 800


def test_pairs_of_one_agent_share_the_families() -> None:
    families = Families()
    web, db = Metrics("web", "a", families), Metrics("db", "a", families)
    web.checkpoints_seen(3, [10.0, 20.0, 30.0])
    db.checkpoints_seen(1, [5.0])
    web.failover("secondary-takes-over", "qemu-died")
    text = db.render().decode()
    assert text == web.render().decode()
    found = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        s.labels["pair"]: s.value
        for s in found["coloft_checkpoints"].samples
        if s.name == "coloft_checkpoints_total"
    }
    assert counts == {"web": 3.0, "db": 1.0}
    # One HELP/TYPE per family, however many pairs.
    assert text.count("# TYPE coloft_checkpoints_total counter") == 1


def test_the_fleet_demo_reads_failovers_per_pair_from_a_scrape() -> None:
    families = Families()
    Metrics("db", "b", families)
    web = Metrics("web", "b", families)
    web.failover("secondary-takes-over", "peer-lost")
    assert failovers_by_pair(web.render().decode()) == {"web": {"secondary-takes-over": 1.0}}
    with pytest.raises(ValueError):
        failovers_by_pair("coloft_failovers_total{pair=web 1\n")
