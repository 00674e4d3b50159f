"""What the supervisor publishes about a pair."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SideStatus:
    node: str
    role: str
    pid: int | None
    alive: bool
    run_state: str | None = None
    colo_mode: str | None = None
    colo_reason: str | None = None
    migration: str | None = None
    qmp_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class PairStatus:
    vm: str
    phase: str
    protected: bool
    reason: str
    checkpoints: int
    checkpoints_per_min: float
    last_checkpoint_age_s: float | None
    last_pause_ms: float | None
    checkpoint_interval_ms: int
    sides: tuple[SideStatus, ...]
    supervisor_pid: int
    updated_unix: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
