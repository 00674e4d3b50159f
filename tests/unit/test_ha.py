"""The agent's decision core: rules, the transition table, and safety over random inputs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from coloft.core.ha import (
    SPARE_AFTER_FAILED_STARTS,
    TRANSITIONS,
    Act,
    Decision,
    Intent,
    Observation,
    State,
    decide,
    diagram,
    first_role,
)
from coloft.core.lease import LeaseTiming
from coloft.model.leader import Leader
from coloft.model.steps import Role

T = LeaseTiming(ttl_s=2.0, renew_every_s=0.5, call_deadline_s=0.4, fence_margin_s=0.4)

PRIMARY_OK = Observation(
    node="a",
    peer="b",
    now=100.0,
    qemu_role=Role.PRIMARY,
    qemu_alive=True,
    qemu_hung=False,
    in_colo=True,
    synced=True,
    peer_qemu_alive=True,
    arbiter_ok=True,
    leader=Leader("a", 7),
    sync="b",
    my_epoch=7,
    renew_sent_at=99.8,
)
SECONDARY_OK = dataclasses.replace(
    PRIMARY_OK, node="b", peer="a", qemu_role=Role.SECONDARY, my_epoch=None, renew_sent_at=None
)


def test_healthy_primary_renews() -> None:
    d = decide(State.PRIMARY, PRIMARY_OK, T)
    assert d == Decision(State.PRIMARY, (Act.RENEW,), "leader (epoch 7), in COLO")


def test_primary_names_the_sync_node_once_a_checkpoint_completed() -> None:
    d = decide(State.PRIMARY, dataclasses.replace(PRIMARY_OK, sync=None), T)
    assert d.actions == (Act.SET_SYNC, Act.RENEW)
    not_yet = dataclasses.replace(PRIMARY_OK, sync=None, synced=False)
    assert Act.SET_SYNC not in decide(State.PRIMARY, not_yet, T).actions


def test_leader_fences_when_its_lease_runs_out() -> None:
    late = dataclasses.replace(PRIMARY_OK, now=99.8 + 1.6)
    d = decide(State.PRIMARY, late, T)
    assert d.state is State.FENCED and d.actions == (Act.FENCE,)


def test_leader_fences_on_another_leader_or_epoch() -> None:
    for leader in (Leader("b", 8), Leader("a", 8), None):
        d = decide(State.PRIMARY, dataclasses.replace(PRIMARY_OK, leader=leader), T)
        assert d.state is State.FENCED, leader
        assert "leadership lost" in d.reason


def test_arbiter_down_leader_keeps_acting_only_within_its_lease() -> None:
    down = dataclasses.replace(PRIMARY_OK, arbiter_ok=False, leader=None, sync=None)
    assert decide(State.PRIMARY, down, T).state is State.PRIMARY
    assert decide(State.PRIMARY, dataclasses.replace(down, now=102.0), T).state is State.FENCED


def test_primary_whose_qemu_died_resigns_at_once() -> None:
    d = decide(State.PRIMARY, dataclasses.replace(PRIMARY_OK, qemu_alive=False), T)
    assert d.state is State.FENCED and d.actions == (Act.FENCE, Act.RESIGN)


def test_primary_clears_sync_before_running_alone() -> None:
    lost = dataclasses.replace(PRIMARY_OK, peer_qemu_alive=False)
    first = decide(State.PRIMARY, lost, T)
    assert first.state is State.PRIMARY and first.actions == (Act.CLEAR_SYNC, Act.RENEW)
    then = decide(State.PRIMARY, dataclasses.replace(lost, sync=None), T)
    assert then.state is State.ALONE and then.actions == (Act.GO_ALONE, Act.RENEW)
    # With the arbiter unreachable, a sync that reads as None is unknown, not cleared.
    blind = dataclasses.replace(lost, sync=None, arbiter_ok=False)
    assert decide(State.PRIMARY, blind, T).actions == (Act.RENEW,)


def test_secondary_follows_a_live_leader() -> None:
    d = decide(State.SECONDARY, SECONDARY_OK, T)
    assert d.actions == () and d.reason == "following a (epoch 7)"


def test_secondary_acquires_then_takes_over() -> None:
    gone = dataclasses.replace(SECONDARY_OK, leader=None)
    assert decide(State.SECONDARY, gone, T).actions == (Act.ACQUIRE,)
    held = dataclasses.replace(gone, leader=Leader("b", 9), my_epoch=9, renew_sent_at=100.0)
    d = decide(State.SECONDARY, held, T)
    assert d.state is State.ALONE and d.actions == (Act.TAKEOVER, Act.RENEW)


@pytest.mark.parametrize(
    "change",
    [
        {"sync": None},
        {"sync": "a"},
        {"synced": False},
        {"arbiter_ok": False},
    ],
)
def test_secondary_never_takes_over_without_every_condition(change: dict[str, object]) -> None:
    o = dataclasses.replace(SECONDARY_OK, leader=None, **change)  # type: ignore[arg-type]
    d = decide(State.SECONDARY, o, T)
    assert d.actions == () and d.state is State.SECONDARY, d


def test_starting_needs_colo_and_for_a_primary_the_leadership() -> None:
    assert decide(State.STARTING, PRIMARY_OK, T).state is State.PRIMARY
    deposed = dataclasses.replace(PRIMARY_OK, leader=Leader("b", 3))
    assert decide(State.STARTING, deposed, T).state is State.FENCED
    assert decide(State.STARTING, SECONDARY_OK, T).state is State.SECONDARY
    booting = dataclasses.replace(SECONDARY_OK, in_colo=False)
    assert decide(State.STARTING, booting, T).state is State.STARTING


def test_terminal_states_stay_and_never_let_a_qemu_run() -> None:
    for s in (State.FENCED, State.DOWN):
        # A QEMU started by a bring-up that raced the fence is stopped.
        assert decide(s, PRIMARY_OK, T) == Decision(
            s, (Act.FENCE,), f"{s.value}: stopping a QEMU that still runs"
        )
        assert decide(s, dataclasses.replace(PRIMARY_OK, qemu_alive=False), T).actions == ()


def random_observation(rng: random.Random) -> Observation:
    node, peer = "a", "b"
    leader = rng.choice([None, Leader(node, rng.randint(1, 3)), Leader(peer, rng.randint(1, 3))])
    return Observation(
        node=node,
        peer=peer,
        now=100.0,
        qemu_role=rng.choice([Role.PRIMARY, Role.SECONDARY]),
        qemu_alive=rng.random() < 0.8,
        qemu_hung=rng.random() < 0.2,
        in_colo=rng.random() < 0.8,
        synced=rng.random() < 0.7,
        peer_qemu_alive=rng.random() < 0.7,
        arbiter_ok=rng.random() < 0.8,
        leader=leader,
        sync=rng.choice([None, node, peer]),
        my_epoch=rng.choice([None, 1, 2, 3]),
        renew_sent_at=rng.choice([None, 99.9, 98.0]),
        repl_ok=rng.random() < 0.8,
        checkpoint_stalled_s=rng.choice([None, 0.1, 2.0]),
        peer_state=rng.choice([None, "primary", "secondary", "alone", "fenced"]),
        intent=rng.choice([None, None, Intent.FAILOVER, Intent.FORCE_FAILOVER]),
        give_up=rng.choice([None, None, "mirror-unacknowledged"]),
        reprotect=rng.random() < 0.5,
        peer_ready=rng.random() < 0.5,
        reprotecting=rng.random() < 0.3,
        peer_reprotecting=rng.random() < 0.3,
        targeted=rng.random() < 0.3,
        protection_off=rng.random() < 0.2,
        guest_stopped=rng.random() < 0.1,
        peer_guest_stopped_s=rng.choice([None, None, 1.0, 5.0]),
        bring_up_failed=rng.random() < 0.3,
        member=rng.random() < 0.8,
        spare=rng.choice([None, "c"]),
        spare_heard=rng.random() < 0.5,
        peer_silent_s=rng.choice([None, 1.0, 20.0]),
        spare_after_s=rng.choice([None, 10.0]),
        peer_failed_starts=rng.choice([0, 0, 1, 2, 5]),
    )


def test_safety_over_random_observations() -> None:
    rng = random.Random(20261126)
    for _ in range(20000):
        state = rng.choice(list(State))
        o = random_observation(rng)
        d = decide(state, o, T)
        assert d.state in TRANSITIONS[state]
        holds = o.my_epoch is not None and o.leader == Leader(o.node, o.my_epoch)
        if Act.TAKEOVER in d.actions:
            assert holds and o.renew_sent_at is not None, (state, o)
            assert o.now < o.renew_sent_at + 1.6, (state, o)
        if Act.ACQUIRE in d.actions:
            assert o.arbiter_ok and o.leader is None, (state, o)
            forced = o.intent is Intent.FORCE_FAILOVER
            assert forced or (o.sync == o.node and o.synced), (state, o)
        if Act.GO_ALONE in d.actions:
            assert o.arbiter_ok and o.sync is None and holds, (state, o)
        if not o.member and state not in (State.PRIMARY, State.ALONE, State.STOPPED):
            # Outside the members: no lead, no QEMU, no way back but being taken in.
            assert d.state is State.SPARE, (state, o, d)
            assert set(d.actions) <= {Act.FENCE} and (Act.FENCE in d.actions) == o.qemu_alive
        if Act.TAKE_SPARE in d.actions:
            assert state is State.ALONE and holds and o.arbiter_ok and o.sync is None, (state, o)
            assert o.spare_heard and not o.reprotecting and not o.protection_off, (state, o)
            assert o.spare_after_s is not None
            if o.peer_silent_s is not None:
                assert o.peer_silent_s >= o.spare_after_s, (state, o)
            else:
                assert o.peer_failed_starts >= SPARE_AFTER_FAILED_STARTS, (state, o)
        if Act.REJOIN in d.actions:
            # Only a node whose QEMU is gone starts over: offering itself to a peer the
            # arbiter says leads alone, or, its bring-up failed, when nobody leads.
            assert not o.qemu_alive and o.arbiter_ok, (state, o)
            if o.leader is None:
                assert o.bring_up_failed, (state, o)
            else:
                assert o.leader.node == o.peer and o.peer_state == "alone", (state, o)
        if state in (State.PRIMARY, State.ALONE) and d.state is State.STOPPED:
            # A leader stops (and resigns) only once nobody may take over.
            assert o.arbiter_ok and o.sync is None and o.guest_stopped, (state, o)
        if state is State.ALONE and d.state is State.PRIMARY:
            assert o.reprotecting and o.in_colo, (state, o)
        if Act.FENCE in d.actions and Act.RESIGN in d.actions:
            assert d.actions.index(Act.FENCE) < d.actions.index(Act.RESIGN), d
        if state in (State.PRIMARY, State.ALONE) and d.state is not State.FENCED:
            # Acting as leader needs a valid own lease and, when the arbiter answers,
            # the leader key with our epoch.
            assert o.renew_sent_at is not None and o.now < o.renew_sent_at + 1.6
            assert holds or not o.arbiter_ok, (state, o)


def test_diagram_comes_from_the_table() -> None:
    text = diagram()
    assert "primary -> alone, fenced" in text
    assert "alone -> fenced, primary" in text and "fenced -> spare, starting" in text
    # The README shows the same diagram.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for line in text.splitlines():
        assert line.rstrip() in readme, line
    assert "secondary -> alone, down" in text


def test_primary_runs_alone_when_only_the_replication_path_is_lost() -> None:
    cut = dataclasses.replace(PRIMARY_OK, repl_ok=False)
    d = decide(State.PRIMARY, cut, T)
    assert d.actions == (Act.CLEAR_SYNC, Act.RENEW)
    assert "replication link to b lost" in d.reason
    assert decide(State.PRIMARY, dataclasses.replace(cut, sync=None), T).state is State.ALONE


def test_secondary_stops_its_stale_copy_once_the_leader_runs_alone() -> None:
    d = decide(State.SECONDARY, dataclasses.replace(SECONDARY_OK, peer_state="alone"), T)
    assert d.state is State.DOWN and d.actions == (Act.FENCE,)


def test_planned_failover_hands_over_only_to_the_sync_node() -> None:
    asked = dataclasses.replace(PRIMARY_OK, intent=Intent.FAILOVER)
    d = decide(State.PRIMARY, asked, T)
    assert d.state is State.FENCED and d.actions == (Act.FENCE, Act.RESIGN)
    unsynced = dataclasses.replace(asked, sync=None)
    d = decide(State.PRIMARY, unsynced, T)
    assert d.state is State.PRIMARY and "failover refused" in d.reason and "--force" in d.reason
    forced = dataclasses.replace(unsynced, intent=Intent.FORCE_FAILOVER)
    d = decide(State.PRIMARY, forced, T)
    assert d.state is State.FENCED and d.actions == (Act.CLEAR_SYNC, Act.FENCE, Act.RESIGN)
    alone = decide(State.ALONE, dataclasses.replace(asked, peer_qemu_alive=False), T)
    assert alone.state is State.ALONE and "no secondary" in alone.reason


def test_forced_secondary_acquires_without_sync_but_only_once_the_leader_is_gone() -> None:
    forced = dataclasses.replace(
        SECONDARY_OK, sync=None, synced=False, intent=Intent.FORCE_FAILOVER
    )
    assert decide(State.SECONDARY, forced, T).actions == ()
    gone = dataclasses.replace(forced, leader=None)
    assert decide(State.SECONDARY, gone, T).actions == (Act.ACQUIRE,)
    blind = dataclasses.replace(gone, arbiter_ok=False)
    assert decide(State.SECONDARY, blind, T).actions == ()


def test_designated_primary_leads_through_bring_up() -> None:
    booting = dataclasses.replace(PRIMARY_OK, in_colo=False)
    assert decide(State.STARTING, booting, T) == Decision(
        State.STARTING, (Act.RENEW,), "bringing up as primary"
    )
    died = dataclasses.replace(booting, qemu_alive=False)
    assert decide(State.STARTING, died, T).actions == (Act.FENCE, Act.RESIGN)
    late = dataclasses.replace(booting, now=99.8 + 1.6)
    assert decide(State.STARTING, late, T).state is State.FENCED


@pytest.mark.parametrize(
    ("node", "leader", "peer_state", "role", "words"),
    [
        ("a", None, None, Role.PRIMARY, "as the spec says"),
        ("b", None, None, Role.SECONDARY, "as the spec says"),
        ("a", Leader("a", 4), None, None, "resigning"),
        ("b", Leader("a", 4), "starting", Role.SECONDARY, "joining as secondary"),
        ("b", Leader("a", 4), "alone", None, "a leads (epoch 4)"),
        ("b", Leader("a", 4), None, None, "waiting for re-protection"),
    ],
)
def test_first_role_after_a_start_or_restart(
    node: str, leader: Leader | None, peer_state: str | None, role: Role | None, words: str
) -> None:
    got, why = first_role(node, "a", leader, peer_state)
    assert got is role and words in why


@pytest.mark.parametrize(
    ("node", "source", "role"),
    [("a", "a", Role.PRIMARY), ("b", "a", Role.SECONDARY), ("b", "b", Role.PRIMARY)],
)
def test_a_pair_nobody_leads_starts_from_the_disk_of_whoever_led_last(
    node: str, source: str, role: Role
) -> None:
    # b took over and ran alone, then died: a's disk (the spec's primary) is stale,
    # so a may start only as the secondary whose disk the bring-up overwrites.
    got, why = first_role(node, "a", None, None, source=source)
    assert got is role and f"{source} led last" in why


def test_hung_secondary_is_stopped_so_the_primary_hears_of_it() -> None:
    for leader in (Leader("a", 7), None):
        o = dataclasses.replace(SECONDARY_OK, qemu_hung=True, leader=leader)
        d = decide(State.SECONDARY, o, T)
        assert d.state is State.DOWN and d.actions == (Act.FENCE,), d


def test_a_stalled_checkpoint_is_a_lost_secondary() -> None:
    short = dataclasses.replace(PRIMARY_OK, checkpoint_stalled_s=0.3)
    assert decide(State.PRIMARY, short, T).state is State.PRIMARY
    stuck = dataclasses.replace(PRIMARY_OK, checkpoint_stalled_s=1.5, sync=None)
    d = decide(State.PRIMARY, stuck, T)
    assert d.state is State.ALONE and "checkpoint with b stalled for 1.5 s" in d.reason


def test_a_run_alone_policy_drops_the_secondary_after_clearing_sync() -> None:
    o = dataclasses.replace(PRIMARY_OK, give_up="mirror-unacknowledged")
    d = decide(State.PRIMARY, o, T)
    assert d.state is State.PRIMARY and d.actions == (Act.CLEAR_SYNC, Act.RENEW), d
    d = decide(State.PRIMARY, dataclasses.replace(o, sync=None), T)
    assert d.state is State.ALONE and Act.GO_ALONE in d.actions
    assert "mirror-unacknowledged (policy run-alone)" in d.reason
    # A secondary never acts on it: only the leader drops its peer.
    assert decide(State.SECONDARY, dataclasses.replace(SECONDARY_OK, give_up="x"), T).state is (
        State.SECONDARY
    )


# ---------------------------------------------------------------- re-protection

ALONE_OK = dataclasses.replace(
    PRIMARY_OK,
    in_colo=False,
    synced=False,
    sync=None,
    peer_qemu_alive=True,
    peer_state="starting",
    peer_ready=True,
    reprotect=True,
)
FAILED = dataclasses.replace(
    SECONDARY_OK,
    node="b",
    peer="a",
    qemu_alive=False,
    in_colo=False,
    leader=Leader("a", 9),
    peer_state="alone",
    reprotect=True,
)


def test_a_failed_node_rejoins_a_peer_that_leads_alone() -> None:
    for state in (State.FENCED, State.DOWN):
        d = decide(state, FAILED, T)
        assert d.state is State.STARTING and d.actions == (Act.REJOIN,), d
        assert "rejoining as its new secondary" in d.reason
    # Not while its QEMU still runs, not with re-protection off or in backoff, not
    # while the peer has a secondary, not without the arbiter's word.
    for o in (
        dataclasses.replace(FAILED, qemu_alive=True),
        dataclasses.replace(FAILED, reprotect=False),
        dataclasses.replace(FAILED, peer_state="primary"),
        dataclasses.replace(FAILED, leader=Leader("b", 9)),
        dataclasses.replace(FAILED, arbiter_ok=False),
        dataclasses.replace(FAILED, peer_reprotecting=True),
    ):
        assert decide(State.DOWN, o, T).state is State.DOWN, o


def test_a_node_whose_bring_up_failed_starts_over_once_nobody_leads() -> None:
    failed = dataclasses.replace(FAILED, leader=None, peer_state="starting", bring_up_failed=True)
    for state in (State.FENCED, State.DOWN):
        d = decide(state, failed, T)
        assert d.state is State.STARTING and d.actions == (Act.REJOIN,), d
        assert "my bring-up failed and nobody leads" in d.reason
    # Not while someone leads (that one decides), nor in backoff, nor blind, nor when
    # it was not its own bring-up that failed.
    for o in (
        dataclasses.replace(failed, leader=Leader("b", 9), peer_state="starting"),
        dataclasses.replace(failed, reprotect=False),
        dataclasses.replace(failed, arbiter_ok=False),
        dataclasses.replace(failed, bring_up_failed=False),
        dataclasses.replace(failed, qemu_alive=True),
    ):
        assert decide(State.FENCED, o, T).state is State.FENCED, o


def test_a_leader_alone_reprotects_a_ready_peer_and_is_primary_once_in_colo() -> None:
    d = decide(State.ALONE, ALONE_OK, T)
    assert d.state is State.ALONE and d.actions == (Act.REPROTECT, Act.RENEW), d
    for o in (
        dataclasses.replace(ALONE_OK, peer_ready=False),
        dataclasses.replace(ALONE_OK, reprotect=False),
        dataclasses.replace(ALONE_OK, peer_state="down"),
        dataclasses.replace(ALONE_OK, repl_ok=False),
    ):
        assert decide(State.ALONE, o, T).actions == (Act.RENEW,), o
    busy = dataclasses.replace(ALONE_OK, reprotecting=True)
    assert decide(State.ALONE, busy, T).actions == (Act.RENEW,)
    # COLO after a failover's "alone" is never taken for a re-protection's.
    assert (
        decide(State.ALONE, dataclasses.replace(ALONE_OK, in_colo=True, peer_ready=False), T).state
        is State.ALONE
    )
    done = decide(State.ALONE, dataclasses.replace(busy, in_colo=True), T)
    assert done.state is State.PRIMARY and "re-protected" in done.reason
    lost = decide(State.ALONE, dataclasses.replace(busy, peer_qemu_alive=False), T)
    assert lost.state is State.ALONE and Act.ABANDON in lost.actions, lost
    off = decide(State.ALONE, dataclasses.replace(busy, protection_off=True), T)
    assert Act.ABANDON in off.actions and "switched off" in off.reason, off


def test_a_new_secondary_is_not_stopped_as_stale_while_the_leader_brings_it_in() -> None:
    joining = dataclasses.replace(
        SECONDARY_OK, leader=Leader("a", 9), peer_state="alone", peer_reprotecting=True
    )
    assert decide(State.SECONDARY, joining, T).state is State.SECONDARY
    assert decide(State.STARTING, dataclasses.replace(joining, in_colo=False), T).state is (
        State.STARTING
    )
    # The leader gave up on this copy: stop it and start afresh.
    given_up = dataclasses.replace(joining, in_colo=False, peer_reprotecting=False, targeted=True)
    d = decide(State.STARTING, given_up, T)
    assert d.state is State.DOWN and d.actions == (Act.FENCE,), d


def test_first_role_joins_a_peer_alone_only_when_rejoining() -> None:
    role, why = first_role("b", "a", Leader("a", 4), "alone", rejoin=True)
    assert role is Role.SECONDARY and "new secondary" in why


def test_switching_protection_off_drops_the_secondary_like_a_lost_one() -> None:
    off = dataclasses.replace(PRIMARY_OK, protection_off=True)
    d = decide(State.PRIMARY, off, T)
    assert d.actions == (Act.CLEAR_SYNC, Act.RENEW) and "switched off" in d.reason, d
    d = decide(State.PRIMARY, dataclasses.replace(off, sync=None), T)
    assert d.state is State.ALONE and Act.GO_ALONE in d.actions, d


def test_a_guest_that_powers_itself_off_stops_the_pair_without_a_takeover() -> None:
    off = dataclasses.replace(PRIMARY_OK, guest_stopped=True, qemu_alive=False)
    d = decide(State.PRIMARY, off, T)
    # Sync first: the secondary must never take over a switched-off guest.
    assert d.state is State.PRIMARY and d.actions == (Act.CLEAR_SYNC, Act.RENEW), d
    d = decide(State.PRIMARY, dataclasses.replace(off, sync=None), T)
    assert d.state is State.STOPPED and d.actions == (Act.FENCE, Act.RESIGN), d
    blind = dataclasses.replace(off, arbiter_ok=False)
    assert decide(State.PRIMARY, blind, T).state is State.PRIMARY
    # The secondary stops with it (its copy killed if its QEMU is still there).
    follower = dataclasses.replace(SECONDARY_OK, peer_state="stopped")
    d = decide(State.SECONDARY, follower, T)
    assert d.state is State.STOPPED and d.actions == (Act.FENCE,), d
    assert decide(State.DOWN, dataclasses.replace(follower, qemu_alive=False), T).state is (
        State.STOPPED
    )
    assert decide(State.STOPPED, dataclasses.replace(follower, qemu_alive=False), T).actions == ()


def test_the_primary_waits_a_moment_for_its_guest_when_the_secondarys_powered_off() -> None:
    o = dataclasses.replace(PRIMARY_OK, peer_qemu_alive=False, peer_guest_stopped_s=1.0)
    d = decide(State.PRIMARY, o, T)
    assert d.state is State.PRIMARY and Act.GO_ALONE not in d.actions, d
    assert "expecting mine to follow" in d.reason
    late = dataclasses.replace(o, peer_guest_stopped_s=5.0, sync=None)
    assert decide(State.PRIMARY, late, T).state is State.ALONE


SPARE_DUE = dataclasses.replace(
    ALONE_OK,
    peer_qemu_alive=False,
    peer_state=None,
    peer_ready=False,
    spare="c",
    spare_heard=True,
    peer_silent_s=12.0,
    spare_after_s=10.0,
)


def test_a_leader_alone_takes_the_spare_once_its_peer_stayed_silent() -> None:
    d = decide(State.ALONE, SPARE_DUE, T)
    assert d.state is State.ALONE and d.actions == (Act.TAKE_SPARE, Act.RENEW), d
    assert "b silent for 12 s; taking the spare c" in d.reason
    # Not before the wait, not to a spare nobody hears, not with re-protection off
    # or in backoff, not blind, not while re-protecting, not switched off.
    for o in (
        dataclasses.replace(SPARE_DUE, peer_silent_s=9.0),
        dataclasses.replace(SPARE_DUE, peer_silent_s=None),
        dataclasses.replace(SPARE_DUE, spare_heard=False),
        dataclasses.replace(SPARE_DUE, spare=None),
        dataclasses.replace(SPARE_DUE, reprotect=False),
        dataclasses.replace(SPARE_DUE, arbiter_ok=False),
        dataclasses.replace(SPARE_DUE, protection_off=True),
    ):
        assert Act.TAKE_SPARE not in decide(State.ALONE, o, T).actions, o
    busy = decide(State.ALONE, dataclasses.replace(SPARE_DUE, reprotecting=True), T)
    assert Act.TAKE_SPARE not in busy.actions, busy
    # A primary in COLO never drops its secondary for the spare.
    assert Act.TAKE_SPARE not in decide(State.PRIMARY, SPARE_DUE, T).actions


def test_a_leader_alone_takes_the_spare_when_its_heard_peer_keeps_failing_to_start() -> None:
    heard = dataclasses.replace(SPARE_DUE, peer_silent_s=None, peer_state="down")
    failing = dataclasses.replace(heard, peer_failed_starts=SPARE_AFTER_FAILED_STARTS)
    d = decide(State.ALONE, failing, T)
    assert d.state is State.ALONE and d.actions == (Act.TAKE_SPARE, Act.RENEW), d
    assert "b failed its last 2 starts; taking the spare c" in d.reason
    # One failure is not enough; nor is failing with the spare unheard or while the
    # peer is being brought in.
    for o in (
        dataclasses.replace(heard, peer_failed_starts=1),
        dataclasses.replace(failing, spare_heard=False),
        dataclasses.replace(failing, reprotect=False),
    ):
        assert Act.TAKE_SPARE not in decide(State.ALONE, o, T).actions, o
    busy = decide(State.ALONE, dataclasses.replace(failing, reprotecting=True), T)
    assert Act.TAKE_SPARE not in busy.actions, busy


def test_a_node_outside_the_members_stands_by_and_joins_once_taken_in() -> None:
    out = dataclasses.replace(FAILED, node="c", member=False, leader=Leader("a", 9))
    for state in (State.STARTING, State.SECONDARY, State.DOWN, State.FENCED, State.SPARE):
        d = decide(state, out, T)
        assert d.state is State.SPARE and d.actions == (), (state, d)
        assert "spare: standing by" in d.reason
    running = decide(State.SECONDARY, dataclasses.replace(out, qemu_alive=True), T)
    assert running.state is State.SPARE and running.actions == (Act.FENCE,), running
    # Taken in: it rejoins a leader that runs alone, like any failed node.
    taken = dataclasses.replace(out, member=True)
    d = decide(State.SPARE, taken, T)
    assert d.state is State.STARTING and d.actions == (Act.REJOIN,), d
    waiting = decide(State.SPARE, dataclasses.replace(taken, peer_state="primary"), T)
    assert waiting.state is State.SPARE and "waiting for a to bring me in" in waiting.reason
