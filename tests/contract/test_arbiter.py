"""One arbiter contract, run against every backend.

The decision core is unit-tested against MemoryArbiter; that is only sound if
the memory backend behaves like the real one. So every behaviour below runs on
both, the etcd side on a real etcd-server on unusual ports, and once more with its
reads and keep-alives going through a SharedLink, as an agent's pairs send them.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aetcd  # type: ignore[import-untyped]
import pytest

from coloft.arbiter import Arbiter, ArbiterUnavailable, Leader, PairRecord
from coloft.arbiter.base import leader_key
from coloft.arbiter.embedded import ETCD_BINARY, EtcdProcess, start_etcd
from coloft.arbiter.etcd import EtcdArbiter, SharedLink
from coloft.arbiter.memory import MemoryArbiter

CLIENT_URL = "http://127.0.0.1:23791"
PEER_URL = "http://127.0.0.1:23801"
TTL_S = 2.0  # etcd 3.4's minimum lease TTL; shorter would be rounded up
DEADLINE_S = 0.5
# How far past its deadline a failing call may return: scheduling, not waiting.
SLACK_S = 0.4
_pairs = itertools.count()


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class EtcdServer:
    """The session's etcd; restartable on the same data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: EtcdProcess | None = None

    def start(self) -> EtcdProcess:
        self.proc = start_etcd(self.data_dir, CLIENT_URL, PEER_URL, name="coloft-contract")
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def endpoint(self) -> str:
        assert self.proc is not None, "etcd was never started"
        return self.proc.endpoint


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    if not ETCD_BINARY.exists():
        pytest.fail(
            f"{ETCD_BINARY} is missing: the etcd contract tests need a real etcd "
            "(apt-get install -y etcd-server, listed in scripts/apt-packages.txt)"
        )
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Harness(Protocol):
    def make(self) -> Arbiter: ...

    async def pass_time(self, seconds: float) -> None: ...

    def unreachable(self) -> list[Arbiter]: ...


@dataclass
class MemoryHarness:
    clock: FakeClock = field(default_factory=FakeClock)
    shared: MemoryArbiter | None = None

    def make(self) -> Arbiter:
        # Every "client" of the memory backend sees the same state, like etcd.
        if self.shared is None:
            self.shared = MemoryArbiter(clock=self.clock)
        return self.shared

    async def pass_time(self, seconds: float) -> None:
        self.clock.now += seconds

    def unreachable(self) -> list[Arbiter]:
        down = MemoryArbiter(clock=self.clock)
        down.available = False
        return [down]


class SharingArbiter(EtcdArbiter):
    """An etcd arbiter reading and renewing through a SharedLink of its own, closed with it."""

    def __init__(self, endpoints: list[str]) -> None:
        self.shared = SharedLink(endpoints, DEADLINE_S)
        super().__init__(endpoints, deadline_s=DEADLINE_S, link=self.shared)

    async def close(self) -> None:
        await super().close()
        await self.shared.close()


@dataclass
class EtcdHarness:
    server: EtcdServer
    silent_port: int
    shared_reads: bool = False

    def _arbiter(self, endpoint: str) -> EtcdArbiter:
        if self.shared_reads:
            return SharingArbiter([endpoint])
        return EtcdArbiter([endpoint], deadline_s=DEADLINE_S)

    def make(self) -> Arbiter:
        return self._arbiter(self.server.endpoint)

    async def pass_time(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def unreachable(self) -> list[Arbiter]:
        # A closed port (refused at once) and a listener that never speaks:
        # the second is what a hung etcd looks like to the client.
        return [
            self._arbiter(f"127.0.0.1:{_closed_port()}"),
            self._arbiter(f"127.0.0.1:{self.silent_port}"),
        ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def silent_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # the kernel completes handshakes; nobody ever answers
        yield int(s.getsockname()[1])


@pytest.fixture(params=["memory", "etcd", "etcd-shared-reads"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return MemoryHarness()
    server: EtcdServer = request.getfixturevalue("etcd_server")
    shared = request.param == "etcd-shared-reads"
    return EtcdHarness(server, request.getfixturevalue("silent_port"), shared)


@pytest.fixture
def pair() -> str:
    # Tests share one etcd: a fresh pair name keeps them from seeing each other.
    return f"pair{next(_pairs)}-{time.monotonic_ns()}"


def run(h: Harness, scenario: Callable[[Arbiter], Awaitable[None]]) -> None:
    async def main() -> None:
        arb = h.make()
        try:
            await scenario(arb)
        finally:
            await arb.close()

    asyncio.run(main())


def must_lead(got: Leader | None, node: str) -> Leader:
    assert got is not None, f"{node} should have become leader, acquire returned None"
    assert got.node == node, f"acquire returned {got}, expected leader {node}"
    return got


def test_acquire_when_free(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        assert await arb.leader(pair) is None, "a fresh pair must have no leader"
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert won.epoch > 0
        assert await arb.leader(pair) == won, "leader() must report what acquire granted"

    run(harness, scenario)


def test_other_node_cannot_acquire_while_lease_lives(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.acquire(pair, "b", TTL_S) is None, "b took over a live lease"
        again = await arb.acquire(pair, "a", TTL_S)
        assert again == won, f"re-acquire by the holder must return its leadership, got {again}"
        assert await arb.leader(pair) == won

    run(harness, scenario)


def test_epochs_strictly_increase_across_leaders(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        epochs = []
        for node in ["a", "b", "a", "b"]:
            won = must_lead(await arb.acquire(pair, node, TTL_S), node)
            epochs.append(won.epoch)
            await arb.resign(pair, node, won.epoch)
            assert await arb.leader(pair) is None, f"{node} resigned but still leads"
        assert epochs == sorted(set(epochs)), f"epochs not strictly increasing: {epochs}"

    run(harness, scenario)


def test_renew_keeps_leadership_past_ttl(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        for _ in range(3):  # 3 s in all, well past the 2 s TTL
            await harness.pass_time(TTL_S / 2)
            assert await arb.renew(pair, "a", won.epoch), "renew of a live lease failed"
        assert await arb.leader(pair) == won, "renewed leadership was lost"
        assert await arb.acquire(pair, "b", TTL_S) is None

    run(harness, scenario)


def test_lease_expires_without_renew_and_other_node_takes_over(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        old = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        # etcd checks for expired leases every 500 ms, so allow a second over.
        await harness.pass_time(TTL_S + 1.0)
        assert await arb.leader(pair) is None, "leader key outlived its lease"
        assert not await arb.renew(pair, "a", old.epoch), "renew revived an expired lease"
        new = must_lead(await arb.acquire(pair, "b", TTL_S), "b")
        assert new.epoch > old.epoch, f"epoch went from {old.epoch} to {new.epoch}"
        assert not await arb.renew(pair, "a", old.epoch), "old epoch renewed b's lease"
        assert not await arb.renew(pair, "a", new.epoch), "a renewed b's leadership"
        assert await arb.renew(pair, "b", new.epoch)

    run(harness, scenario)


def test_sync_writes_need_the_current_epoch(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        assert not await arb.set_sync(pair, "b", 1), "set_sync without any leader succeeded"
        assert (await arb.record(pair)).sync is None
        old = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.set_sync(pair, "b", old.epoch)
        assert (await arb.record(pair)).sync == "b"
        await arb.resign(pair, "a", old.epoch)
        assert (await arb.record(pair)).sync == "b", (
            "the sync record must outlive the leader's lease"
        )
        new = must_lead(await arb.acquire(pair, "b", TTL_S), "b")

        assert not await arb.set_sync(pair, "a", old.epoch), "stale leader wrote sync"
        assert (await arb.record(pair)).sync == "b", "stale set_sync changed the value"
        assert not await arb.clear_sync(pair, old.epoch), "stale leader cleared sync"
        assert (await arb.record(pair)).sync == "b", "stale clear_sync changed the value"

        assert await arb.set_sync(pair, "a", new.epoch)
        assert (await arb.record(pair)).sync == "a"
        assert await arb.clear_sync(pair, new.epoch)
        assert (await arb.record(pair)).sync is None

    run(harness, scenario)


def test_the_protection_switch_needs_the_current_epoch_and_outlives_leaders(
    harness: Harness, pair: str
) -> None:
    async def scenario(arb: Arbiter) -> None:
        assert (await arb.record(pair)).protection is None, "a switch nobody set must read as unset"
        assert not await arb.set_protection(pair, False, 1), "switched without a leader"
        old = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.set_protection(pair, False, old.epoch)
        assert (await arb.record(pair)).protection is False
        await arb.resign(pair, "a", old.epoch)
        assert (await arb.record(pair)).protection is False, "the switch must outlive the leader"
        new = must_lead(await arb.acquire(pair, "b", TTL_S), "b")
        assert not await arb.set_protection(pair, True, old.epoch), "stale leader switched"
        assert (await arb.record(pair)).protection is False
        assert await arb.set_protection(pair, True, new.epoch)
        assert (await arb.record(pair)).protection is True

    run(harness, scenario)


def test_record_reads_leader_sync_and_switch_of_that_pair_only(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        assert await arb.record(pair) == PairRecord(None, None, None, None)
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.set_sync(pair, "b", won.epoch)
        assert await arb.set_protection(pair, False, won.epoch)
        # A pair whose name extends this one's must not show up in its record.
        longer = must_lead(await arb.acquire(pair + "0", "b", TTL_S), "b")
        assert await arb.set_sync(pair + "0", "a", longer.epoch)
        assert await arb.record(pair) == PairRecord(won, "b", False, "a")
        assert await arb.record(pair + "0") == PairRecord(longer, "a", None, "b")
        await arb.resign(pair, "a", won.epoch)
        assert await arb.record(pair) == PairRecord(None, "b", False, "a")

    run(harness, scenario)


def test_whoever_wins_the_lead_becomes_the_source_which_outlives_leases(
    harness: Harness, pair: str
) -> None:
    async def scenario(arb: Arbiter) -> None:
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.acquire(pair, "b", TTL_S) is None
        assert (await arb.record(pair)).source == "a", "losing the race must not name b"
        await arb.resign(pair, "a", won.epoch)
        assert (await arb.record(pair)).source == "a", "the source must outlive the lease"
        must_lead(await arb.acquire(pair, "b", TTL_S), "b")
        assert (await arb.record(pair)).source == "b"

    run(harness, scenario)


def test_members_change_with_the_current_epoch_clear_sync_and_fence_out_acquirers(
    harness: Harness, pair: str
) -> None:
    async def scenario(arb: Arbiter) -> None:
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        assert await arb.set_sync(pair, "b", won.epoch)
        assert not await arb.set_members(pair, ("a", "c"), won.epoch + 1000), "stale epoch"
        assert (await arb.record(pair)).members is None
        assert await arb.set_members(pair, ("a", "c"), won.epoch)
        got = await arb.record(pair)
        assert (got.members, got.sync) == (("a", "c"), None), "members and no sync in one write"
        await arb.resign(pair, "a", won.epoch)
        # b read the record before the change: its acquire must not win.
        assert await arb.acquire(pair, "b", TTL_S) is None, "acquired on stale members"
        assert await arb.leader(pair) is None
        must_lead(await arb.acquire(pair, "c", TTL_S, ("a", "c")), "c")
        assert (await arb.record(pair)).members == ("a", "c")

    run(harness, scenario)


def test_resign_needs_our_epoch(harness: Harness, pair: str) -> None:
    async def scenario(arb: Arbiter) -> None:
        won = must_lead(await arb.acquire(pair, "a", TTL_S), "a")
        await arb.resign(pair, "a", won.epoch - 1)
        await arb.resign(pair, "a", won.epoch + 1)
        await arb.resign(pair, "b", won.epoch)
        assert await arb.leader(pair) == won, "resign with a wrong epoch or node removed it"
        assert await arb.renew(pair, "a", won.epoch), "lease was revoked by a wrong resign"
        await arb.resign(pair, "a", won.epoch)
        assert await arb.leader(pair) is None

    run(harness, scenario)


def _calls(pair: str) -> list[tuple[str, Callable[[Arbiter], Awaitable[object]]]]:
    return [
        ("acquire", lambda a: a.acquire(pair, "a", TTL_S)),
        ("renew", lambda a: a.renew(pair, "a", 1)),
        ("leader", lambda a: a.leader(pair)),
        ("resign", lambda a: a.resign(pair, "a", 1)),
        ("set_sync", lambda a: a.set_sync(pair, "b", 1)),
        ("clear_sync", lambda a: a.clear_sync(pair, 1)),
        ("record", lambda a: a.record(pair)),
    ]


async def _assert_unavailable_in_time(arb: Arbiter, pair: str) -> None:
    for name, call in _calls(pair):
        start = time.monotonic()
        with pytest.raises(ArbiterUnavailable):
            await call(arb)
        took = time.monotonic() - start
        assert took < DEADLINE_S + SLACK_S, (
            f"{name} on an unreachable arbiter took {took:.2f}s, deadline {DEADLINE_S}s"
        )


def test_unreachable_arbiter_raises_within_deadline(harness: Harness, pair: str) -> None:
    async def scenario() -> None:
        for arb in harness.unreachable():
            try:
                await _assert_unavailable_in_time(arb, pair)
            finally:
                await arb.close()

    asyncio.run(scenario())


def test_etcd_restart_keeps_live_leader(etcd_server: EtcdServer, pair: str) -> None:
    """A restarted etcd still has the leader key; calls during the outage fail fast."""

    async def scenario() -> None:
        arb = EtcdArbiter([etcd_server.endpoint], deadline_s=DEADLINE_S)
        try:
            won = must_lead(await arb.acquire(pair, "a", 10), "a")
            assert await arb.set_sync(pair, "b", won.epoch)
            assert await arb.renew(pair, "a", won.epoch)  # its keep-alive stream is open
            etcd_server.stop()
            await _assert_unavailable_in_time(arb, pair)
            etcd_server.start()
            assert await arb.leader(pair) == won, "leader key lost across an etcd restart"
            assert (await arb.record(pair)).sync == "b", "sync record lost across an etcd restart"
            assert await arb.renew(pair, "a", won.epoch), "could not renew after restart"
            await arb.resign(pair, "a", won.epoch)
            after = must_lead(await arb.acquire(pair, "b", TTL_S), "b")
            assert after.epoch > won.epoch, "epochs must keep growing across restarts"
        finally:
            await arb.close()

    asyncio.run(scenario())


def test_a_renewal_just_after_a_read_is_refused_once_the_lease_is_gone(
    etcd_server: EtcdServer, pair: str
) -> None:
    """A renewal trusts the leader key a fresh read saw, but never a lease etcd dropped
    meanwhile (revoked here, as expiry would): the keep-alive answers TTL 0."""

    async def scenario() -> None:
        arb = EtcdArbiter([etcd_server.endpoint], deadline_s=DEADLINE_S)
        host, port = etcd_server.endpoint.rsplit(":", 1)
        other = aetcd.Client(host=host, port=int(port), timeout=DEADLINE_S)
        try:
            won = must_lead(await arb.acquire(pair, "a", 10), "a")
            assert await arb.renew(pair, "a", won.epoch)
            assert (await arb.record(pair)).leader == won
            kv = await other.get(leader_key(pair).encode())
            await other.revoke_lease(kv.lease)
            assert not await arb.renew(pair, "a", won.epoch), "renewed a revoked lease"
            assert not await arb.renew(pair, "a", won.epoch), "renewed a revoked lease twice"
            assert (await arb.record(pair)).leader is None
            again = must_lead(await arb.acquire(pair, "b", TTL_S), "b")
            assert again.epoch > won.epoch
            assert not await arb.renew(pair, "a", won.epoch), "renewed an epoch that is over"
            assert await arb.renew(pair, "b", again.epoch)
        finally:
            await other.close()
            await arb.close()

    asyncio.run(scenario())


def test_pairs_reading_on_one_turn_share_one_transaction_each_its_own_record(
    etcd_server: EtcdServer, pair: str
) -> None:
    """Reads asked together go out as one transaction; each pair gets its own record
    (vm1 apart from vm10), and a renewal trusts the leader key such a read saw."""

    async def scenario() -> None:
        endpoint = etcd_server.endpoint
        reads = SharedLink([endpoint], DEADLINE_S)
        names = [f"{pair}-1", f"{pair}-10", f"{pair}-2"]
        arbs = [EtcdArbiter([endpoint], DEADLINE_S, link=reads) for _ in names]
        try:
            leaders = [
                must_lead(await a.acquire(n, "a", 10), "a")
                for a, n in zip(arbs, names, strict=True)
            ]
            assert await arbs[1].set_sync(names[1], "b", leaders[1].epoch)
            before = reads.batches
            got = await asyncio.gather(*(a.record(n) for a, n in zip(arbs, names, strict=True)))
            assert reads.batches == before + 1, "three reads on one turn, more than one read"
            assert [r.leader for r in got] == leaders
            assert [r.sync for r in got] == [None, "b", None]
            for a, n, held in zip(arbs, names, leaders, strict=True):
                assert await a.renew(n, "a", held.epoch)
            assert (await arbs[0].record(names[0])).leader == leaders[0]
            assert (await arbs[2].record(names[2])).leader == leaders[2]
            assert reads.batches == before + 3, "reads on separate turns go out separately"
        finally:
            for a in arbs:
                await a.close()
            await reads.close()

    asyncio.run(scenario())


def test_check_names_each_etcd_endpoint_that_answers_and_each_that_does_not(
    etcd_server: EtcdServer, silent_port: int, tmp_path: Path
) -> None:
    from coloft.config.load import load_spec
    from coloft.effects.preflight import arbiter_checks
    from tests.unit.test_config import GOOD

    dead = f"127.0.0.1:{_closed_port()}"
    hung = f"127.0.0.1:{silent_port}"
    live = etcd_server.endpoint
    path = tmp_path / "pair.toml"
    path.write_text(
        GOOD + f'[arbiter]\nembedded = false\nendpoints = ["{live}", "{dead}", "{hung}"]\n'
    )
    checks = {c.name: c for c in arbiter_checks(load_spec(path))}
    assert checks[f"arbiter {live}"].ok, checks
    assert "leader of web: none" in checks[f"arbiter {live}"].detail
    for endpoint in (dead, hung):
        c = checks[f"arbiter {endpoint}"]
        assert not c.ok and "no answer" in c.detail and "firewall" in c.fix, c


def test_renewals_on_one_turn_send_their_keep_alives_together_each_its_own_lease(
    etcd_server: EtcdServer, pair: str
) -> None:
    """The pairs of an agent renew on one stream, in one round per turn, and each keeps
    a lease of its own: a lease gone ends that pair's leadership alone, and a pair that
    stops renewing loses its key while the others keep theirs."""

    async def scenario() -> None:
        endpoint = etcd_server.endpoint
        link = SharedLink([endpoint], DEADLINE_S)
        names = [f"{pair}-1", f"{pair}-2", f"{pair}-3"]
        arbs = [EtcdArbiter([endpoint], DEADLINE_S, link=link) for _ in names]
        host, port = endpoint.rsplit(":", 1)
        other = aetcd.Client(host=host, port=int(port), timeout=DEADLINE_S)
        try:
            held = [
                must_lead(await a.acquire(n, "a", TTL_S), "a")
                for a, n in zip(arbs, names, strict=True)
            ]
            leases = [(await other.get(leader_key(n).encode())).lease for n in names]
            assert len(set(leases)) == 3, "pairs share a lease: one's failure ends all"

            async def renew_all(count: int) -> list[bool]:
                due = list(zip(arbs, names, held, strict=True))[:count]
                return await asyncio.gather(*(a.renew(n, "a", h.epoch) for a, n, h in due))

            before = link.keep_alives
            assert await renew_all(3) == [True] * 3
            assert link.keep_alives == before + 1, "three renewals on one turn, several rounds"

            # A round asked while another is under way waits for it, then goes out.
            first = asyncio.create_task(renew_all(1))
            await asyncio.sleep(0.001)
            assert link.keep_alives == before + 2, "the first round is not out yet"
            assert list(await asyncio.gather(first, renew_all(2))) == [[True], [True, True]]
            assert link.keep_alives == before + 3

            await other.revoke_lease(leases[0])
            assert await renew_all(3) == [False, True, True], "one lease gone ended others"

            for _ in range(3):  # well past the TTL: only the renewals keep a lease
                await asyncio.sleep(TTL_S / 2)
                assert await renew_all(2) == [False, True]
            assert await arbs[1].leader(names[1]) == held[1]
            assert await arbs[2].leader(names[2]) is None, "a key outlived its unrenewed lease"
        finally:
            await other.close()
            for a in arbs:
                await a.close()
            await link.close()

    asyncio.run(scenario())
