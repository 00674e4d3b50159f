"""What colo-compare says only in QEMU's log. Pure: lines in, signs out.

colo-compare has no QMP for its troubles. With two trace events enabled on the
command line (core.argv) and its error reports, QEMU's stderr tells:
- a packet dropped because a connection's queue is full (max_queue_size): the
  client loses it and the comparison of that flow is skewed;
- a primary packet that waited compare_timeout for its secondary twin and is
  released by a forced checkpoint (counted: the share of forced checkpoints);
- a malformed frame on a compare input: colo-compare stops reading that socket
  for good (QEMU removes its handler), so nothing is compared any more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

OVERFLOW_EVENT = "colo_compare_drop_packet"
TIMEOUT_EVENT = "colo_old_packet_check_found"
TRACE_EVENTS = (OVERFLOW_EVENT, TIMEOUT_EVENT)
UNREADABLE = {
    "colo-compare secondary_in error": "compare-in-unreadable",
    "colo-compare primary_in error": "compare-primary-unreadable",
}
# An overflow keeps the pair DEGRADED this long after the last dropped packet.
OVERFLOW_HOLD_S = 2.0


@dataclass(frozen=True)
class CompareSigns:
    overflows: int = 0
    overflow_at: float | None = None
    timeouts: int = 0
    unreadable: str | None = None  # a reason code once an input was dropped for good


def read_lines(signs: CompareSigns, lines: list[str], now: float) -> CompareSigns:
    for line in lines:
        if OVERFLOW_EVENT in line:
            signs = replace(signs, overflows=signs.overflows + 1, overflow_at=now)
        elif TIMEOUT_EVENT in line:
            signs = replace(signs, timeouts=signs.timeouts + 1)
        else:
            for text, code in UNREADABLE.items():
                if text in line and signs.unreadable is None:
                    signs = replace(signs, unreadable=code)
    return signs


def overflowing(signs: CompareSigns, now: float) -> bool:
    return signs.overflow_at is not None and now - signs.overflow_at <= OVERFLOW_HOLD_S
