"""A QMP monitor asked on a beat and read on the next one, never waited on.

A settled pair's QEMU is polled several times a second only to see that it still
answers and in what run state. Through qemu.qmp each poll is a round trip the
event loop wakes for; here the questions go out on the agent's beat and their
answers are read, without waiting, at the next one, beside the other work of that
beat. What is lost is the answer's exact latency (known only to be under one
beat); what is kept is the silence of a QEMU that stopped answering, timed from
its oldest unanswered question.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

from coloft.errors import TransientError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


class QmpPoll:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        # Questions sent and not answered yet: id -> (command, when sent, answer wanted).
        self.pending: dict[str, tuple[str, float, bool]] = {}
        # The latest answer to each command: its return value, or None after an error.
        self.answers: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        # When the latest question QEMU answered was sent.
        self.answered: float | None = None

    async def connect(self, deadline_s: float = 5.0) -> None:
        """Connect and negotiate capabilities (the only time this monitor is waited on)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(deadline_s):
                await loop.sock_connect(sock, str(self.path))
                greeting = await self._read_line(loop, sock)
                if not isinstance(greeting, dict) or "QMP" not in greeting:
                    raise TransientError(f"{self.name}: not a QMP greeting: {greeting}")
                await loop.sock_sendall(sock, b'{"execute": "qmp_capabilities"}\n')
                reply = await self._read_line(loop, sock)
                if not isinstance(reply, dict) or "return" not in reply:
                    raise TransientError(f"{self.name}: capabilities refused: {reply}")
        except (OSError, TimeoutError, ValueError) as e:
            sock.close()
            raise TransientError(f"{self.name}: QMP at {self.path}: {e!r}") from e
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    async def _read_line(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Any:
        while b"\n" not in self._buffer:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ValueError("connection closed")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def ask(self, commands: list[str], now: float) -> None:
        """Send the questions; their answers are taken in by the next `read`."""
        if self.sock is None:
            return
        asked = {}
        lines = []
        for command in commands:
            self._next_id += 1
            ident = f"p{self._next_id}"
            lines.append(json.dumps({"execute": command, "id": ident}).encode() + b"\n")
            asked[ident] = (command, now, True)
        data = b"".join(lines)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            # QEMU has not read what it was asked before: that silence is counted already.
            return
        except OSError as e:
            log.debug("%s: %s", self.name, e)
            self.close()
            return
        if sent < len(data):
            # Half a question would garble the next: this monitor is given up, and the
            # caller asks through its session.
            log.debug("%s: short write, monitor given up", self.name)
            self.close()
            return
        self.pending.update(asked)

    def read(self) -> None:
        """Take in whatever QEMU wrote since the last read (answers and events)."""
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                log.debug("%s: %s", self.name, e)
                self.close()
                break
            if not data:
                self.close()
                break
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
        for line in lines:
            self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        # Events come on every monitor; the main session handles them.
        if not isinstance(msg, dict) or "id" not in msg:
            return
        asked = self.pending.pop(str(msg["id"]), None)
        if asked is None:
            return
        command, sent, wanted = asked
        self.answered = max(sent, self.answered or sent)
        if not wanted:
            return
        if "return" in msg:
            self.answers[command] = msg["return"]
            self.errors.pop(command, None)
        else:
            self.answers[command] = None
            self.errors[command] = str((msg.get("error") or {}).get("desc", msg))

    def silent_since(self) -> float | None:
        """When the oldest question still unanswered was sent (None: all answered)."""
        return min((t for _c, t, _w in self.pending.values()), default=None)

    def forget(self) -> None:
        """Drop what was answered and what will be: the caller has asked afresh by
        another way. Questions still unanswered go on counting as silence."""
        self.answers.clear()
        self.errors.clear()
        self.pending = {i: (c, t, False) for i, (c, t, _w) in self.pending.items()}

    def close(self) -> None:
        """Stop asking here: unanswered questions no longer count as silence (the
        caller asks through its session instead)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.pending.clear()
        self.answers.clear()
        self.errors.clear()

    @property
    def connected(self) -> bool:
        return self.sock is not None
