"""Runs choreography steps (coloft.model.steps) against QMP sessions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coloft.core.choreography import condition_met, failure_in_poll, hmp_error, is_accepted
from coloft.effects.qmp import QmpSession
from coloft.errors import ColoftError, StepError
from coloft.model.steps import Step

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
Progress = Callable[[Step, float], None]


async def run_step(session: QmpSession, step: Step) -> Any:
    started = time.monotonic()
    end = started + step.deadline_s
    try:
        if step.until is not None:
            return await _poll(session, step, end)
        if step.expect_event is None:
            return await _once(session, step, step.deadline_s)
        with session.listener((step.expect_event,)) as listener:
            reply = await _once(session, step, step.deadline_s)
            await _wait_event(listener, step, end)
            return reply
    except StepError:
        raise
    except ColoftError as e:
        raise StepError(step.node, step.name, str(e)) from e


async def _once(session: QmpSession, step: Step, deadline_s: float) -> Any:
    try:
        reply = await session.execute(
            step.command, step.arguments, deadline_s=deadline_s, oob=step.oob
        )
    except ColoftError as e:
        if is_accepted(step, str(e)):
            log.info("%s: already in place (%s)", step.describe(), e)
            return None
        raise
    if step.hmp:
        problem = hmp_error(str(reply))
        if problem is not None and not is_accepted(step, problem):
            raise StepError(step.node, step.name, f"QEMU said: {problem}")
    return reply


async def _wait_event(listener: Any, step: Step, end: float) -> None:
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise StepError(
                step.node, step.name, f"no {step.expect_event} event within {step.deadline_s:g} s"
            )
        try:
            async with asyncio.timeout(remaining):
                event = await listener.get()
        except TimeoutError:
            continue
        data = event.get("data", {}) or {}
        if all(data.get(k) == v for k, v in step.event_data.items()):
            return


async def _poll(session: QmpSession, step: Step, end: float) -> Any:
    assert step.until is not None
    reply: Any = None
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise StepError(
                step.node,
                step.name,
                f"condition {step.until.value} not reached within "
                f"{step.deadline_s:g} s (last reply: {reply!r})"[:600],
            )
        reply = await session.execute(step.command, step.arguments, deadline_s=min(remaining, 2.0))
        if condition_met(step.until, step.until_args, reply):
            return reply
        problem = failure_in_poll(step.until, reply)
        if problem is not None:
            raise StepError(step.node, step.name, problem)
        await asyncio.sleep(POLL_INTERVAL_S)


async def run_steps(
    sessions: Mapping[str, QmpSession],
    steps: Sequence[Step],
    progress: Progress | None = None,
    oob_sessions: Mapping[str, QmpSession] | None = None,
) -> None:
    """Run steps in order; the first failure stops the sequence with a StepError.

    Out-of-band steps go to the node's second monitor when one is given, so they
    are not queued behind a command that hangs on the first.
    """
    for step in steps:
        started = time.monotonic()
        log.info("step %s", step.describe())
        session = sessions[step.node]
        if step.oob and oob_sessions is not None:
            session = oob_sessions.get(step.node, session)
        await run_step(session, step)
        if progress is not None:
            progress(step, time.monotonic() - started)
