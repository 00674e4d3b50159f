"""Never claim protection we do not have: one broken link of the comparison path.

With the mirror or the compare-in channel silently dropped or reset, every QMP
status keeps saying "colo" and checkpoints keep coming; only the active probe
through colo-compare (and the channel's sockets, which name it) tell. The pair
must say DEGRADED, naming the channel, within a second, apply its policy, and be
PROTECTED again after the fault is lifted. A dropped checkpoint stream or a
frozen secondary leaves COLO unable to go on: the primary runs alone, and once the
fault is lifted the secondary's host is re-protected.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coloft.agent import api
from coloft.agent.launch import LocalPair
from coloft.core import ports
from coloft.effects.process import netns_argv
from coloft.errors import ColoftError
from coloft.lab import faults, net, workload
from coloft.lab.rounds import PathWatch, all_events, up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The bound, plus the test's own polling of both agents.
DETECT_WITHIN_S = 1.0 + 0.1


def says_protected(sock: Path) -> bool:
    try:
        return bool(api.call(sock, "GET", "/protected")["protected"])
    except ColoftError:
        return False


@pytest.mark.parametrize(
    "fault", ["drop-mirror", "reset-mirror", "drop-compare", "reset-compare", "cut-compare"]
)
def test_broken_channel_is_degraded_within_a_second_and_named(
    make_pair: Callable[[PairSpec], LocalPair], tmp_path: Path, fault: str
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, 25, rate=20)
    try:
        end = time.monotonic() + 20
        view = pair_view("demo", pair.statuses())
        while not view["protected"] and time.monotonic() < end:
            time.sleep(0.2)
            view = pair_view("demo", pair.statuses())
        assert view["protected"], f"not protected before the fault: {view['reason']}"
        protected = api.socket_path(pair.spec, "a")
        assert api.call(protected, "GET", "/protected")["protected"] is True
        channel = faults.PATH_FAULTS[fault][0]
        fault_at = faults.inject(pair, fault)
        degraded_after = named_after = None
        # The probe says DEGRADED first; the channel's sockets name it once its
        # first retransmission shows (the reason fills in, the state stays).
        while time.time() - fault_at < 5.0 and named_after is None:
            view = pair_view("demo", pair.statuses())
            if not view["protected"]:
                degraded_after = degraded_after or time.time() - fault_at
                if channel in view["reason"]:
                    named_after = time.time() - fault_at
            time.sleep(0.02)
        # What makes the failure silent: QEMU still reports COLO on both sides.
        modes = {n["node"]: n["colo_mode"] for n in view["nodes"]}
        assert modes == {"a": "primary", "b": "secondary"}, modes
        assert degraded_after is not None, f"never degraded: {view['reason']}"
        assert view["phase"] == "degraded", view
        assert named_after is not None, view["reason"]
        assert degraded_after < DETECT_WITHIN_S, f"degraded after {degraded_after:.2f} s"
        assert named_after < DETECT_WITHIN_S, f"{channel} named after {named_after:.2f} s"
        with pytest.raises(ColoftError, match="503"):
            api.call(protected, "GET", "/protected")
        # It stays degraded while the fault lasts (no flapping back to PROTECTED).
        for _ in range(10):
            time.sleep(0.2)
            assert not pair_view("demo", pair.statuses())["protected"]
        faults.heal(pair)
        healed = time.time()
        views = pair.wait_for(
            lambda s: pair_view("demo", s)["protected"], 30, "protection after the fault"
        )
        assert "probe" in pair_view("demo", views)["reason"]
        watch = PathWatch(fault_at)
        watch.healed_at = healed
        found = watch.summary(all_events(pair.statuses()))
        assert channel in str(found["reason"]), found
        assert found["policy"] == "re-establish", found
        assert found["policy_applied_ms"] is not None and found["policy_applied_ms"] < 2000, found
        assert found["protected_again_ms"] is not None, found
        if fault.startswith("reset-"):
            # The half-open end was yanked and the secondary reconnected.
            assert str(found["reason"]).endswith("-disconnected"), found
            yanks = [
                e
                for e in all_events(pair.statuses())
                if e["kind"] == "policy" and "yanked" in e["text"] and e["unix"] >= fault_at
            ]
            assert yanks, "no end was yanked"
        # The API agrees. Not asked once: a reconnected channel may drop again
        # (QEMU's reconnect), which the pair must say and mend as well.
        pair.wait_for(lambda _: says_protected(protected), 30, "GET /protected saying 200")
    finally:
        client.kill()
        client.wait()


@pytest.mark.parametrize(
    ("fault", "reasons"),
    [
        # A checkpoint under way when the link went silent stalls before any segment
        # of it has been retransmitted twice: either signal may come first.
        (
            "drop-replication",
            ("migration-unacknowledged", "nbd-unacknowledged", "checkpoint-stalled"),
        ),
        ("freeze-secondary", ("secondary-stalled",)),
    ],
)
def test_a_link_colo_cannot_do_without_makes_the_primary_run_alone(
    make_pair: Callable[[PairSpec], LocalPair], tmp_path: Path, fault: str, reasons: tuple[str]
) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    target = "192.0.2.10:7000"
    client = workload.start_workload(net.CLIENT_NS, target, tmp_path, 20, rate=20)
    try:
        pair.wait_for(lambda s: pair_view("demo", s)["protected"], 20, "protection")
        time.sleep(3)
        fault_at = faults.inject(pair, fault)

        def alone(s: dict[str, Any]) -> bool:
            a = s.get("a") or {}
            done = (a.get("failover") or {}).get("done_unix")
            return bool(a.get("state") == "alone" and done)

        # Alone, and the failover's steps done: its policy event says "applied".
        views = pair.wait_for(alone, 15, "the primary alone")
        view = pair_view("demo", views)
        assert view["phase"] == "unprotected" and view["code"] == "running-alone", view
        # A frozen secondary is killed by its own agent: nothing to lift.
        watch = PathWatch(fault_at, lifted=fault == "drop-replication")
        found = watch.summary(all_events(views))
        assert found["reason"] in reasons, found
        assert found["policy"] == "run-alone", found
        # Bound: the next checkpoint request (interval 2 s) or disk write, then two
        # retransmissions; a frozen secondary: the probe, then its agent's verdict.
        assert found["degraded_after_ms"] is not None and found["degraded_after_ms"] < 3000, found
        assert found["policy_applied_ms"] is not None and found["policy_applied_ms"] < 5000, found
        # The secondary's copy is stale now: its agent stopped it.
        b = views["b"]
        assert b is not None
        stopped = ("my copy is stale, stopping it", "my secondary QEMU hung; stopping it")
        assert any(w in e["text"] for e in b["events"] for w in stopped), b["events"]
        if fault == "drop-replication":
            # Still cut off: no re-protection can have begun, and /protected says so. (A
            # frozen secondary is killed and rejoins at once: the pair may be PROTECTED
            # again by now.)
            with pytest.raises(ColoftError, match="503"):
                api.call(api.socket_path(pair.spec, "a"), "GET", "/protected")
        watch.healed_at = time.time()
        faults.heal(pair)
        # Re-protection: b comes back as a fresh secondary, a copies disk and memory
        # (after the lift when the link was cut; at once for a frozen secondary, which
        # its agent killed).
        views = pair.wait_for(lambda s: pair_view("demo", s)["protected"], 60, "re-protection")
        again = watch.summary(all_events(views))["protected_again_ms"]
        assert again is not None, all_events(views)
        a = views["a"]
        assert a is not None
        assert a["reprotect"]["error"] is None, a["reprotect"]
        assert (a["state"], a["sync"]) == ("primary", "b"), a
        client.wait(60)
        checked = workload.verify(net.CLIENT_NS, target, tmp_path / "acked.jsonl")
        assert checked["lost_acked_writes"] == 0 and checked["wrong_values"] == 0, checked
        assert workload.read_result(tmp_path)["requests_failed"] == 0
    finally:
        faults.heal(pair)
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize(
    ("offset", "direction", "channel"),
    [(ports.MIRROR, "out", "mirror"), (ports.COMPARE_SECONDARY_IN, "in", "compare-in")],
)
def test_a_channel_dropped_one_way_is_degraded_and_named(
    make_pair: Callable[[PairSpec], LocalPair],
    tmp_path: Path,
    offset: int,
    direction: str,
    channel: str,
) -> None:
    # Only the data direction is dropped: acknowledgements still flow back.
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    client = workload.start_workload(net.CLIENT_NS, "192.0.2.10:7000", tmp_path, 20, rate=20)
    try:
        pair.wait_for(lambda s: pair_view("demo", s)["protected"], 20, "protection")
        primary = pair.spec.primary
        assert primary.netns is not None
        fault_at = time.time()
        net.break_channel(primary.netns, "repl", [ports.port(primary, offset)], "drop", direction)
        views = pair.wait_for(
            lambda s: pair_view("demo", s)["code"] == f"{channel}-unacknowledged",
            5,
            f"{channel} named",
        )
        named_after = time.time() - fault_at
        assert named_after < DETECT_WITHIN_S, f"named after {named_after:.2f} s"
        assert pair_view("demo", views)["phase"] == "degraded"
        faults.heal(pair)
        pair.wait_for(lambda s: pair_view("demo", s)["protected"], 30, "protection after")
    finally:
        faults.heal(pair)
        client.kill()
        client.wait()


def test_a_full_compare_queue_is_named_and_clears(
    make_pair: Callable[[PairSpec], LocalPair],
) -> None:
    """A burst of echo requests (64 at once) fills colo-compare's queue of the
    shortest length QEMU's spec allows here (16): packets are dropped, which only
    QEMU's trace tells; the pair says so, then is PROTECTED again after the burst."""
    pair = make_pair(lab_spec(interval_ms=2000, max_queue_size=16))
    asyncio.run(up_and_serving(pair))
    pair.wait_for(lambda s: pair_view("demo", s)["protected"], 20, "protection")
    ping = ["ping", "-q", "-n", "-i", "0.05", "-l", "64", "-c", "400", "192.0.2.10"]
    flood = subprocess.Popen(
        netns_argv(net.CLIENT_NS, ping),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        views = pair.wait_for(
            lambda s: pair_view("demo", s)["code"] == "compare-queue-overflow",
            20,
            "the queue overflow named",
        )
        a = views["a"]
        assert a is not None
        assert a["compare"]["dropped_packets"] > 0, a["compare"]
        assert pair_view("demo", views)["phase"] == "degraded"
    finally:
        flood.kill()
        flood.wait()
    pair.wait_for(lambda s: pair_view("demo", s)["protected"], 30, "protection after the burst")
