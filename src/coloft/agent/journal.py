"""Each agent's event journal: one JSON line per event, in a file of bounded size.

The agent's status keeps only its last events in memory; the journal keeps more,
and outlives the agent (a killed agent's last words are still there for
`coloft events`). When the file passes MAX_BYTES it becomes `.1` (one older file
kept), so the journal never holds more than twice that.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20


def path_of(run_root: Path, node: str) -> Path:
    return run_root / f"events-{node}.jsonl"


class Journal:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.broken = False

    def append(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("a") as f:
                f.write(line)
            self.broken = False
        except OSError as e:
            # The journal is a record, never a reason to stop the agent; say it once.
            if not self.broken:
                log.error("event journal %s: %s", self.path, e)
            self.broken = True


def read(path: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The events after `since` (wall clock) in a journal and its older file."""
    events: list[dict[str, Any]] = []
    for p in (path.with_name(path.name + ".1"), path):
        try:
            lines = p.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short when the agent died mid-write
            if isinstance(e, dict) and float(e.get("unix", 0)) > since:
                events.append(e)
    return events
