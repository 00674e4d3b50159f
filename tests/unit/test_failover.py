"""Failover decisions and choreographies (pure)."""

from __future__ import annotations

from coloft.core.failover import (
    Action,
    decide,
    primary_continue_alone,
    secondary_takeover,
    unresponsive,
)
from coloft.model.status import SideStatus
from coloft.model.steps import Step, Until


def side(node: str, role: str, alive: bool) -> SideStatus:
    return SideStatus(node, role, None, alive)


def names(steps: list[Step]) -> list[str]:
    return [s.name for s in steps]


def test_decisions() -> None:
    p, s = side("a", "primary", True), side("b", "secondary", True)
    p_dead, s_dead = side("a", "primary", False), side("b", "secondary", False)
    assert decide(p, s, True).action is Action.NONE
    assert decide(p_dead, s, True).action is Action.SECONDARY_TAKES_OVER
    assert decide(p, s_dead, True).action is Action.PRIMARY_CONTINUES_ALONE
    assert decide(p, s_dead, False).action is Action.PRIMARY_CONTINUES_ALONE
    assert decide(p_dead, s_dead, True).action is Action.NONE


def test_an_unsynced_secondary_never_takes_over() -> None:
    d = decide(side("a", "primary", False), side("b", "secondary", True), in_sync=False)
    assert d.action is Action.REFUSE
    assert "never completed a checkpoint" in d.reason


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


def test_unresponsive_after_the_limit_only() -> None:
    last = {"a": 10.0, "b": 11.5}
    assert unresponsive(last, 12.0, 2.0) == []
    assert unresponsive(last, 12.1, 2.0) == ["a"]
    assert unresponsive(last, 14.0, 2.0) == ["a", "b"]
