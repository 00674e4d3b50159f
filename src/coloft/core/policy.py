"""What the agents do about each way the comparison path breaks. Pure.

Three answers, chosen per reason in the spec's [policy] table:
- alert: report DEGRADED with the reason and an event; nothing else changes.
- re-establish: an end whose peer end is gone (a reset) is half-open and never
  learns it, because COLO's sockets only ever read on one side; yanking it makes
  the secondary's socket reconnect (every RECONNECT_MS) once the link carries
  again. A silently dropped channel keeps its TCP connection: retransmission
  delivers once the link is back, so there is nothing to yank.
- run-alone: the primary drops its secondary (core.ha's GO_ALONE), so clients are
  no longer held back until compare_timeout on every packet.
A broken checkpoint stream or NBD link always ends in running alone: the guest is
frozen in the checkpoint meanwhile (core.ha, STALL_LIMIT_S).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coloft.core.argv import NETDEV_ID
from coloft.core.failover import yank
from coloft.model.spec import Policy, PolicySpec
from coloft.model.steps import Role, Step

# The chardev holding each channel's end, per role (ids from core.choreography).
CHARDEVS = {
    Role.PRIMARY: {"mirror": "mirror0", "compare-in": "compare1"},
    Role.SECONDARY: {"mirror": "red0", "compare-in": "red1"},
}
CHANNEL_KINDS = ("mirror", "compare-in", "migration", "nbd")
PROBE_TIMEOUT = "probe-timeout"
# The peer's view of a channel comes with its heartbeat: up to a socket poll and a
# heartbeat late. An end is yanked only once it looked dead for longer than that.
HOLD_S = 0.3
# At most one yank of the same end this often: a reconnect takes up to a second.
RETRY_S = 2.0


# Reasons that leave COLO unable to go on: the secondary is dropped (core.ha).
ALWAYS_ALONE = (
    "secondary-stalled",
    "secondary-lost",
    "replication-path-lost",
    "checkpoint-stalled",
    # colo-compare stopped reading an input for good: nothing is compared any more.
    "compare-in-unreadable",
    "compare-primary-unreadable",
)
# Reasons that are reported and nothing else: packets dropped by a full
# colo-compare queue reach the client again by TCP retransmission.
ALWAYS_ALERT = ("compare-queue-overflow",)


def kind(code: str) -> str | None:
    """The policy table's key for a reason code; None for reasons no policy handles."""
    if code == PROBE_TIMEOUT:
        return "probe"
    if code in ALWAYS_ALONE or code in ALWAYS_ALERT:
        return code
    return next((k for k in CHANNEL_KINDS if code.startswith(f"{k}-")), None)


def policy_for(code: str, spec: PolicySpec) -> Policy | None:
    k = kind(code)
    if k is None:
        return None
    if k in ("migration", "nbd") or k in ALWAYS_ALONE:
        return Policy.RUN_ALONE
    if k in ALWAYS_ALERT:
        return Policy.ALERT
    return spec.of(k)


def _kept(code: str) -> bool:
    """Nothing to yank: a dropped connection is kept, a probe timeout names none."""
    return code.endswith("-unacknowledged") or kind(code) == "probe"


def meaning(policy: Policy, code: str) -> str:
    """What applying the policy to this reason does, for the event and the status."""
    if policy is Policy.ALERT:
        return "alert only: reported, nothing else changes"
    if policy is Policy.RUN_ALONE:
        return "run alone: the primary drops its secondary"
    if _kept(code):
        return "re-establish: connection kept, TCP delivers once the link carries again"
    return "re-establish: yank the half-open end so the secondary reconnects"


def applied_at_once(policy: Policy, code: str) -> bool:
    """Whether deciding is all there is to it (no yank, no failover to wait for)."""
    if policy is Policy.ALERT:
        return True
    return policy is Policy.REESTABLISH and _kept(code)


def dead_ends(mine: dict[str, str], peer: dict[str, str], spec: PolicySpec) -> list[str]:
    """Channels whose end on this host is half-open or stale and may be re-established."""
    found = []
    for name in ("mirror", "compare-in"):
        m, p = mine.get(name), peer.get(name)
        if spec.of(name) is not Policy.REESTABLISH or m is None or m == "disconnected":
            continue
        if m.startswith("stale") or p == "disconnected":
            found.append(name)
    return found


@dataclass
class Reconnector:
    """When a dead end has looked dead long enough to yank, and not again too soon."""

    since: dict[str, float] = field(default_factory=dict)
    yanked: dict[str, float] = field(default_factory=dict)

    def due(self, now: float, dead: list[str]) -> list[str]:
        self.since = {n: self.since.get(n, now) for n in dead}
        out = [
            n
            for n in dead
            if now - self.since[n] >= HOLD_S and now - self.yanked.get(n, float("-inf")) >= RETRY_S
        ]
        for n in out:
            self.yanked[n] = now
        return out


def reestablish(node: str, role: Role, names: list[str]) -> list[Step]:
    """Yank this host's end of each channel; QEMU re-listens or reconnects by itself.

    The secondary's mirror redirector drops its reader for good when its socket
    closes (QEMU's filter-redirector does so on CHR_EVENT_CLOSED), so it is put
    back, at its old place in the netdev's filter chain: before the redirector of
    the guest's output and the rewriter, which must see the packets it injects.
    """
    steps = []
    for n in names:
        steps.append(yank(node, {"type": "chardev", "id": CHARDEVS[role][n]}))
        if role is Role.SECONDARY and n == "mirror":
            steps += [
                Step(node, "remove mirror redirector f1", "object-del", {"id": "f1"}),
                Step(
                    node,
                    "put mirror redirector f1 back",
                    "object-add",
                    {
                        "qom-type": "filter-redirector",
                        "id": "f1",
                        "netdev": NETDEV_ID,
                        "queue": "tx",
                        "indev": CHARDEVS[role][n],
                        "position": "id=f2",
                        "insert": "before",
                    },
                ),
            ]
    return steps
