"""Failover choreographies (pure)."""

from __future__ import annotations

from coloft.core.failover import abandon_reprotect, primary_continue_alone, secondary_takeover
from coloft.model.steps import Step, Until


def names(steps: list[Step]) -> list[str]:
    return [s.name for s in steps]


def test_secondary_takeover_yanks_first_and_keeps_the_rewriter() -> None:
    steps = secondary_takeover("b")
    assert all(s.node == "b" for s in steps)
    yanks = [i for i, s in enumerate(steps) if s.command == "yank"]
    assert yanks == [0, 1, 2] and all(steps[i].oob for i in yanks)
    n = names(steps)
    assert n.index("stop NBD server") < n.index("declare the primary lost")
    assert n.index("declare the primary lost") < n.index("remove object f2")
    assert not any(s.command == "object-del" and s.arguments["id"] == "rew0" for s in steps)
    assert steps[-2].until is Until.RUNNING
    assert steps[-1].command == "announce-self"


def test_primary_alone_yanks_the_nbd_node_before_deleting_the_replication_child() -> None:
    steps = primary_continue_alone("a")
    n = names(steps)
    assert n.index("yank nbd0") < n.index("detach replication child")
    assert n.index("detach replication child") < n.index("delete replication node")
    removed = {s.arguments["id"] for s in steps if s.command in ("object-del", "chardev-remove")}
    assert {"comp0", "iothread1", "m0", "redire0", "redire1", "mirror0", "compare1"} <= removed
    assert n.index("declare the secondary lost") > max(
        i for i, s in enumerate(steps) if s.command in ("object-del", "chardev-remove")
    )


def test_cleanup_steps_tolerate_what_is_already_gone() -> None:
    for s in [*secondary_takeover("b"), *primary_continue_alone("a")]:
        if s.command in ("yank", "object-del", "chardev-remove", "nbd-server-stop"):
            assert s.accept, s.name


def test_an_abandoned_reprotection_is_undone_from_any_point_and_the_guest_resumed() -> None:
    steps = abandon_reprotect("b")
    n = names(steps)
    # Whatever was or was not added yet: every removal passes when it finds nothing.
    for s in steps:
        if s.command in ("yank", "object-del", "chardev-remove", "block-job-cancel"):
            assert "not found" in s.accept, s
    assert "does not have child" in steps[n.index("detach replication child")].accept
    assert "not found" in steps[n.index("delete replication node")].accept
    assert "not in COLO mode" in steps[n.index("leave COLO if it started")].accept
    assert "Failed to find node" in steps[n.index("disconnect secondary's disk")].accept
    # The disk copy ends first, its link yanked before the cancel flushes through it;
    # the channels are yanked before anything flushes through them.
    assert n[:2] == ["yank resync0", "end disk copy"] and steps[1].arguments["force"] is True
    assert n.index("wait for disk copy to end") < n.index("disconnect secondary's disk")
    assert n.index("yank nbd0") < n.index("delete replication node")
    assert n.index("resume guest") < n.index("wait for the guest to run")
    assert steps[-1].command == "announce-self"
