"""Periodic work on a shared beat. Pure: time is passed in.

An agent runs the same loops for every pair (heartbeats, channel watch, QEMU poll,
probe, decision tick), each at a fixed period. Sleeping "one period from now" lets
N pairs' loops drift apart and wake the process N times per period; sleeping to the
next multiple of the period on the monotonic clock (one clock for every process of
the host) puts them on one beat, so the event loop handles them all in one wakeup,
and the peer's datagrams come in bursts too.
"""

from __future__ import annotations

# Never sleep less than this: a loop that just ran on a beat waits for the next one.
MIN_WAIT_S = 0.001


def until_beat(period_s: float, now: float) -> float:
    """Seconds from `now` to the next multiple of `period_s`."""
    left = period_s - (now % period_s)
    return left if left >= MIN_WAIT_S else left + period_s


def new_beat(period_s: float, last: float, now: float) -> bool:
    """Whether `now` lies in a later period of the beat than `last`: work done "once per
    period" this way is done on the same tick by every pair of an agent (their ticks
    share the beat), so calls to one server can go out together."""
    if last == float("-inf"):  # never done (floor division of it gives NaN)
        return True
    return now // period_s > last // period_s
