"""The host's TCP table, read from procfs and shared between the pairs of an agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from coloft.effects.sockets import tcp_sockets

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
LINE = (
    "   0: 010200C0:2328 020200C0:D431 01 {tx:08X}:00000000 00:00000000 00000000     0"
    "        0 12345 1 0000000000000000 20 4 30 10 -1\n"
)


def test_the_table_is_parsed_and_one_reading_serves_callers_for_a_moment(
    tmp_path: Path,
) -> None:
    table = tmp_path / "tcp"
    table.write_text(HEADER + LINE.format(tx=5))
    first = tcp_sockets(table)
    assert [(s.local, s.remote, s.unacked) for s in first] == [
        (("192.0.2.1", 9000), ("192.0.2.2", 54321), 5)
    ]
    table.write_text(HEADER + LINE.format(tx=9))
    assert tcp_sockets(table) == first, "read again within MAX_AGE_S"


def test_an_unreadable_table_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        tcp_sockets(tmp_path / "absent")
