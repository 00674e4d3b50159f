"""The agents' event journal: bounded, readable after the agent died."""

from __future__ import annotations

from pathlib import Path

from coloft.agent.journal import Journal, read


def test_journal_keeps_events_in_order_and_bounds_its_size(tmp_path: Path) -> None:
    path = tmp_path / "events-a.jsonl"
    j = Journal(path, max_bytes=400)
    for i in range(20):
        j.append({"unix": float(i), "kind": "state", "text": f"event {i}"})
    older = path.with_name(path.name + ".1")
    assert path.stat().st_size <= 400 and older.stat().st_size <= 400
    got = read(path)
    times = [e["unix"] for e in got]
    assert times == sorted(times) and times[-1] == 19.0
    assert [e["unix"] for e in read(path, since=17.0)] == [18.0, 19.0]


def test_a_line_cut_short_is_skipped_and_a_broken_disk_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "events-b.jsonl"
    path.write_text('{"unix": 1.0, "kind": "x"}\n{"unix": 2.0, "ki')
    assert [e["unix"] for e in read(path)] == [1.0]
    blocked = tmp_path / "file"
    blocked.write_text("")
    j = Journal(blocked / "events.jsonl")  # its directory is a file
    j.append({"unix": 3.0})
    assert j.broken
    assert read(tmp_path / "missing.jsonl") == []
