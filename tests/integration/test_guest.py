"""The lab guest boots under the lab QEMU, serves its durable store, survives SIGKILL.

Each test runs QEMU (TCG) inside a throwaway network namespace ``gtest-*`` that
holds a tap with 192.0.2.1/24; the guest is 192.0.2.10/24.  The client talks
to the guest from inside that namespace through ``ip netns exec``.  QEMU is
killed by pid and the namespace deleted in fixture teardown, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from coloft.effects.qemu_binary import lab_qemu
from coloft.lab.guest import (
    SERVICE_PORT,
    GuestImage,
    build_guest,
    guest_append,
    load_guest_spec,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HOST_CIDR = "192.0.2.1/24"
GUEST_IP = "192.0.2.10"
GUEST_CIDR = f"{GUEST_IP}/24"
GUEST_MAC = "52:54:00:c0:10:0a"
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")
BOOT_TIMEOUT = 45.0
READY = "coloft-guest: service up"
ERROR = "coloft-guest: ERROR"
REDIS_GUEST = Path(__file__).resolve().parents[2] / "examples" / "guests" / "redis.toml"
IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"

# Runs inside the namespace: argv[1] = number of connections; stdin lines are
# "<connection index>\t<request>"; prints one reply line per request.
_CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=10)
    except ConnectionRefusedError:
        print("REFUSED", flush=True)
        sys.exit(0)
    conns.append((s, s.makefile("rw", newline="\n")))
for line in sys.stdin:
    idx, request = line.rstrip("\n").split("\t", 1)
    _, f = conns[int(idx)]
    f.write(request + "\n")
    f.flush()
    reply = f.readline()
    print(reply.rstrip("\n") if reply else "EOF", flush=True)
for s, f in conns:
    f.close()
    s.close()
"""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def _qemu_binary() -> Path:
    found = lab_qemu()
    assert found is not None, "no lab QEMU in /var/cache/coloft/qemu/*/ (run make setup)"
    return found


@pytest.fixture(scope="module")
def qemu() -> Path:
    assert os.geteuid() == 0, "needs root (network namespaces, tap devices)"
    binary = _qemu_binary()
    missing = [d for d in FIRMWARE_DIRS if not Path(d).is_dir()]
    assert not missing, f"firmware dirs missing (qemu-system-data seabios ipxe-qemu): {missing}"
    return binary


@pytest.fixture(scope="module")
def image(qemu: Path) -> GuestImage:
    return build_guest()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"gtest-{uuid.uuid4().hex[:8]}"
    _run(IP, "netns", "add", name)
    try:
        _run(IP, "-n", name, "link", "set", "lo", "up")
        _run(IP, "-n", name, "tuntap", "add", "tap0", "mode", "tap")
        _run(IP, "-n", name, "addr", "add", HOST_CIDR, "dev", "tap0")
        _run(IP, "-n", name, "link", "set", "tap0", "up")
        yield name
    finally:
        subprocess.run([IP, "netns", "del", name], check=False, capture_output=True)


class Guest:
    """One QEMU process running the lab guest inside a namespace."""

    def __init__(self, qemu: Path, image: GuestImage, netns: str, disk: Path, log: Path) -> None:
        self.log = log
        self.stderr = log.with_suffix(".stderr")
        argv = [IP, "netns", "exec", netns, str(qemu)]
        argv += ["-accel", "tcg", "-machine", "pc", "-m", "128", "-smp", "1"]
        argv += ["-nographic", "-serial", f"file:{log}", "-monitor", "none"]
        for firmware in FIRMWARE_DIRS:
            argv += ["-L", firmware]
        argv += ["-kernel", str(image.kernel), "-initrd", str(image.initrd)]
        argv += ["-append", guest_append(GUEST_CIDR)]
        argv += ["-drive", f"if=none,id=d0,file={disk},format=raw"]
        argv += ["-device", "virtio-blk-pci,drive=d0"]
        argv += ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"]
        argv += ["-device", f"e1000,netdev=n0,mac={GUEST_MAC}"]
        with self.stderr.open("wb") as err:
            # `ip netns exec` execs QEMU: this pid is QEMU's.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def console(self) -> str:
        try:
            return self.log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_status(self, timeout: float = BOOT_TIMEOUT) -> str:
        """The guest's status line ("service up" or "ERROR ...")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.console().splitlines():
                if READY in line or ERROR in line:
                    return line[line.index("coloft-guest:") :].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"no status line from the guest (QEMU exit code {self.proc.poll()}); "
            f"console:\n{self.console()[-2000:]}\nQEMU stderr:\n{self.stderr.read_text()[-2000:]}"
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def boot(
    qemu: Path, image: GuestImage, netns: str, tmp_path: Path
) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def start(disk: Path, other: GuestImage | None = None) -> Guest:
        log = tmp_path / f"console-{len(guests)}.log"
        guest = Guest(qemu, other or image, netns, disk, log)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()


def talk(netns: str, requests: Sequence[tuple[int, str]], connections: int = 1) -> list[str]:
    """Send requests over `connections` persistent connections; one reply each."""
    done = subprocess.run(
        [
            *(IP, "netns", "exec", netns),
            *(sys.executable, "-c", _CLIENT, GUEST_IP, str(SERVICE_PORT), str(connections)),
        ],
        input="".join(f"{idx}\t{request}\n" for idx, request in requests),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"client failed: {done.stderr}"
    return done.stdout.splitlines()


def test_guest_serves_and_survives_sigkill(
    boot: Callable[..., Guest], image: GuestImage, netns: str, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.raw"
    shutil.copyfile(image.disk_template, disk)

    first = boot(disk)
    assert first.wait_status() == READY

    keys = [f"key-{i}.x_{i}" for i in range(20)]
    requests = [(0, "PING")]
    requests += [(i % 2, f"PUT {k} value-{i}") for i, k in enumerate(keys)]
    requests += [(1, f"GET {keys[3]}"), (0, "GET missing"), (0, "PUT bad/key v")]
    requests += [(1, "PUT k bad^value"), (0, "HELLO"), (1, f"PUT {'k' * 65} v")]
    requests += [(0, f"PUT {keys[0]} overwritten")]
    replies = talk(netns, requests, connections=2)
    assert replies[0] == "PONG"
    assert replies[1:21] == [f"OK {k}" for k in keys]
    assert replies[21:23] == [f"VAL {keys[3]} value-3", "NONE missing"]
    assert all(r.startswith("ERR ") for r in replies[23:27]), replies[23:27]
    assert replies[27] == f"OK {keys[0]}"

    # Hard kill right after the last acknowledgement: acknowledged means on disk.
    first.kill()

    second = boot(disk)
    assert second.wait_status() == READY
    replies = talk(netns, [(0, f"GET {k}") for k in keys])
    expected = [f"VAL {keys[0]} overwritten"]
    expected += [f"VAL {k} value-{i}" for i, k in enumerate(keys) if i > 0]
    assert replies == expected


def test_guest_reports_unmountable_disk_and_does_not_serve(
    boot: Callable[..., Guest], tmp_path: Path, netns: str
) -> None:
    disk = tmp_path / "blank.raw"
    with disk.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # no filesystem at all

    guest = boot(disk)
    status = guest.wait_status()
    assert status.startswith(ERROR), status
    assert "mount" in status
    assert READY not in guest.console()
    assert talk(netns, [(0, "PING")]) == ["REFUSED"]


def redis_cli(netns: str, *commands: str) -> list[str]:
    """Debian's redis-cli, one connection, commands on stdin: one reply line each."""
    done = subprocess.run(
        [IP, "netns", "exec", netns, "redis-cli", "-h", GUEST_IP, "-p", "6379"],
        input="".join(f"{c}\n" for c in commands),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"redis-cli failed: {done.stdout} {done.stderr}"
    return done.stdout.splitlines()


def test_redis_guest_from_debian_packages_keeps_acknowledged_writes(
    boot: Callable[..., Guest], image: GuestImage, netns: str, tmp_path: Path
) -> None:
    """The guest built from `packages = ["redis-server"]` runs Debian's Redis with its
    append-only file on the disk; a write it acknowledged survives a hard kill."""
    redis = build_guest(extra=load_guest_spec(REDIS_GUEST))
    assert redis.initrd != image.initrd
    disk = tmp_path / "disk.raw"
    shutil.copyfile(redis.disk_template, disk)

    first = boot(disk, redis)
    assert first.wait_status() == READY
    sets = [f"SET key:{i} value-{i}" for i in range(50)]
    assert redis_cli(netns, "PING", *sets, "CONFIG GET appendfsync") == [
        "PONG",
        *["OK"] * 50,
        "appendfsync",
        "always",
    ]
    assert talk(netns, [(0, "PING")]) == ["PONG"]  # the lab's own service runs beside it
    first.kill()

    second = boot(disk, redis)
    assert second.wait_status() == READY
    assert redis_cli(netns, *(f"GET key:{i}" for i in range(50))) == [
        f"value-{i}" for i in range(50)
    ]
