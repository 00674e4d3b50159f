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
