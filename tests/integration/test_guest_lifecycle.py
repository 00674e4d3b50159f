"""The guest reboots or powers itself off inside a protected pair: neither is a
failure. A reboot keeps both QEMUs in COLO (the probe's silence meanwhile is named
as the reboot); a power-off stops the pair without a failover, nothing left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from coloft.agent.launch import LocalPair
from coloft.effects.process import pid_alive
from coloft.lab import net
from coloft.lab.probe import ask, wait_ready
from coloft.lab.rounds import all_events, up_and_serving
from coloft.lab.setup import lab_spec
from coloft.model.spec import PairSpec
from coloft.model.status import pair_view

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MakePair = Callable[[PairSpec], LocalPair]
HOST, PORT = "192.0.2.10", 7000


def qemu_pids(pair: LocalPair) -> dict[str, int]:
    return {n: int(s["qemu"]["pid"]) for n, s in pair.statuses().items() if s is not None}


def test_guest_reboot_is_no_failover(make_pair: MakePair) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    before = qemu_pids(pair)
    assert ask(net.CLIENT_NS, HOST, PORT, "PUT before-reboot 1") == "OK before-reboot"
    assert ask(net.CLIENT_NS, HOST, PORT, "REBOOT") == "OK REBOOT"
    views = pair.wait_for(
        lambda s: pair_view("demo", s)["code"] == "guest-rebooting", 20, "the reboot named"
    )
    assert wait_ready(net.CLIENT_NS, HOST, PORT, 120), "the service never came back"
    views = pair.wait_for(lambda s: pair_view("demo", s)["protected"], 120, "protected again")
    assert qemu_pids(pair) == before, "a QEMU was replaced"
    assert all(v is not None and v["failover"] is None for v in views.values()), views
    events = all_events(views)
    assert any(e["kind"] == "qemu" and "RESET" in e["text"] for e in events), events
    # The disk the guest wrote before its reboot is the one it came back to.
    assert ask(net.CLIENT_NS, HOST, PORT, "GET before-reboot") == "VAL before-reboot 1"


def test_guest_poweroff_stops_the_pair_without_a_failover(make_pair: MakePair) -> None:
    pair = make_pair(lab_spec(interval_ms=2000))
    asyncio.run(up_and_serving(pair))
    pids = qemu_pids(pair)
    assert ask(net.CLIENT_NS, HOST, PORT, "HALT") == "OK HALT"
    views = pair.wait_for(
        lambda s: all(v is not None and v["state"] == "stopped" for v in s.values()),
        30,
        "both agents stopped",
    )
    view = pair_view("demo", views)
    assert (view["phase"], view["code"], view["leader"]) == ("stopped", "guest-shutdown", None)
    for v in views.values():
        assert v is not None
        assert v["failover"] is None and v["sync"] is None, v
        texts = [e["text"] for e in v["events"]]
        assert not any("taking over" in t or "running alone" in t for t in texts), texts
    assert not any(pid_alive(p) for p in pids.values()), "a QEMU still runs"
