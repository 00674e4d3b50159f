"""Guests from Debian packages: dependency closure, ELF libraries, guest files, the
Redis clients' output."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from coloft.lab import packages as debs
from coloft.lab.guest import (
    GuestBuildError,
    GuestService,
    load_guest_spec,
    services_script,
)
from coloft.lab.redis_load import RedisLoadError, benchmark_report, combine, resets, summary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "guests"

SHOW = """Package: redis-server
Version: 5:7.0.15-1
Depends: lsb-base (>= 3.2-14), redis-tools (= 5:7.0.15-1)

Package: redis-tools
Version: 5:7.0.15-1
Depends: adduser, libc6 (>= 2.34), libssl3 (>= 3.0.0) | libssl-alt, perl:any

Package: adduser
Version: 3.134
Depends: passwd

Package: libssl3
Version: 3.0.22
Pre-Depends: libc6 (>= 2.34)
Depends: libzz, zlib1g

Package: zlib1g
Version: 1:1.2.13
Section: libs
Depends: libc6

Package: passwd
Version: 1:4.13
Section: admin
Depends: libpam0g

Package: libc6
Version: 2.36
Depends: libgcc-s1

Package: libgcc-s1
Version: 12.2
Depends: gcc-12-base, libc6

Package: lsb-base
Version: 11.6
"""


def test_depends_fields_give_the_first_alternative_without_versions() -> None:
    assert debs.first_choices("libc6 (>= 2.34), a | b, perl:any, ") == ["libc6", "a", "perl"]
    found = debs.parse_stanzas(SHOW)
    assert found["libssl3"].depends == ("libc6", "libzz", "zlib1g")
    assert found["zlib1g"].library and not found["passwd"].library
    assert found["redis-tools"].version == "5:7.0.15-1"


def fake_show(asked: list[list[str]]) -> Callable[[Sequence[str]], dict[str, debs.Package]]:
    known = debs.parse_stanzas(SHOW)

    def show(names: Sequence[str]) -> dict[str, debs.Package]:
        asked.append(list(names))
        return {n: known[n] for n in names if n in known}

    return show


def test_closure_takes_direct_dependencies_and_libraries_only() -> None:
    asked: list[list[str]] = []
    got = debs.closure(["redis-server"], fake_show(asked))
    names = sorted(p.name for p in got)
    # adduser and passwd (dependencies of dependencies) and gcc-12-base are not
    # libraries; zlib1g is, by its section; libzz is unknown (virtual) and skipped.
    assert names == [
        "libc6",
        "libgcc-s1",
        "libssl3",
        "lsb-base",
        "redis-server",
        "redis-tools",
        "zlib1g",
    ]
    assert not any("libpam0g" in names for names in asked)  # passwd's deps: not followed


def test_closure_names_an_unknown_package() -> None:
    with pytest.raises(debs.PackageError, match="no-such-thing"):
        debs.closure(["no-such-thing"], fake_show([]))


def test_elf_dynamic_section_of_a_real_program() -> None:
    dyn = debs.read_dynamic(Path(sys.executable).resolve().read_bytes())
    assert dyn.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert "libc.so.6" in dyn.needed
    with pytest.raises(debs.PackageError, match="not a 64-bit"):
        debs.read_dynamic(b"#!/bin/sh\n", "script")
    with pytest.raises(debs.PackageError, match="malformed"):
        debs.read_dynamic(Path("/bin/ls").read_bytes()[:200], "ls")


def tree_with_ls(root: Path) -> None:
    """An unpacked tree like Debian's: /bin/ls, its libraries and the loader link."""
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy("/usr/bin/ls", root / "usr/bin/ls")
    (root / "usr/bin/dir").symlink_to("ls")
    libdir = root / "lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    for lib in ("libc.so.6", "ld-linux-x86-64.so.2", "libselinux.so.1", "libpcre2-8.so.0"):
        real = Path("/lib/x86_64-linux-gnu", lib).resolve()
        shutil.copy(real, libdir / real.name)
        if real.name != lib:
            (libdir / lib).symlink_to(real.name)
    (root / "lib64").mkdir()
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")


def test_needed_files_follow_links_and_libraries_inside_the_tree(tmp_path: Path) -> None:
    tree_with_ls(tmp_path)
    assert debs.programs([tmp_path]) == ["usr/bin/dir", "usr/bin/ls"]
    files = debs.needed_files(tmp_path, ["usr/bin/dir"])
    assert files[:2] == ["usr/bin/dir", "usr/bin/ls"]
    assert "lib64/ld-linux-x86-64.so.2" in files
    assert "lib/x86_64-linux-gnu/libc.so.6" in files
    assert "lib/x86_64-linux-gnu/libselinux.so.1" in files
    # A missing library is named, with who needs it.
    (tmp_path / "lib/x86_64-linux-gnu/libselinux.so.1").unlink()
    with pytest.raises(debs.PackageError, match=r"usr/bin/ls needs .*libselinux\.so\.1"):
        debs.needed_files(tmp_path, ["usr/bin/ls"])


def test_links_never_lead_out_of_the_tree(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/escape").symlink_to("../../../../etc/hostname")
    (tmp_path / "bin/loop").symlink_to("loop")
    with pytest.raises(FileNotFoundError):
        debs.resolve(tmp_path, "bin/escape")
    with pytest.raises(debs.PackageError, match="symlinks"):
        debs.resolve(tmp_path, "bin/loop")
    assert os.path.exists("/etc/hostname")


def test_the_redis_guest_file_loads() -> None:
    spec = load_guest_spec(EXAMPLES / "redis.toml")
    assert spec.packages == ("redis-server",)
    (redis,) = spec.services
    assert redis.port == 6379 and redis.dirs == ("/data/redis",)
    assert "--appendfsync always" in redis.run and "PING" in redis.ready


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "Bad Name"', "name must be"),
        ('name = "x"\npackages = ["ok", "Bad!"]', "packages must be"),
        ('name = "x"\nextra = 1', "unknown key"),
        ('name = "x"\n[[service]]\nname = "a"\nport = 0\nrun = "x"', r"service\[0\]\.port"),
        ('name = "x"\n[[service]]\nname = "a"\nport = 7000\nrun = "x"', "distinct"),
        ('name = "x"\n[[service]]\nname = "a"\nport = 1\nrun = "a\\nb"', "one shell command"),
        ('name = "x"\n[[service]]\nname = "a"\nport = 1\nrun = "x"\ndirs = ["rel"]', "absolute"),
        ("name = ", "not valid TOML"),
    ],
)
def test_bad_guest_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(GuestBuildError, match=message) as err:
        load_guest_spec(path)
    assert str(path) in str(err.value)


def test_services_script_quotes_every_argument() -> None:
    service = GuestService("db", 5432, "server --opt 'a b' $HOME", ("/data/db",), "true")
    assert services_script([service]).splitlines()[1] == (
        "start_service db 5432 /data/db 'server --opt '\"'\"'a b'\"'\"' $HOME' true"
    )


CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
    '"p99_latency_ms","max_latency_ms"\n"SET","512.30","7.1","1.2","5.3","20.1","88.0","301.5"\n'
)


def test_redis_benchmark_report_and_summary() -> None:
    report = benchmark_report(CSV)
    assert report["rps"] == 512.3 and report["p99_latency_ms"] == 88.0
    with pytest.raises(RedisLoadError, match="no SET row"):
        benchmark_report('"test","rps"\n"GET","1"\n')
    slow = {**report, "p50_latency_ms": 40.0, "p99_latency_ms": 900.0}
    runs = [
        {"requests": 1000, "errors": [], "report": report, "start": 0.0, "end": 2.0},
        {"requests": 0, "errors": ["Error: Connection reset by peer"], "start": 2.0, "end": 3.0},
        {"requests": 400, "errors": [], "report": slow, "start": 3.0, "end": 5.0},
    ]
    bench = combine(runs)
    # Weighted median of the medians, the worst p99, the rate over the finished runs.
    assert (bench["requests"], bench["latency_ms_p50"], bench["latency_ms_p99"]) == (
        1400,
        5.3,
        900.0,
    )
    assert bench["requests_per_s"] == 350.0 and bench["runs"] == 3
    writer = {"sent": 10, "acked": 9, "errors": []}
    s = summary(bench, writer, lost=0, fault_at=4.0)
    assert (s["errors"], s["resets"], s["fault_inside_a_run"]) == (1, 1, True)
    assert s["gap_ms"] == 301.5 and s["latency_ms_max"] == 301.5
    assert not summary(bench, writer, lost=0, fault_at=2.5)["fault_inside_a_run"]
    assert resets(["Error: Server closed the connection"]) == 0
