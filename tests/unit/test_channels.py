"""Naming the broken COLO channel from /proc/net/tcp (pure)."""

from __future__ import annotations

from pathlib import Path

from coloft.config.load import load_spec
from coloft.core.channels import (
    assess,
    broken,
    endpoints,
    parse_proc_net_tcp,
    replication_stuck,
    retransmissions,
)
from coloft.model.steps import Role

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt ...\n"


def line(local: str, remote: str, st: str, unacked: int = 0, probes: int = 0) -> str:
    """A /proc/net/tcp line in the kernel's layout (addresses as it prints them)."""
    return (
        f"   1: {local} {remote} {st} {unacked:08X}:00000000 00:00000000 00000000"
        f"     0        {probes} 825979 1 0 20 4 30 10 -1\n"
    )


# As read on the lab's primary (198.51.100.1 = 016433C6) with the mirror channel's
# packets dropped: 1530 bytes unacknowledged, 6 probes out.
LISTEN = line("016433C6:2328", "00000000:0000", "0A")
MIRROR_STUCK = line("016433C6:2328", "026433C6:BD3C", "01", unacked=1530, probes=6)
MIRROR_OK = line("016433C6:2328", "026433C6:BD3C", "01")
COMPARE_OK = line("016433C6:2329", "026433C6:DC3A", "01")
MIGRATION_OK = line("016433C6:D504", "026433C6:232D", "01")
NBD_OK = line("016433C6:8D30", "026433C6:232C", "01")


def test_parse_reads_addresses_and_the_unacknowledged_bytes() -> None:
    socks = parse_proc_net_tcp(HEADER + LISTEN + MIRROR_STUCK + "garbage line\n")
    assert len(socks) == 2
    s = socks[1]
    assert s.local == ("198.51.100.1", 9000) and s.remote == ("198.51.100.2", 48444)
    assert (s.state, s.unacked, s.probes) == (1, 1530, 6)


def test_primary_names_a_silently_dropped_mirror_and_a_missing_compare_in() -> None:
    spec = load_spec(EXAMPLE)
    wanted = endpoints(Role.PRIMARY, spec.primary, spec.secondary)
    text = HEADER + LISTEN + MIRROR_STUCK + MIGRATION_OK + NBD_OK
    found = assess(parse_proc_net_tcp(text), wanted)
    assert found["mirror"].startswith("unacknowledged: 1530 bytes")
    assert found["compare-in"] == "disconnected"
    assert found["migration"] == found["nbd"] == "ok"
    healthy = assess(
        parse_proc_net_tcp(
            HEADER
            + COMPARE_OK
            + MIGRATION_OK
            + NBD_OK
            + MIRROR_STUCK.replace("000005FA", "00000000").replace(
                "     0        6", "     0        0"
            )
        ),
        wanted,
    )
    assert set(healthy.values()) == {"ok"}, healthy
    reasons = broken(found, {"compare-in": "ok"})
    assert [r.code for r in reasons] == ["mirror-unacknowledged", "compare-in-disconnected"]
    assert reasons[0].text.startswith("mirror channel (primary -> secondary input) unacknowledged")
    assert reasons[1].text == "compare-in channel (secondary output -> colo-compare) disconnected"


def test_a_server_end_with_two_connections_holds_a_dead_one() -> None:
    # The secondary reconnected while QEMU still serves the old, half-open connection.
    spec = load_spec(EXAMPLE)
    wanted = endpoints(Role.PRIMARY, spec.primary, spec.secondary)
    second = line("016433C6:2329", "026433C6:DC40", "01")
    found = assess(parse_proc_net_tcp(HEADER + COMPARE_OK + second + MIRROR_OK), wanted)
    assert found["compare-in"].startswith("stale: 2 connections")
    assert found["mirror"] == "ok"
    assert [r.code for r in broken(found, {})] == [
        "compare-in-stale",
        "migration-disconnected",
        "nbd-disconnected",
    ]


def test_a_stranger_on_a_channel_port_is_not_part_of_the_channel() -> None:
    # 203.0.113.9 (C97100CB) connected to the mirror port: the kernel holds the
    # connection in QEMU's backlog; the channel itself is the one from the peer.
    spec = load_spec(EXAMPLE)
    wanted = endpoints(Role.PRIMARY, spec.primary, spec.secondary)
    stranger = line("016433C6:2328", "097100CB:C000", "01")
    found = assess(parse_proc_net_tcp(HEADER + MIRROR_OK + stranger + COMPARE_OK), wanted)
    assert found["mirror"] == found["compare-in"] == "ok"
    alone = assess(parse_proc_net_tcp(HEADER + stranger), wanted)
    assert alone["mirror"] == "disconnected"


def test_secondary_watches_its_own_ends() -> None:
    spec = load_spec(EXAMPLE)
    assert set(endpoints(Role.SECONDARY, spec.secondary, spec.primary)) == {"mirror", "compare-in"}


def test_a_stuck_checkpoint_stream_or_nbd_link_is_broken_after_two_retransmissions() -> None:
    assert retransmissions("unacknowledged: 120 bytes, 3 retransmissions") == 3
    assert retransmissions("ok") == 0
    one = {"migration": "unacknowledged: 120 bytes, 1 retransmissions", "nbd": "ok"}
    assert replication_stuck(one) is None
    two = {"migration": "ok", "nbd": "unacknowledged: 4096 bytes, 2 retransmissions"}
    found = replication_stuck(two)
    assert found is not None and found.code == "nbd-unacknowledged"
    gone = replication_stuck({"migration": "disconnected"})
    assert gone is not None and gone.code == "migration-disconnected"
    # The secondary watches no replication channel: nothing to judge.
    assert replication_stuck({"mirror": "disconnected"}) is None
