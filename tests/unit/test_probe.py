"""How probe replies count as proof of a working comparison path (no sockets)."""

from __future__ import annotations

from coloft.effects.probe import SETTLE_S, IcmpProbe, echo_request


def probe_with(sends: list[float]) -> IcmpProbe:
    p = IcmpProbe("192.0.2.10", None)
    p.unproven.extend(sends)
    return p


def test_a_reply_on_time_with_no_checkpoint_between_is_proof() -> None:
    p = probe_with([10.0, 10.1])
    p.answers.append((10.0, 10.004))
    p.settle(10.004 + SETTLE_S, ())
    assert p.on_time_streak == 1 and round(p.rtts_ms[-1], 6) == 4.0
    # The later probe, still unanswered, is all that waits.
    assert round(p.late_s(10.2), 6) == 0.1
    assert not p.overdue(10.2)


def test_a_reply_a_checkpoint_flushed_proves_nothing() -> None:
    # Mirror dead, miscompares force a checkpoint every ~100 ms: every reply comes
    # right after a checkpoint began, well within the budget, and none counts.
    p = probe_with([10.0, 10.1, 10.2, 10.3, 10.4])
    starts = (10.05, 10.15, 10.25, 10.35, 10.45)
    for sent, flushed_at in zip([10.0, 10.1, 10.2, 10.3, 10.4], starts, strict=True):
        p.answers.append((sent, flushed_at + 0.01))
    p.settle(11.0, starts)
    assert p.on_time_streak == 0 and p.flushed == 5 and not p.rtts_ms
    assert p.overdue(11.0) and round(p.late_s(11.0), 6) == 1.0


def test_a_reply_is_judged_only_once_the_checkpoint_event_could_be_in() -> None:
    p = probe_with([10.0])
    p.answers.append((10.0, 10.01))
    p.settle(10.02, ())
    assert p.answers and p.on_time_streak == 0
    # The STOP event arrived a little after the packet it flushed.
    p.settle(10.01 + SETTLE_S, (10.012,))
    assert not p.answers and p.flushed == 1 and p.on_time_streak == 0


def test_a_late_reply_breaks_the_streak() -> None:
    p = probe_with([10.0, 10.1])
    p.answers.append((10.0, 10.01))
    p.answers.append((10.1, 10.6))
    p.settle(11.0, ())
    assert p.on_time_streak == 0 and round(p.late_s(11.0), 6) == 0.9


def test_echo_request_checksum_is_valid() -> None:
    data = echo_request(0x1234, 7)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
