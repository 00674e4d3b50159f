"""QMP sessions: qemu.qmp with a deadline on every call and a drained event queue.

qemu.qmp has no timeouts on connect/execute and its default event queue grows
forever; this wrapper covers both. A lost connection is reported as a
TransientError so the caller's loop can treat it as an observation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from coloft.errors import ProtocolError, TransientError

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any], float], None]


class QmpSession:
    """One QMP monitor of one QEMU. Not shared between tasks that may cancel."""

    def __init__(self, name: str, path: Path, on_event: EventCallback | None = None) -> None:
        self.name = name
        self.path = path
        self._client = QMPClient(name)
        self._on_event = on_event
        self._pump: asyncio.Task[None] | None = None
        self.recent_events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=200)
        # Since when QEMU has left our requests unanswered (monotonic), None while it
        # answers: silence is only a sign of a hang when we were asking.
        self.silent_since: float | None = None
        # When the latest question QEMU answered (result or error) was sent.
        self.answered: float | None = None
        self.calls: deque[tuple[str, float, bool]] = deque(maxlen=1000)
        self.calls_total = 0

    async def connect(self, deadline_s: float = 5.0) -> None:
        """Connect, retrying while QEMU has not created its socket yet."""
        end = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                async with asyncio.timeout(max(0.1, end - time.monotonic())):
                    await self._client.connect(str(self.path))
            except (OSError, QMPError, TimeoutError) as e:
                last = e
                await asyncio.sleep(0.05)
                continue
            self._pump = asyncio.create_task(self._drain(), name=f"qmp-events-{self.name}")
            return
        raise TransientError(
            f"{self.name}: QMP at {self.path} did not answer within {deadline_s:.0f} s: {last}"
        )

    async def _drain(self) -> None:
        async for event in self._client.events:
            kind = str(event.get("event", ""))
            raw = event.get("data")
            data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
            now = time.monotonic()
            self.recent_events.append((now, kind, data))
            if self._on_event is not None:
                try:
                    self._on_event(kind, data, now)
                except Exception:  # a broken observer must not stop the drain
                    log.exception("%s: event callback failed on %s", self.name, kind)

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        deadline_s: float = 1.0,
        oob: bool = False,
    ) -> Any:
        started = time.monotonic()
        ok = False
        try:
            async with asyncio.timeout(deadline_s):
                msg = self._client.make_execute_msg(command, arguments or None, oob=oob)
                reply = await self._client.execute_msg(msg)
            self._heard(started)
            ok = True
            return reply
        except ExecuteError as e:
            self._heard(started)
            raise ProtocolError(f"{self.name}: {command}: {e.error.error.desc}") from e
        except TimeoutError as e:
            if self.silent_since is None:
                self.silent_since = started
            raise TransientError(
                f"{self.name}: {command} got no answer within {deadline_s:g} s"
            ) from e
        except (QMPError, OSError, EOFError) as e:
            raise TransientError(f"{self.name}: {command}: connection lost ({e!r})") from e
        finally:
            # For the agent's metrics: latency and outcome of every command.
            self.calls.append((command, time.monotonic() - started, ok))
            self.calls_total += 1

    def _heard(self, asked_at: float) -> None:
        """QEMU answered (a result or an error) a question asked at `asked_at`."""
        self.silent_since = None
        self.answered = max(asked_at, self.answered or asked_at)

    @contextlib.contextmanager
    def listener(self, names: tuple[str, ...]) -> Iterator[EventListener]:
        with self._client.listener(names) as listener:
            yield listener

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._client.disconnect()
