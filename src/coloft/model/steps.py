"""Choreographies as data: the QMP steps of a bring-up, run by effects.executor."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Role(Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Until(Enum):
    """Conditions a polled step waits for; evaluated by core.choreography.condition_met."""

    MIGRATION_IN_COLO = "migration-in-colo"
    NO_BLOCK_JOB = "no-block-job"
    CHARDEVS_CONNECTED = "chardevs-connected"
    COLO_MODE = "colo-mode"
    RUNNING = "running"


@dataclass(frozen=True)
class Step:
    """One QMP command on one node.

    `accept` lists error substrings that mean the effect is already in place, so a
    sequence interrupted half-way can be run again from the start.
    `expect_event` is awaited after the command succeeds (listening starts before
    the command is sent, so a fast event is never missed).
    `until` turns the step into a poll: the command is repeated until the
    condition holds on its reply, or the deadline passes.
    """

    node: str
    name: str
    command: str
    arguments: dict[str, Any] = field(default_factory=dict)
    deadline_s: float = 5.0
    accept: tuple[str, ...] = ()
    expect_event: str | None = None
    event_data: dict[str, Any] = field(default_factory=dict)
    until: Until | None = None
    until_args: tuple[str, ...] = ()
    hmp: bool = False
    # Sent out-of-band on the node's second monitor: works while the main loop is stuck.
    oob: bool = False

    def describe(self) -> str:
        return f"{self.node}: {self.name}"
