"""The policy per reason and the re-establishing of half-open channel ends (pure)."""

from __future__ import annotations

from coloft.core import policy
from coloft.core.policy import Reconnector, dead_ends, policy_for, reestablish
from coloft.model.spec import Policy, PolicySpec
from coloft.model.steps import Role

DEFAULT = PolicySpec()


def test_each_reason_maps_to_its_policy() -> None:
    assert policy_for("mirror-disconnected", DEFAULT) is Policy.REESTABLISH
    assert policy_for("compare-in-unacknowledged", DEFAULT) is Policy.REESTABLISH
    assert policy_for("probe-timeout", DEFAULT) is Policy.ALERT
    # A broken checkpoint stream or NBD link freezes the guest: no choice.
    assert policy_for("migration-unacknowledged", DEFAULT) is Policy.RUN_ALONE
    assert policy_for("nbd-disconnected", DEFAULT) is Policy.RUN_ALONE
    # COLO cannot go on without the secondary: always run alone.
    assert policy_for("secondary-stalled", DEFAULT) is Policy.RUN_ALONE
    assert policy_for("secondary-lost", DEFAULT) is Policy.RUN_ALONE
    # Not something a policy answers (bring-up, a leader's own trouble).
    assert policy_for("first-checkpoint", DEFAULT) is None
    assert policy_for("no-checkpoint", DEFAULT) is None
    assert policy_for("", DEFAULT) is None
    alone = PolicySpec(mirror=Policy.RUN_ALONE)
    assert policy_for("mirror-unacknowledged", alone) is Policy.RUN_ALONE


def test_what_counts_as_applied_at_once() -> None:
    assert policy.applied_at_once(Policy.ALERT, "mirror-disconnected")
    # A dropped connection is kept; TCP delivers once the link is back.
    assert policy.applied_at_once(Policy.REESTABLISH, "mirror-unacknowledged")
    # A reset one is applied when the yank is done, a run-alone when the failover is.
    assert not policy.applied_at_once(Policy.REESTABLISH, "mirror-disconnected")
    assert not policy.applied_at_once(Policy.RUN_ALONE, "probe-timeout")
    assert "yank" in policy.meaning(Policy.REESTABLISH, "compare-in-stale")


def test_a_reset_leaves_the_reading_end_half_open() -> None:
    # Reset mirror: the primary's sending end is gone, the secondary's reading end
    # still looks established and must be yanked so it reconnects.
    assert dead_ends({"mirror": "ok"}, {"mirror": "disconnected"}, DEFAULT) == ["mirror"]
    # Reset compare-in, seen from the primary: the secondary lost its end.
    both = {"mirror": "ok", "compare-in": "ok"}
    assert dead_ends(both, {"mirror": "ok", "compare-in": "disconnected"}, DEFAULT) == [
        "compare-in"
    ]
    # The secondary reconnected while QEMU still served the old connection.
    assert dead_ends({"compare-in": "stale: 2 connections"}, {"compare-in": "ok"}, DEFAULT) == [
        "compare-in"
    ]
    # Nothing to yank: both ends gone (reconnecting), a dropped (kept) connection,
    # no word from the peer, or a policy that does not re-establish.
    assert dead_ends({"mirror": "disconnected"}, {"mirror": "disconnected"}, DEFAULT) == []
    assert dead_ends({"mirror": "unacknowledged: 9 bytes"}, {"mirror": "ok"}, DEFAULT) == []
    assert dead_ends({"mirror": "ok"}, {}, DEFAULT) == []
    alert = PolicySpec(mirror=Policy.ALERT)
    assert dead_ends({"mirror": "ok"}, {"mirror": "disconnected"}, alert) == []


def test_an_end_is_yanked_after_it_looked_dead_a_while_and_not_again_too_soon() -> None:
    r = Reconnector()
    assert r.due(10.0, ["mirror"]) == []
    assert r.due(10.0 + policy.HOLD_S / 2, ["mirror"]) == []
    assert r.due(10.0 + policy.HOLD_S, ["mirror"]) == ["mirror"]
    assert r.due(10.5, ["mirror"]) == []
    # A flicker (alive again for one look) restarts the hold.
    assert r.due(12.0, []) == []
    assert r.due(12.5, ["mirror"]) == []
    assert r.due(12.5 + policy.HOLD_S, ["mirror"]) == ["mirror"]


def test_each_role_yanks_its_own_chardev() -> None:
    steps = reestablish("b", Role.SECONDARY, ["mirror", "compare-in"])
    assert [s.command for s in steps] == ["yank", "object-del", "object-add", "yank"]
    assert [steps[i].arguments["instances"][0]["id"] for i in (0, 3)] == ["red0", "red1"]
    assert all(s.node == "b" for s in steps) and steps[0].oob
    # The redirector goes back where it was: before f2 and the rewriter.
    readd = steps[2].arguments
    assert (readd["id"], readd["indev"], readd["position"], readd["insert"]) == (
        "f1",
        "red0",
        "id=f2",
        "before",
    )
    primary = reestablish("a", Role.PRIMARY, ["compare-in"])
    assert primary[0].arguments["instances"] == [{"type": "chardev", "id": "compare1"}]


def test_colo_compare_log_signs() -> None:
    from coloft.core.compare_log import CompareSigns, overflowing, read_lines

    lines = [
        "colo_old_packet_check_found old_time=12",
        "colo_compare_drop_packet : primary: queue size too big, drop packet",
        "qemu-system-x86_64: colo-compare secondary_in error",
        "something else",
    ]
    signs = read_lines(CompareSigns(), lines, 100.0)
    assert (signs.timeouts, signs.overflows, signs.unreadable) == (1, 1, "compare-in-unreadable")
    assert overflowing(signs, 101.0) and not overflowing(signs, 103.0)
    assert policy_for("compare-in-unreadable", DEFAULT) is Policy.RUN_ALONE
    assert policy_for("compare-queue-overflow", DEFAULT) is Policy.ALERT
