"""The agent's word to systemd's watchdog while a tick waits on the arbiter."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from coloft.agent.daemon import Agent
from coloft.arbiter.memory import MemoryArbiter
from coloft.config.load import load_spec
from coloft.effects.qemu_binary import QemuChoice
from coloft.model.spec import Accel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"


def test_the_watchdog_hears_after_each_arbiter_call_not_once_a_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        spec = load_spec(EXAMPLE)
        agent = Agent(spec, "a", MemoryArbiter(), QemuChoice(Path("/bin/false"), Accel.TCG, ""))
        agent.notifier.every_s = 0.0  # every word counted

        async def two_slow_calls() -> None:
            # A tick's read and renewal, each as slow as its deadline allows.
            await agent._bounded(asyncio.sleep(0.05))
            await agent._bounded(asyncio.sleep(0.05))

        asyncio.run(two_slow_calls())
        got = []
        while True:
            try:
                got.append(s.recv(100))
            except BlockingIOError:
                break
    assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]
