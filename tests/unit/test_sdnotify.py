"""The systemd notify messages the agent sends (none outside systemd)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloft.agent.daemon import Agent
from coloft.arbiter.memory import MemoryArbiter
from coloft.config.load import load_spec
from coloft.effects.qemu_binary import QemuChoice
from coloft.effects.sdnotify import Notifier
from coloft.lab.watchdog import NotifyListener, Sender, watchdog_s
from coloft.model.spec import Accel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's end of the notify socket, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield s


def test_ready_watchdog_and_stopping_reach_the_notify_socket(notify: socket.socket) -> None:
    n = Notifier(every_s=60)
    n.ready()
    n.alive()
    n.alive()  # within every_s: not sent again
    n.stopping()
    got = [notify.recv(100) for _ in range(3)]
    assert got == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    n.ready()
    n.alive()
    assert n.address is None


def test_the_watchdog_hears_after_each_arbiter_call_not_once_a_tick(
    notify: socket.socket,
) -> None:
    agent = Agent(
        load_spec(EXAMPLE), "a", MemoryArbiter(), QemuChoice(Path("/bin/false"), Accel.TCG, "")
    )
    agent.notifier.every_s = 0.0  # every word counted

    async def two_slow_calls() -> None:
        # A tick's read and renewal, each as slow as its deadline allows.
        await agent._bounded(asyncio.sleep(0.05))
        await agent._bounded(asyncio.sleep(0.05))

    asyncio.run(two_slow_calls())
    got = [notify.recv(100) for _ in range(2)]
    notify.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify.recv(100)
    assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_the_lab_listener_keeps_each_senders_longest_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifyListener(tmp_path / "notify")
    listener.start()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        n = Notifier(every_s=0.0)
        n.ready()
        n.alive()
        time.sleep(0.15)
        n.alive()
        deadline = time.monotonic() + 2
        while listener.senders.get(os.getpid(), Sender()).pings < 2:
            assert time.monotonic() < deadline, listener.senders
            time.sleep(0.01)
    finally:
        listener.stop()
    heard = listener.senders[os.getpid()]
    assert heard.ready and heard.pings == 2 and 0.15 <= heard.longest_wait_s < 1.0
    assert watchdog_s() == 1.0, "the units' WatchdogSec, which the tick's pace is held to"


def test_one_process_many_loops_word_goes_out_only_once_each_turned(
    notify: socket.socket,
) -> None:
    n = Notifier(every_s=0.0)
    n.alive("vm0")
    n.alive("vm1")  # vm1 joins: vm0 turned before the last word, so it is awaited
    n.alive("vm0")
    n.alive("vm0")  # vm1 has not turned since: a hung vm1 loop gets no word out
    n.alive("vm1")
    n.forget("vm1")  # vm1's loop ended (restarting): vm0 alone is awaited
    n.alive("vm0")
    notify.setblocking(False)
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(notify.recv(100))
    # vm0 alone; vm0 after vm1's first turn; vm1 after vm0's; vm0 alone again.
    assert got == [b"WATCHDOG=1"] * 4
