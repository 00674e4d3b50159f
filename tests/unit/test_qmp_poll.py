"""The beat-read QMP monitor against a scripted QMP server on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coloft.effects.qmp_poll import QmpPoll
from coloft.errors import TransientError


class Server:
    """Speaks QMP's greeting and negotiation, then answers query-status only while
    `answering`, with an event before each answer (QEMU sends events to every monitor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answering = True
        self.held: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> asyncio.Server:
        return await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["execute"] == "qmp_capabilities":
                writer.write(b'{"return": {}}\n')
            elif not self.answering:
                self.held.append(msg["id"])
            else:
                event = {"event": "STOP", "timestamp": {"seconds": 0, "microseconds": 0}}
                answer = {"return": {"status": "running", "running": True}, "id": msg["id"]}
                if msg["execute"] != "query-status":
                    answer = {"error": {"class": "CommandNotFound", "desc": "no"}, "id": msg["id"]}
                writer.write(
                    json.dumps(event).encode() + b"\n" + json.dumps(answer).encode() + b"\n"
                )
            await writer.drain()


async def _settle() -> None:
    await asyncio.sleep(0.05)


async def exchange(poll: QmpPoll, command: str, at: float) -> None:
    """Ask, give the server time to answer, read."""
    poll.ask([command], at)
    await _settle()
    poll.read()


@contextlib.asynccontextmanager
async def connected(tmp_path: Path) -> AsyncIterator[tuple[Server, QmpPoll]]:
    server = Server(tmp_path / "qmp.sock")
    async with await server.start():
        poll = QmpPoll("t", server.path)
        await poll.connect(1.0)
        try:
            yield server, poll
        finally:
            poll.close()


def test_answers_are_taken_in_by_the_next_read_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with connected(tmp_path) as (_server, poll):
            poll.ask(["query-status"], 10.0)
            assert poll.silent_since() == 10.0 and "query-status" not in poll.answers
            await _settle()
            poll.read()
            assert poll.answers["query-status"] == {"status": "running", "running": True}
            assert poll.silent_since() is None, "answered; the event before it is ignored"
            assert poll.answered == 10.0, "alive when the question was asked"
            await exchange(poll, "query-nothing", 11.0)
            assert poll.answers["query-nothing"] is None and poll.errors["query-nothing"] == "no"
            assert poll.answered == 11.0, "an error is an answer too"
            poll.close()

    asyncio.run(scenario())


def test_a_monitor_that_stops_answering_is_silent_since_its_oldest_question(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with connected(tmp_path) as (server, poll):
            server.answering = False
            await exchange(poll, "query-status", 20.0)
            await exchange(poll, "query-status", 20.2)
            assert poll.silent_since() == 20.0 and len(server.held) == 2
            assert poll.answered is None, "nothing answered: no sign of life"
            # The connection lost: nothing more can be learnt here, and nothing is counted.
            for w in server.writers:
                w.close()
            await _settle()
            poll.read()
            assert not poll.connected and poll.silent_since() is None

    asyncio.run(scenario())


def test_after_forget_a_late_answer_is_dropped_but_silence_still_counts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with connected(tmp_path) as (server, poll):
            server.answering = False
            await exchange(poll, "query-status", 30.0)
            poll.forget()  # the caller asked by its session meanwhile
            assert poll.silent_since() == 30.0, "still unanswered: still silence"
            late = {"return": {"status": "paused"}, "id": server.held[0]}
            server.writers[0].write(json.dumps(late).encode() + b"\n")
            await _settle()
            poll.read()
            assert "query-status" not in poll.answers, "an answer older than the caller's"
            assert poll.silent_since() is None, "but an answer all the same"
            assert poll.answered == 30.0, "and a sign of life at the time it was asked"
            server.answering = True
            await exchange(poll, "query-status", 30.2)
            assert poll.answers["query-status"]["status"] == "running"
            poll.close()

    asyncio.run(scenario())


def test_something_else_than_qmp_is_refused_with_its_path(tmp_path: Path) -> None:
    async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b'{"hello": 1}\n')
        await w.drain()

    async def scenario() -> None:
        path = tmp_path / "other.sock"
        async with await asyncio.start_unix_server(serve, path=str(path)):
            poll = QmpPoll("t", path)
            with pytest.raises(TransientError, match="not a QMP greeting"):
                await poll.connect(1.0)
            assert not poll.connected
            with pytest.raises(TransientError, match=str(tmp_path / "missing.sock")):
                await QmpPoll("t", tmp_path / "missing.sock").connect(0.2)

    asyncio.run(scenario())
