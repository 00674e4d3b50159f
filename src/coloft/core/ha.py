"""The per-host agent's decision: one pure function per tick, over frozen values.

    observe (own QEMU, peer heartbeats, arbiter) -> Observation
    decide(state, observation, timing) -> Decision(next_state, actions, reason)

Safety rules (Patroni's lease discipline, the issue's split-brain rules):
- a leader acts only while its own lease is valid on its monotonic clock, counted
  from when its last good renewal was *sent*; past that it fences (kills its QEMU);
- a leader that sees another leader, or another epoch, fences at once;
- a secondary takes over only when the leader key is gone, the `sync` record names
  it, and it completed a checkpoint; it acquires first and runs the takeover only
  once it holds the key;
- a primary clears `sync` before it runs alone, and never goes alone while `sync`
  still names the lost peer; losing only the replication path (the peer still
  heard on the LAN), or a checkpoint that stalls past a bound, is a lost
  secondary too: COLO cannot work without it, and the guest waits meanwhile;
  so is a broken comparison path whose policy says run alone;
- with the arbiter unreachable, nobody gains authority;
- an operator's failover hands over only to a sync node in lock-step, unless forced
  (then the secondary may acquire without `sync`, accepting possible data loss);
- FENCED and DOWN never run a guest again: the only QEMU they may start is a fresh
  secondary for a peer that leads alone (re-protection); it waits for the leader's
  copy of disk and memory, and may take over only once `sync` names it after a
  completed checkpoint, like any secondary;
- a guest that powers itself off is no failure: the leader clears sync (so nobody
  takes over a switched-off guest), then stops and resigns; its peer stops too;
- protection switched off by the operator is a secondary dropped on purpose: sync
  cleared, then alone, and no re-protection until it is switched on again;
- a leader that runs alone re-protects only with a peer that is ready as a new
  secondary, abandons the attempt when that peer is lost, and is PRIMARY again only
  once its QEMU is in COLO;
- with a spare node, a leader whose peer stayed silent past `spare_after_s`, or
  failed its last SPARE_AFTER_FAILED_STARTS starts in a row, while the spare's
  agent is heard records itself and the spare as the pair's members
  (clearing sync in the same write) and re-protects with the spare; a node outside
  the members is a SPARE: it runs no QEMU and never takes the lead.

The transition table below is the whole state machine: decide() may only move
along it (checked, like h11's table), and `diagram()` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from coloft.core.health import STALL_LIMIT_S
from coloft.core.lease import LeaseTiming, may_act
from coloft.model.leader import Leader
from coloft.model.steps import Role

# The guests run the same code: when the secondary's powers itself off, the
# primary's follows within moments; past this, the secondary counts as lost.
GUEST_STOP_GRACE_S = 3.0
# A member that failed this many starts in a row (its disk gone, its QEMU refused) is
# replaced by the spare even though its agent is heard: one failure may be bad luck.
SPARE_AFTER_FAILED_STARTS = 2


class State(Enum):
    STARTING = "starting"
    PRIMARY = "primary"
    SECONDARY = "secondary"
    ALONE = "alone"
    FENCED = "fenced"
    DOWN = "down"
    # The guest powered itself off: nothing runs, nothing takes over.
    STOPPED = "stopped"
    # Not one of the pair's two members: stands by to replace a lost one.
    SPARE = "spare"


class Intent(Enum):
    FAILOVER = "failover"
    FORCE_FAILOVER = "force-failover"


class Act(Enum):
    RENEW = "renew"
    ACQUIRE = "acquire"
    RESIGN = "resign"
    SET_SYNC = "set-sync"
    CLEAR_SYNC = "clear-sync"
    FENCE = "fence"
    TAKEOVER = "takeover"
    GO_ALONE = "go-alone"
    REJOIN = "rejoin"
    REPROTECT = "reprotect"
    ABANDON = "abandon-reprotect"
    TAKE_SPARE = "take-spare"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset(
        {
            State.STARTING,
            State.PRIMARY,
            State.SECONDARY,
            State.FENCED,
            State.DOWN,
            State.STOPPED,
            State.SPARE,
        }
    ),
    State.PRIMARY: frozenset({State.PRIMARY, State.ALONE, State.FENCED, State.STOPPED}),
    State.SECONDARY: frozenset(
        {State.SECONDARY, State.ALONE, State.DOWN, State.STOPPED, State.SPARE}
    ),
    State.ALONE: frozenset({State.ALONE, State.PRIMARY, State.FENCED, State.STOPPED}),
    State.FENCED: frozenset({State.FENCED, State.STARTING, State.STOPPED, State.SPARE}),
    State.DOWN: frozenset({State.DOWN, State.STARTING, State.STOPPED, State.SPARE}),
    State.STOPPED: frozenset({State.STOPPED}),
    State.SPARE: frozenset({State.SPARE, State.STARTING, State.STOPPED}),
}


@dataclass(frozen=True)
class Observation:
    node: str
    peer: str
    now: float
    qemu_role: Role | None  # what this node's QEMU was brought up as
    qemu_alive: bool
    qemu_hung: bool
    in_colo: bool
    synced: bool  # the secondary completed a checkpoint since COLO started
    peer_qemu_alive: bool  # from the peer's heartbeats (False once they stop)
    arbiter_ok: bool
    leader: Leader | None
    sync: str | None
    my_epoch: int | None
    renew_sent_at: float | None
    # Heartbeats still arrive over the replication network (COLO's own path).
    repl_ok: bool = True
    # How long my QEMU has been stopped inside a checkpoint (None while it runs).
    checkpoint_stalled_s: float | None = None
    peer_state: str | None = None
    intent: Intent | None = None
    # A policy (core.policy) says drop the secondary; the text says why.
    give_up: str | None = None
    # Re-protection (core.reprotect): wanted (the operator's switch, else the spec),
    # and its backoff lets me try now.
    reprotect: bool = False
    # The operator switched protection off (`coloft unprotect`): run alone, stay alone.
    protection_off: bool = False
    # The peer's secondary QEMU is up with its side of COLO in place.
    peer_ready: bool = False
    # A leader: I am bringing the peer into COLO. A follower: the leader says it is
    # bringing me in (peer_reprotecting), and it did start on this QEMU (targeted).
    reprotecting: bool = False
    peer_reprotecting: bool = False
    targeted: bool = False
    # My guest powered itself off (QEMU's SHUTDOWN event from the guest, or a clean
    # exit: coloft never asks a running QEMU to quit).
    guest_stopped: bool = False
    # How long ago the peer's guest powered itself off (None: it did not).
    peer_guest_stopped_s: float | None = None
    # My last bring-up (or rejoin) failed before reaching COLO.
    bring_up_failed: bool = False
    # A spare node: whether I am one of the pair's two members now, the spare a
    # leader may take (None: the spec names none, or it is my peer already), whether
    # its agent is heard, how long my peer has been silent on every path (None while
    # heard), after how long a silent peer is replaced, and how many of its starts in
    # a row failed (as its heartbeats say).
    member: bool = True
    spare: str | None = None
    spare_heard: bool = False
    peer_silent_s: float | None = None
    spare_after_s: float | None = None
    peer_failed_starts: int = 0


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Act, ...]
    reason: str


class IllegalTransition(Exception):
    pass


def _holds(o: Observation) -> bool:
    return o.my_epoch is not None and o.leader == Leader(o.node, o.my_epoch)


def _guest_stopped(state: State, o: Observation) -> Decision:
    """The leader's guest shut itself down: the secondary must not take over a guest
    that is switched off, so sync goes first; only then is leadership given up."""
    if not o.arbiter_ok:
        return Decision(
            state,
            (Act.RENEW,),
            "the guest shut itself down; arbiter unreachable, cannot clear sync",
        )
    if o.sync is not None:
        return Decision(
            state, (Act.CLEAR_SYNC, Act.RENEW), "the guest shut itself down; clearing sync"
        )
    return Decision(
        State.STOPPED,
        (Act.FENCE, Act.RESIGN),
        "the guest shut itself down: the pair is stopped (nothing to take over)",
    )


def _leading(state: State, o: Observation, t: LeaseTiming) -> Decision:
    if o.arbiter_ok and not _holds(o):
        holder = f"{o.leader.node} (epoch {o.leader.epoch})" if o.leader else "nobody"
        return Decision(
            State.FENCED,
            (Act.FENCE,),
            f"leadership lost (leader is {holder}, mine was epoch {o.my_epoch}); fencing",
        )
    if not may_act(o.now, o.renew_sent_at, t):
        return Decision(
            State.FENCED,
            (Act.FENCE,),
            "lease not renewed in time; fencing before it can expire elsewhere",
        )
    if o.guest_stopped:
        return _guest_stopped(state, o)
    if not o.qemu_alive or o.qemu_hung:
        what = "hung" if o.qemu_alive else "died"
        return Decision(
            State.FENCED,
            (Act.FENCE, Act.RESIGN),
            f"my QEMU {what}; resigning so the secondary can take over now",
        )
    if o.intent is not None:
        return _handing_over(state, o)
    if state is State.ALONE:
        return _alone(o)
    follow = o.peer_guest_stopped_s is not None and o.peer_guest_stopped_s < GUEST_STOP_GRACE_S
    if state is State.PRIMARY and follow:
        acts = (Act.CLEAR_SYNC, Act.RENEW) if o.sync is not None and o.arbiter_ok else (Act.RENEW,)
        return Decision(
            state, acts, f"the guest shut itself down on {o.peer}; expecting mine to follow"
        )
    stalled = o.checkpoint_stalled_s is not None and o.checkpoint_stalled_s > STALL_LIMIT_S
    lost_peer = (
        not o.peer_qemu_alive
        or not o.repl_ok
        or stalled
        or o.give_up is not None
        or o.protection_off
    )
    if state is State.PRIMARY and lost_peer:
        if not o.peer_qemu_alive:
            lost = f"secondary {o.peer} lost"
        elif not o.repl_ok:
            lost = f"replication link to {o.peer} lost (LAN heartbeats still arrive)"
        elif stalled:
            lost = f"checkpoint with {o.peer} stalled for {o.checkpoint_stalled_s:.1f} s"
        elif o.give_up is not None:
            lost = f"{o.give_up} (policy run-alone)"
        else:
            lost = f"protection switched off by the operator; dropping {o.peer}"
        # Only the arbiter's word that sync is gone counts: unreachable means unknown.
        if not o.arbiter_ok:
            return Decision(
                State.PRIMARY, (Act.RENEW,), f"{lost}, arbiter unreachable; cannot clear sync"
            )
        if o.sync is not None:
            return Decision(
                State.PRIMARY,
                (Act.CLEAR_SYNC, Act.RENEW),
                f"{lost}; clearing sync before running alone",
            )
        return Decision(State.ALONE, (Act.GO_ALONE, Act.RENEW), f"{lost}; running alone")
    if state is State.PRIMARY and o.in_colo and o.synced and o.sync != o.peer:
        return Decision(
            State.PRIMARY,
            (Act.SET_SYNC, Act.RENEW),
            f"{o.peer} completed a checkpoint; naming it the sync node",
        )
    return Decision(state, (Act.RENEW,), f"leader (epoch {o.my_epoch}), in COLO")


def _alone(o: Observation) -> Decision:
    """A leader without a secondary: re-protect with a peer that is ready for it."""
    peer_lost = not o.peer_qemu_alive or not o.repl_ok
    if o.reprotecting and o.in_colo:
        return Decision(
            State.PRIMARY, (Act.RENEW,), f"re-protected: {o.peer} is my secondary again, in COLO"
        )
    if o.reprotecting and (peer_lost or o.protection_off):
        why = "protection switched off" if o.protection_off else f"new secondary {o.peer} lost"
        return Decision(
            State.ALONE,
            (Act.ABANDON, Act.RENEW),
            f"{why} during re-protection; abandoning it, running alone",
        )
    if o.reprotecting:
        return Decision(State.ALONE, (Act.RENEW,), f"re-protecting: bringing {o.peer} into COLO")
    due = spare_due(o)
    if due is not None:
        return Decision(
            State.ALONE,
            (Act.TAKE_SPARE, Act.RENEW),
            f"{o.peer} {due}; taking the spare {o.spare} as my new secondary",
        )
    ready = o.peer_ready and o.peer_state == State.STARTING.value and not peer_lost
    if ready and o.reprotect and o.arbiter_ok:
        return Decision(
            State.ALONE,
            (Act.REPROTECT, Act.RENEW),
            f"{o.peer} is ready as a new secondary; re-protecting",
        )
    return Decision(State.ALONE, (Act.RENEW,), f"leader (epoch {o.my_epoch}), alone")


def spare_due(o: Observation) -> str | None:
    """Why the peer is replaced by the spare now, or None."""
    if o.spare is None or not o.spare_heard or o.spare_after_s is None:
        return None
    if not o.reprotect or not o.arbiter_ok or o.protection_off:
        return None
    silent = o.peer_silent_s
    if silent is not None and silent >= o.spare_after_s:
        return f"silent for {silent:.0f} s"
    # Heard, but unable to serve as a secondary: no use waiting for it to go quiet.
    if silent is None and o.peer_failed_starts >= SPARE_AFTER_FAILED_STARTS:
        return f"failed its last {o.peer_failed_starts} starts"
    return None


def _standing_by(o: Observation) -> Decision:
    """A node outside the pair's members: nothing of the guest runs here."""
    who = f"{o.leader.node} leads the pair" if o.leader else "nobody leads the pair now"
    return Decision(
        State.SPARE, (Act.FENCE,) if o.qemu_alive else (), f"spare: standing by ({who})"
    )


def _handing_over(state: State, o: Observation) -> Decision:
    """An operator asked the leader to hand over to its secondary."""
    if state is State.ALONE:
        return Decision(state, (Act.RENEW,), "failover refused: no secondary to hand over to")
    if o.intent is Intent.FORCE_FAILOVER:
        return Decision(
            State.FENCED,
            (Act.CLEAR_SYNC, Act.FENCE, Act.RESIGN),
            f"forced failover to {o.peer}: stopping here, possible data loss acknowledged",
        )
    if o.sync != o.peer or not o.peer_qemu_alive or not o.repl_ok:
        return Decision(
            state,
            (Act.RENEW,),
            f"failover refused: {o.peer} is not in sync (sync={o.sync}); use --force",
        )
    return Decision(
        State.FENCED, (Act.FENCE, Act.RESIGN), f"planned failover: handing over to {o.peer}"
    )


def _peer_stopped(o: Observation) -> Decision | None:
    if o.peer_state != State.STOPPED.value:
        return None
    return Decision(
        State.STOPPED,
        (Act.FENCE,) if o.qemu_alive else (),
        f"the guest shut itself down on {o.peer}: the pair is stopped",
    )


def _following(o: Observation, t: LeaseTiming) -> Decision:
    stopped = _peer_stopped(o)
    if stopped is not None and not _holds(o):
        return stopped
    if not o.qemu_alive:
        return Decision(State.DOWN, (), "my secondary QEMU died; waiting for re-protection")
    if o.qemu_hung and not _holds(o):
        # A stopped secondary stalls every checkpoint of the primary: end it, so the
        # primary hears at once that it must run alone.
        return Decision(State.DOWN, (Act.FENCE,), "my secondary QEMU hung; stopping it")
    if _peer_alone(o) and not o.peer_reprotecting:
        assert o.leader is not None
        return Decision(
            State.DOWN,
            (Act.FENCE,),
            f"{o.peer} runs alone (epoch {o.leader.epoch}); my copy is stale, stopping it",
        )
    if _holds(o) and may_act(o.now, o.renew_sent_at, t):
        assert o.leader is not None
        return Decision(
            State.ALONE,
            (Act.TAKEOVER, Act.RENEW),
            f"holding leadership (epoch {o.leader.epoch}); taking over",
        )
    if not o.arbiter_ok:
        return Decision(State.SECONDARY, (), "arbiter unreachable; never acting without it")
    if o.leader is not None:
        return Decision(State.SECONDARY, (), f"following {o.leader.node} (epoch {o.leader.epoch})")
    if o.sync == o.node and o.synced and not o.qemu_hung:
        return Decision(
            State.SECONDARY,
            (Act.ACQUIRE,),
            "leader gone and I am the sync node; acquiring leadership",
        )
    if o.intent is Intent.FORCE_FAILOVER and not o.qemu_hung:
        return Decision(
            State.SECONDARY,
            (Act.ACQUIRE,),
            "leader gone; forced failover: acquiring without sync (possible data loss)",
        )
    return Decision(
        State.SECONDARY,
        (),
        f"leader gone but I may not take over (sync={o.sync}, checkpoint completed={o.synced})",
    )


def _starting(o: Observation, t: LeaseTiming) -> Decision:
    if o.my_epoch is None and (stopped := _peer_stopped(o)) is not None:
        return stopped
    if o.my_epoch is not None:
        # The designated primary leads (holds the lease) from before its QEMU starts.
        if o.arbiter_ok and not _holds(o):
            return Decision(State.FENCED, (Act.FENCE,), "leadership lost during bring-up")
        if not may_act(o.now, o.renew_sent_at, t):
            return Decision(State.FENCED, (Act.FENCE,), "lease not renewed during bring-up")
        if o.qemu_role is not None and (not o.qemu_alive or o.qemu_hung):
            return Decision(State.FENCED, (Act.FENCE, Act.RESIGN), "my QEMU failed during bring-up")
        if o.qemu_role is Role.PRIMARY and o.in_colo:
            return Decision(State.PRIMARY, (Act.RENEW,), "bring-up done; primary in COLO")
        return Decision(State.STARTING, (Act.RENEW,), "bringing up as primary")
    if o.qemu_role is Role.SECONDARY:
        if not o.qemu_alive or o.qemu_hung:
            return Decision(State.DOWN, (Act.FENCE,), "my secondary QEMU failed during bring-up")
        if o.targeted and _peer_alone(o) and not o.peer_reprotecting:
            return Decision(
                State.DOWN,
                (Act.FENCE,),
                f"{o.peer} abandoned re-protecting me; stopping this copy to start afresh",
            )
        if o.in_colo:
            return Decision(State.SECONDARY, (), "bring-up done; secondary in COLO")
        return Decision(State.STARTING, (), "bringing up as secondary")
    return Decision(State.STARTING, (), "bringing up")


def _peer_alone(o: Observation) -> bool:
    return o.leader is not None and o.leader.node == o.peer and o.peer_state == State.ALONE.value


def _rejoin(state: State, o: Observation) -> Decision | None:
    """A failed node starts over: as the new secondary of a peer that leads alone, or,
    when its own bring-up failed and nobody leads, as a restarted agent would (from
    the source's disk: first_role)."""
    if not (o.reprotect and o.arbiter_ok) or o.peer_reprotecting:
        return None
    if _peer_alone(o):
        assert o.leader is not None
        return Decision(
            State.STARTING,
            (Act.REJOIN,),
            f"{o.peer} leads alone (epoch {o.leader.epoch}); rejoining as its new secondary "
            f"(was {state.value}: my old copy is discarded)",
        )
    if o.bring_up_failed and o.leader is None:
        return Decision(
            State.STARTING,
            (Act.REJOIN,),
            f"my bring-up failed and nobody leads; starting over (was {state.value})",
        )
    return None


def first_role(
    node: str,
    designated_primary: str,
    leader: Leader | None,
    peer_state: str | None,
    rejoin: bool = False,
    source: str | None = None,
) -> tuple[Role | None, str]:
    """What an agent that just started runs as, from who leads the pair now.

    Its QEMU died with its previous incarnation (if any). A pair nobody leads is
    brought up from its source's disk (the node that led last: only that disk holds
    every acknowledged write), or as the spec says if it never ran; the other node
    starts as the secondary, whose disk the bring-up overwrites. A peer that leads
    and is still bringing the pair up is joined as its secondary, and so is a peer
    that leads alone when re-protection is on (`rejoin`); a node that finds the
    pair led otherwise (by itself before a restart, or by a peer that has a
    secondary) has nothing to offer until the leader runs alone.
    """
    if leader is None:
        primary = source or designated_primary
        role = Role.PRIMARY if node == primary else Role.SECONDARY
        if source is None:
            return role, f"nobody leads; starting as {role.value} as the spec says"
        return role, (
            f"nobody leads; {source} led last and its disk is the current copy: "
            f"starting as {role.value}"
        )
    if leader.node == node:
        return None, f"I led (epoch {leader.epoch}) before a restart; my QEMU is gone: resigning"
    if peer_state == State.STARTING.value:
        return Role.SECONDARY, (
            f"{leader.node} is bringing the pair up (epoch {leader.epoch}); joining as secondary"
        )
    if rejoin and peer_state == State.ALONE.value:
        return Role.SECONDARY, (
            f"{leader.node} leads alone (epoch {leader.epoch}); joining as its new secondary"
        )
    return None, f"{leader.node} leads (epoch {leader.epoch}); waiting for re-protection"


def decide(state: State, o: Observation, timing: LeaseTiming) -> Decision:
    if not o.member and state not in (State.PRIMARY, State.ALONE, State.STOPPED):
        # Only a leader writes the members, itself among them: a leader is always one.
        d = _standing_by(o)
    elif state in (State.FENCED, State.DOWN, State.SPARE):
        # A terminal node never lets a QEMU run, whatever started it meanwhile.
        if (stopped := _peer_stopped(o)) is not None:
            d = stopped
        elif o.qemu_alive:
            d = Decision(state, (Act.FENCE,), f"{state.value}: stopping a QEMU that still runs")
        else:
            waiting = (
                f"spare taken into the pair; waiting for {o.peer} to bring me in"
                if state is State.SPARE
                else f"{state.value}; needs re-protection"
            )
            d = _rejoin(state, o) or Decision(state, (), waiting)
    elif state is State.STOPPED:
        d = (
            Decision(state, (Act.FENCE,), "stopped: stopping a QEMU that still runs")
            if o.qemu_alive
            else Decision(state, (), "stopped: the guest shut itself down")
        )
    elif state is State.STARTING:
        d = _starting(o, timing)
    elif state in (State.PRIMARY, State.ALONE):
        d = _leading(state, o, timing)
    else:
        d = _following(o, timing)
    if d.state not in TRANSITIONS[state]:
        raise IllegalTransition(f"{state.value} -> {d.state.value}: {d.reason}")
    return d


def diagram() -> str:
    """The state machine as text, generated from TRANSITIONS."""
    return "\n".join(
        f"{s.value:>9} -> " + ", ".join(sorted(n.value for n in nxt if n is not s))
        for s, nxt in TRANSITIONS.items()
    )
