"""The systemd notify messages the agent sends (none outside systemd)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from coloft.effects.sdnotify import Notifier


def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier(every_s=60)
        n.ready()
        n.alive()
        n.alive()  # within every_s: not sent again
        n.stopping()
        got = [s.recv(100) for _ in range(3)]
    assert got == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_outside_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    n.ready()
    n.alive()
    assert n.address is None
