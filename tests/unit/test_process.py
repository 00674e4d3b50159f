"""How an exited QEMU is described: real child processes stand in for QEMU."""

from __future__ import annotations

import subprocess
from pathlib import Path

from coloft.effects.process import QemuProcess


def ended(tmp_path: Path, script: str) -> QemuProcess:
    err = tmp_path / "qemu.stderr"
    with open(err, "wb") as f:
        popen = subprocess.Popen(["sh", "-c", script], stderr=f)
    popen.wait(timeout=10)
    return QemuProcess("a", ["sh"], popen, err)


def test_a_qemu_killed_by_a_signal_names_it_and_its_last_line(tmp_path: Path) -> None:
    proc = ended(tmp_path, "echo starting >&2; echo 'assertion failed: x' >&2; kill -ABRT $$")
    assert proc.death() == "killed by SIGABRT; it last wrote: assertion failed: x"


def test_a_qemu_that_exited_says_its_code(tmp_path: Path) -> None:
    assert ended(tmp_path, "exit 3").death() == "exit code 3"


def test_a_qemu_killed_by_a_nameless_signal_says_its_number(tmp_path: Path) -> None:
    assert ended(tmp_path, "kill -s RTMIN+3 $$").death() == "killed by signal 37"


def test_a_qemu_that_failed_to_start_is_named_with_its_end_and_stderr(tmp_path: Path) -> None:
    proc = ended(tmp_path, "echo 'could not open disk' >&2; exit 1")
    assert proc.failure().splitlines() == [
        "a: QEMU exited (exit code 1)",
        "  command: sh",
        "  stderr: could not open disk",
    ]
