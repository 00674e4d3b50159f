"""The replication link's interface counters, read from sysfs."""

from __future__ import annotations

from pathlib import Path

from coloft.effects.link import counters, iface_of


def test_counters_read_what_sysfs_has(tmp_path: Path) -> None:
    stats = tmp_path / "repl0" / "statistics"
    stats.mkdir(parents=True)
    (stats / "rx_bytes").write_text("123\n")
    (stats / "tx_dropped").write_text("4\n")
    (stats / "rx_errors").write_text("garbage\n")
    assert counters("repl0", tmp_path) == {"rx_bytes": 123, "tx_dropped": 4}
    assert counters("missing", tmp_path) == {}


def test_one_reading_serves_every_caller_for_a_while(tmp_path: Path) -> None:
    stats = tmp_path / "repl0" / "statistics"
    stats.mkdir(parents=True)
    (stats / "rx_bytes").write_text("1\n")
    assert counters("repl0", tmp_path) == {"rx_bytes": 1}
    (stats / "rx_bytes").write_text("2\n")
    assert counters("repl0", tmp_path) == {"rx_bytes": 1}, "read again within MAX_AGE_S"


def test_the_loopback_address_is_found_on_lo() -> None:
    assert iface_of("127.0.0.1") == "lo"
    assert iface_of("192.0.2.254") is None
