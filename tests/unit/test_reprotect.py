"""Re-protection's pacing and progress figures (core.reprotect)."""

from __future__ import annotations

from coloft.core.reprotect import Backoff, SyncProgress, read_block_job, read_ram


def test_backoff_doubles_to_a_ceiling_and_starts_over_after_a_success() -> None:
    b = Backoff(first_s=2.0, max_s=10.0)
    assert b.ready(0.0)
    waits = []
    for _ in range(5):
        b = b.failed(100.0)
        waits.append(b.wait_s(100.0))
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert not b.ready(109.0) and b.ready(110.0)
    b = b.succeeded()
    assert b.ready(0.0) and b.failed(0.0).wait_s(0.0) == 2.0


def test_a_postponed_attempt_does_not_grow_the_wait() -> None:
    b = Backoff(first_s=2.0, max_s=60.0).failed(0.0).failed(0.0)
    later = b.later(50.0)
    assert later.failures == 2 and later.wait_s(50.0) == 2.0


def test_progress_rate_and_eta() -> None:
    mib = 1 << 20
    p = SyncProgress(
        disk_done=48 * mib, disk_total=96 * mib, ram_done=0, ram_total=128 * mib, started=0, at=1
    )
    assert p.synced_bytes == 48 * mib
    assert p.rate_bps() == 48 * mib
    assert p.eta_s() == (48 + 128) / 48
    assert p.text() == "syncing disk 48/96 MiB, memory 0/128 MiB, 48 MiB/s, ETA 3.7 s"
    assert SyncProgress().text() == "syncing" and SyncProgress().eta_s() is None


def test_qemu_replies_are_read_defensively() -> None:
    jobs = [{"device": "other", "offset": 1, "len": 2}, {"device": "resync", "offset": 5, "len": 9}]
    assert read_block_job(jobs, "resync") == (5, 9)
    assert read_block_job([], "resync") is None and read_block_job({"x": 1}, "resync") is None
    assert read_ram({"status": "active", "ram": {"transferred": 7, "total": 8}}) == (7, 8)
    # In COLO, QEMU reports the status alone; a finished copy's figures are stale.
    assert read_ram({"status": "colo"}) is None
    assert read_ram({"status": "completed", "ram": {"transferred": 7, "total": 8}}) is None
