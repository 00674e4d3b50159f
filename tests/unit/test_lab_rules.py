"""The lab's nftables rules for breaking one channel (text only; applied in integration)."""

from __future__ import annotations

import pytest

from coloft.lab.net import channel_fault_ruleset


def test_one_direction_only_touches_that_chain() -> None:
    out = channel_fault_ruleset("repl", [9000], "drop", "out")
    assert "chain output" in out and "chain input" not in out
    assert 'oifname "repl" tcp dport { 9000 } drop' in out
    both = channel_fault_ruleset("repl", [9005, 9004], "drop")
    assert "chain output" in both and "chain input" in both and "{ 9004, 9005 }" in both


def test_reset_lets_its_own_resets_through() -> None:
    rules = channel_fault_ruleset("repl", [9001], "reset", "in")
    assert "tcp flags & rst == 0 reject with tcp reset" in rules
    assert "chain output" not in rules


def test_cut_resets_only_what_is_longer_than_a_packets_length_piece() -> None:
    rules = channel_fault_ruleset("repl", [9001], "cut")
    assert 'iifname "repl" tcp dport { 9001 } ip length > 110 tcp flags & rst == 0 reject' in rules


def test_no_ports_only_removes_the_table() -> None:
    assert channel_fault_ruleset("lo", [], "drop").splitlines() == [
        "add table inet coloft_chan",
        "delete table inet coloft_chan",
    ]


@pytest.mark.parametrize(("mode", "direction"), [("delay", "both"), ("drop", "sideways")])
def test_bad_mode_or_direction_is_named(mode: str, direction: str) -> None:
    with pytest.raises(ValueError, match=r"(mode|direction) must be"):
        channel_fault_ruleset("repl", [9000], mode, direction)
