"""`coloft check`: can this spec run here? Each failed check says how to fix it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from coloft.core import ports
from coloft.core.argv import FIRMWARE_DIRS, tls_objects
from coloft.effects import qemu_binary
from coloft.effects.process import launch, wait_started
from coloft.effects.qmp import QmpSession
from coloft.errors import ColoftError
from coloft.model.spec import Accel, PairSpec

REQUIRED_COMMANDS = (
    "x-colo-lost-heartbeat",
    "query-colo-status",
    "nbd-server-start",
    "x-blockdev-change",
    "migrate-set-capabilities",
    "yank",
)
REQUIRED_TYPES = (
    "colo-compare",
    "filter-mirror",
    "filter-redirector",
    "filter-rewriter",
    "iothread",
)
WILDCARDS = ("0.0.0.0", "*", "::")
REQUIRED_DRIVERS = ("quorum", "replication", "nbd", "qcow2", "raw")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@contextlib.asynccontextmanager
async def _bare_qemu(binary: Path, extra: list[str]) -> AsyncIterator[Path]:
    """A QEMU with no machine and these extra arguments, up to its QMP socket (a QEMU
    that refuses them raises with its stderr); killed on leaving."""
    with tempfile.TemporaryDirectory(prefix="coloft-check-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        argv = [str(binary), "-machine", "none", "-nodefaults", "-display", "none", *extra]
        argv += ["-chardev", f"socket,id=m,path={sock},server=on,wait=off"]
        proc = launch("check", [*argv, "-mon", "chardev=m,mode=control"], None, Path(tmp))
        try:
            await wait_started(proc, sock)
            yield sock
        finally:
            proc.kill()


async def _schema(binary: Path) -> tuple[set[str], set[str], set[str], set[str]]:
    """Commands, QOM types, block drivers and migration capabilities QEMU offers."""
    async with _bare_qemu(binary, []) as sock:
        session = QmpSession("check", sock)
        try:
            await session.connect()
            schema = await session.execute("query-qmp-schema", deadline_s=10)
            types = await session.execute("qom-list-types", deadline_s=5)
        finally:
            await session.close()
    commands = {e["name"] for e in schema if e.get("meta-type") == "command"}
    objects = {str(t["name"]) for t in types}
    # Type names in the introspected schema are mangled, so find enums by their values.
    drivers: set[str] = set()
    caps: set[str] = set()
    for e in schema:
        if e.get("meta-type") == "enum":
            values = {m["name"] for m in e.get("members", [])} | set(e.get("values", []))
            # QuorumReadPattern has "quorum" too; the driver enum is the big one.
            if "quorum" in values and len(values) > len(drivers):
                drivers = values
            if "x-colo" in values:
                caps = values
    return commands, objects, drivers, caps


async def _starts_with(binary: Path, extra: list[str]) -> None:
    """QEMU starts with these extra arguments (else raises with its stderr)."""
    async with _bare_qemu(binary, extra):
        pass


TLS_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
    "heartbeat.key",
)


def tls_checks(spec: PairSpec, binary: Path) -> list[Check]:
    """The certificates of each node kept on this host load in QEMU. A real host
    holds only its own node's directory; at least one must be here."""
    here = [n for n in spec.nodes if spec.certs_of(n).is_dir()]
    if not here:
        return [
            Check(
                "tls certificates",
                False,
                f"no node directory under {spec.certs_dir()}",
                f"run `coloft certs {spec.source}` and copy each node's directory to its host, "
                'or set [security] replication = "off"',
            )
        ]
    checks = []
    for node in here:
        d = spec.certs_of(node)
        missing = [f for f in TLS_FILES if not (d / f).is_file()]
        detail = f"{d}: " + (f"missing {', '.join(missing)}" if missing else "all files present")
        if not missing:
            try:
                asyncio.run(_starts_with(binary, tls_objects(spec, node)))
                detail += "; QEMU loads them"
            except ColoftError as e:
                missing = ["QEMU refused them"]
                detail += f"; QEMU refused them: {e}"
        checks.append(
            Check(
                f"tls {node.name}",
                not missing,
                detail,
                ""
                if not missing
                else f"run `coloft certs {spec.source}` (keeps what exists); "
                "QEMU must be built with GnuTLS (make setup)",
            )
        )
    return checks


ARBITER_DEADLINE_S = 2.0


def arbiter_checks(spec: PairSpec) -> list[Check]:
    """An existing etcd cluster answers on each endpoint (an embedded one is started
    by `coloft up`, so there is nothing to reach yet: its binary must exist)."""
    from coloft.arbiter.embedded import ETCD_BINARY
    from coloft.arbiter.etcd import EtcdArbiter

    a = spec.arbiter
    if a.embedded_netns is not None:
        ok = ETCD_BINARY.exists()
        where = f"netns {a.embedded_netns}" if a.embedded_netns else "this host"
        return [
            Check(
                "arbiter",
                ok,
                f"embedded etcd on {a.endpoints[0]} ({where}), started by coloft up",
                "" if ok else "apt-get install etcd-server (or make setup)",
            )
        ]

    async def ask(endpoint: str) -> tuple[bool, str]:
        arbiter = EtcdArbiter([endpoint], deadline_s=ARBITER_DEADLINE_S)
        try:
            leader = await arbiter.leader(spec.vm.name)
        except ColoftError as e:
            return False, f"{endpoint}: no answer ({e})"
        finally:
            await arbiter.close()
        who = "none" if leader is None else f"{leader.node} (epoch {leader.epoch})"
        return True, f"etcd answers at {endpoint}; leader of {spec.vm.name}: {who}"

    checks = []
    for endpoint in a.endpoints:
        ok, detail = asyncio.run(ask(endpoint))
        fix = "check that etcd runs there and that firewalls on the way let TCP through"
        checks.append(Check(f"arbiter {endpoint}", ok, detail, "" if ok else fix))
    return checks


def _version(binary: Path) -> str:
    done = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False, timeout=10
    )
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else ""


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def listening_ports(netns: str | None) -> set[tuple[str, int]]:
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["ss", "-Htln"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    found: set[tuple[str, int]] = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            addr, _, port = fields[3].rpartition(":")
            with contextlib.suppress(ValueError):
                found.add((addr.strip("[]"), int(port)))
    return found


def _netns_exists(netns: str) -> bool:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return any(line.split()[0] == netns for line in done.stdout.splitlines() if line.strip())


def _bridge_exists(netns: str | None, bridge: str) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", bridge]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def run_checks(spec: PairSpec) -> list[Check]:
    checks: list[Check] = []
    try:
        choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
    except ColoftError as e:
        return [Check("qemu binary", False, str(e), "run `make setup`")]
    version = _version(choice.binary)
    checks.append(
        Check(
            "qemu binary",
            bool(version),
            f"{choice.binary}: {version or 'no version'} ({choice.why})",
            "" if version else "the binary does not run",
        )
    )
    kvm_ok, kvm_why = qemu_binary.kvm_usable()
    accel_ok = choice.accel is Accel.TCG or kvm_ok
    checks.append(
        Check(
            "accelerator",
            accel_ok,
            f"{choice.accel.value}; KVM: {kvm_why}",
            "" if accel_ok else 'set [vm].accel = "tcg" or "auto"',
        )
    )
    try:
        commands, objects, drivers, caps = asyncio.run(_schema(choice.binary))
    except ColoftError as e:
        checks.append(Check("qemu features", False, str(e), "check the QEMU binary"))
    else:
        missing = (
            [c for c in REQUIRED_COMMANDS if c not in commands]
            + [t for t in REQUIRED_TYPES if t not in objects]
            + [d for d in REQUIRED_DRIVERS if d not in drivers]
            + (["x-colo capability"] if "x-colo" not in caps else [])
        )
        checks.append(
            Check(
                "qemu features",
                not missing,
                "missing: " + ", ".join(missing)
                if missing
                else "colo-compare, filters, quorum, replication, x-colo present",
                "build QEMU with --enable-replication --enable-colo-proxy" if missing else "",
            )
        )
    if spec.security.tls:
        checks += tls_checks(spec, choice.binary)
    else:
        checks.append(
            Check(
                "replication security",
                True,
                "off: migration, NBD and packet channels are plain TCP; anyone who reaches "
                "a replication address can forge VM state or disk writes",
            )
        )
    checks += arbiter_checks(spec)
    firmware = [d for d in FIRMWARE_DIRS if not Path(d).is_dir()]
    checks.append(
        Check(
            "firmware",
            not firmware,
            "missing " + ", ".join(firmware) if firmware else "SeaBIOS and option ROMs present",
            "apt-get install qemu-system-data seabios ipxe-qemu" if firmware else "",
        )
    )
    need = 2 * spec.vm.memory_mib + spec.vm.memory_mib  # secondary 2x, plus the primary here
    avail = _mem_available_mib()
    checks.append(
        Check(
            "memory",
            avail >= need,
            f"{avail} MiB available; COLO needs 2x guest RAM on the secondary "
            f"({2 * spec.vm.memory_mib} MiB) plus {spec.vm.memory_mib} MiB here",
            "" if avail >= need else "lower [vm].memory_mib or free memory",
        )
    )
    for path, what in ((spec.vm.kernel, "kernel"), (spec.vm.initrd, "initrd")):
        if path is not None:
            checks.append(
                Check(
                    what,
                    path.is_file(),
                    str(path),
                    "" if path.is_file() else f"create {path} (lab: coloft lab up)",
                )
            )
    sizes = {}
    for node in spec.nodes:
        disk = spec.disk_of(node)
        ok = disk.is_file()
        sizes[node.name] = disk.stat().st_size if ok else -1
        checks.append(
            Check(
                f"disk {node.name}",
                ok,
                str(disk),
                "" if ok else f"copy the VM's disk image to {disk}",
            )
        )
    if all(s >= 0 for s in sizes.values()):
        same = len(set(sizes.values())) == 1
        checks.append(
            Check(
                "disk sizes",
                same,
                ", ".join(f"{n}: {s} bytes" for n, s in sizes.items()),
                "" if same else "both nodes need images of the same size",
            )
        )
    for node in spec.nodes:
        where = f"netns {node.netns}" if node.netns else "host"
        if node.netns and not _netns_exists(node.netns):
            checks.append(
                Check(
                    f"host {node.name}",
                    False,
                    f"{where} does not exist",
                    "create it (lab: coloft lab up)",
                )
            )
            continue
        bridge_ok = _bridge_exists(node.netns, node.bridge)
        checks.append(
            Check(
                f"bridge {node.name}",
                bridge_ok,
                f"{node.bridge} in {where}",
                "" if bridge_ok else f"create bridge {node.bridge}",
            )
        )
        listening = listening_ports(node.netns)
        ours = {*ports.all_ports(node), *([spec.metrics_port] if spec.metrics_port else [])}
        exposed = sorted(p for addr, p in listening if p in ours and addr in WILDCARDS)
        checks.append(
            Check(
                f"exposure {node.name}",
                not exposed,
                f"listening on every address: ports {exposed}"
                if exposed
                else f"nothing of ours listens beyond {node.replication_address}",
                "" if not exposed else "find what listens there (ss -tlnp) and stop it",
            )
        )
        taken = sorted(
            p
            for addr, p in listening
            if p in ports.all_ports(node)
            and addr in (*WILDCARDS, node.replication_address, "127.0.0.1")
        )
        checks.append(
            Check(
                f"ports {node.name}",
                not taken,
                f"{node.port_base}..{node.port_base + ports.NBD + 1}"
                + (f": in use: {taken}" if taken else " free"),
                "" if not taken else "stop what listens there or change port_base",
            )
        )
    return checks
