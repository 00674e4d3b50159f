"""Faults the demo and the tests inject into a running pair."""

from __future__ import annotations

import os
import signal
import time

from coloft.agent.pair import Pair
from coloft.errors import ConfigError
from coloft.model.steps import Role

# fault name -> (role of the victim, signal sent to its QEMU)
FAULTS: dict[str, tuple[Role, signal.Signals]] = {
    "kill-primary": (Role.PRIMARY, signal.SIGKILL),
    "kill-secondary": (Role.SECONDARY, signal.SIGKILL),
    "stop-primary": (Role.PRIMARY, signal.SIGSTOP),
    "stop-secondary": (Role.SECONDARY, signal.SIGSTOP),
}


def inject(pair: Pair, fault: str) -> float:
    """Inject the fault now; returns when (monotonic seconds)."""
    if fault not in FAULTS:
        raise ConfigError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    role, sig = FAULTS[fault]
    node = next(n for n, r in pair.roles.items() if r is role)
    at = time.monotonic()
    os.kill(pair.procs[node].pid, sig)
    return at
