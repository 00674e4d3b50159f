"""Re-protection's pacing: retries with backoff, and the figures of a resync.

Pure. A peer that fails again and again (flapping host, bad disk) must not keep the
leader in one resync after another: each failed attempt doubles the wait before
the next, up to a ceiling; a success starts over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# query-migrate states of a memory copy under way.
COPYING = ("setup", "active", "pre-switchover", "device")


@dataclass(frozen=True)
class Backoff:
    first_s: float
    max_s: float
    failures: int = 0
    not_before: float = float("-inf")

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, now: float) -> Backoff:
        wait = min(self.max_s, self.first_s * 2**self.failures)
        return replace(self, failures=self.failures + 1, not_before=now + wait)

    def later(self, now: float) -> Backoff:
        """Try again after the first wait: nothing was attempted, nothing counts."""
        return replace(self, not_before=now + self.first_s)

    def succeeded(self) -> Backoff:
        return replace(self, failures=0, not_before=float("-inf"))

    def wait_s(self, now: float) -> float:
        return max(0.0, self.not_before - now)


@dataclass(frozen=True)
class SyncProgress:
    """Bytes copied so far by the disk mirror and the memory migration."""

    disk_done: int = 0
    disk_total: int = 0
    ram_done: int = 0
    ram_total: int = 0
    started: float = 0.0
    at: float = 0.0

    @property
    def synced_bytes(self) -> int:
        return self.disk_done + self.ram_done

    def rate_bps(self) -> float | None:
        took = self.at - self.started
        return None if took <= 0 else self.synced_bytes / took

    def eta_s(self) -> float | None:
        rate = self.rate_bps()
        left = max(0, self.disk_total - self.disk_done) + max(0, self.ram_total - self.ram_done)
        return None if not rate else left / rate

    def text(self) -> str:
        mib = 1 << 20
        parts = []
        if self.disk_total:
            parts.append(f"disk {self.disk_done / mib:.0f}/{self.disk_total / mib:.0f} MiB")
        if self.ram_total:
            parts.append(f"memory {self.ram_done / mib:.0f}/{self.ram_total / mib:.0f} MiB")
        rate, eta = self.rate_bps(), self.eta_s()
        if rate:
            parts.append(f"{rate / mib:.0f} MiB/s")
        if eta is not None:
            parts.append(f"ETA {eta:.1f} s")
        return "syncing " + ", ".join(parts) if parts else "syncing"


def read_block_job(jobs: Any, job_id: str) -> tuple[int, int] | None:
    """(offset, len) of the job in a query-block-jobs reply."""
    if not isinstance(jobs, list):
        return None
    for j in jobs:
        if isinstance(j, dict) and j.get("device") == job_id:
            return int(j.get("offset") or 0), int(j.get("len") or 0)
    return None


def read_ram(migration: Any) -> tuple[int, int] | None:
    """(transferred, total) RAM bytes of a memory copy under way in a query-migrate
    reply (an earlier, finished migration's figures stay there until a new one)."""
    if not isinstance(migration, dict) or migration.get("status") not in COPYING:
        return None
    ram = migration.get("ram")
    if not isinstance(ram, dict):
        return None
    return int(ram.get("transferred") or 0), int(ram.get("total") or 0)
