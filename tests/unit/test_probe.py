"""How probe replies count: answers on time, and proof of a match (no sockets)."""

from __future__ import annotations

import asyncio

from coloft.effects.probe import (
    PAUSE_ALLOWANCE_S,
    SETTLE_S,
    IcmpProbe,
    _SharedSocket,
    echo_request,
)


def probe_with(sends: list[float]) -> IcmpProbe:
    p = IcmpProbe("192.0.2.10", None)
    p.unanswered.extend(sends)
    p.unproven.extend(sends)
    return p


def test_a_reply_on_time_with_no_checkpoint_between_is_proof() -> None:
    p = probe_with([10.0, 10.1])
    p.answered(10.0, 10.004)
    assert p.on_time_streak == 1
    # Answered at once; proof only once a checkpoint could no longer have crossed it.
    assert round(p.late_s(10.2), 6) == 0.1
    assert round(p.unproven_s(10.2), 6) == 0.2
    p.settle(10.004 + SETTLE_S, ())
    assert round(p.rtts_ms[-1], 6) == 4.0 and round(p.unproven_s(10.2), 6) == 0.1
    assert not p.overdue(10.2)


def test_no_reply_at_all_is_overdue_after_the_budget() -> None:
    p = probe_with([10.0, 10.1, 10.2, 10.3])
    assert not p.overdue(10.3) and p.overdue(10.0 + p.budget_s + 0.01)


def test_replies_only_a_checkpoint_flushed_are_answers_but_not_matches() -> None:
    # Mirror dead, miscompares force a checkpoint every ~100 ms: every reply comes
    # right after a checkpoint began, within the budget, and none is a match.
    sends = [10.0 + i / 10 for i in range(30)]
    p = probe_with(sends)
    starts = tuple(t + 0.05 for t in sends)
    for t in sends:
        p.answered(t, t + 0.06)
    p.settle(13.1, starts)
    assert p.flushed == 30 and not p.rtts_ms
    assert not p.overdue(13.0) and p.on_time_streak == 30
    assert round(p.unproven_s(13.0), 6) == 3.0


def test_a_reply_is_judged_only_once_the_checkpoint_event_could_be_in() -> None:
    p = probe_with([10.0])
    p.answered(10.0, 10.01)
    p.settle(10.01 + SETTLE_S / 2, ())
    assert p.answers
    # The STOP event arrived a little after the packet it flushed.
    p.settle(10.01 + SETTLE_S, (10.015,))
    assert not p.answers and p.flushed == 1 and not p.rtts_ms


def test_a_late_reply_breaks_the_streak_and_proves_nothing() -> None:
    p = probe_with([10.0, 10.1])
    p.answered(10.0, 10.01)
    p.answered(10.1, 10.6)
    assert p.on_time_streak == 0 and round(p.late_s(11.0), 6) == 0.9
    p.settle(11.0, ())
    assert len(p.rtts_ms) == 1 and round(p.unproven_s(11.0), 6) == 0.9


def test_a_lost_reply_breaks_the_streak_once_not_for_as_long_as_it_is_remembered() -> None:
    p = IcmpProbe("192.0.2.10", None)
    p.outstanding[1] = 10.0  # never answered
    p.expire(10.2)
    assert p.outstanding, "within the budget it may still come"
    p.expire(10.4)
    assert p.on_time_streak == 0 and not p.outstanding
    for i in range(5):
        sent = 10.5 + i * 0.1
        p.answered(sent, sent + 0.005)
        p.expire(sent + 0.05)  # what the probe does on each beat
    assert p.on_time_streak == 5, "the lost reply no longer holds recovery back"


def stopped(start: float, end: float) -> IcmpProbe:
    """A probe whose guest a checkpoint stopped from `start` to `end`."""
    p = IcmpProbe("192.0.2.10", None, paused=lambda a, b: max(0.0, min(end, b) - max(start, a)))
    p.unanswered.append(10.0)
    p.unproven.append(10.0)
    return p


def test_a_checkpoint_pause_does_not_count_against_the_budget() -> None:
    # The soak's case: a 300 ms pause right after the send, the reply flushed at its end.
    p = stopped(10.01, 10.31)
    p.outstanding[1] = 10.0
    assert not p.overdue(10.36)
    p.expire(10.36)
    assert p.outstanding, "still within the budget once the pause is spared"
    p.replied(1, 10.351)
    assert p.on_time_streak == 1 and not p.unanswered


def test_a_long_pause_is_spared_only_up_to_the_allowance() -> None:
    # A stall is the stall verdict's; the probe still says the path went quiet.
    p = stopped(10.0, 12.0)
    assert p.overdue(10.0 + p.budget_s + PAUSE_ALLOWANCE_S + 0.01)
    p.outstanding[1] = 10.0
    p.replied(1, 10.0 + p.budget_s + PAUSE_ALLOWANCE_S + 0.01)
    assert p.on_time_streak == 0, "late all the same"


def test_echo_request_checksum_is_valid() -> None:
    data = echo_request(0x1234, 7)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


def test_probes_of_one_process_share_a_socket_and_get_only_their_replies() -> None:
    # Against the loopback addresses: the kernel answers the echoes itself.
    async def scenario() -> tuple[IcmpProbe, IcmpProbe, int]:
        one, two = IcmpProbe("127.0.0.1", None, every_s=0.05), IcmpProbe("127.0.0.2", None, 0.05)
        tasks = [asyncio.create_task(p.run()) for p in (one, two)]
        await asyncio.sleep(0.4)
        open_sockets = len(_SharedSocket.sockets)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return one, two, open_sockets

    one, two, open_sockets = asyncio.run(scenario())
    assert open_sockets == 1 and not _SharedSocket.sockets, "one socket, closed after"
    assert one.ident != two.ident
    for p in (one, two):
        # Each probe counted its own replies only: never more answers than echoes sent.
        assert p.sent >= 5 and p.sent - 1 <= len(p.answers) <= p.sent, (p.sent, len(p.answers))


def test_a_reply_read_late_keeps_the_time_it_arrived() -> None:
    # The socket is read on the probe's beat, not when a reply comes: the round trip
    # must still be the reply's own, from the kernel's stamp.
    async def scenario() -> IcmpProbe:
        # An hour-long beat: the probe sends once and reads nothing until collect().
        probe = IcmpProbe("127.0.0.1", None, every_s=3600.0)
        task = asyncio.create_task(probe.run())
        await asyncio.sleep(0.3)
        probe.collect()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return probe

    probe = asyncio.run(scenario())
    assert probe.sent == 1 and len(probe.answers) == 1
    sent, replied = probe.answers[0]
    assert 0 <= replied - sent < 0.1, replied - sent
