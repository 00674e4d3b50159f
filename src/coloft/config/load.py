"""TOML pair spec -> PairSpec. The only reader of spec files.

Every error names the file, the field and what is wrong; unknown keys are errors
(a typo must never silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from coloft.arbiter.base import parse_endpoint
from coloft.core.argv import tap_name
from coloft.core.lease import LeaseTiming, problems
from coloft.core.ports import HEARTBEAT, all_ports
from coloft.errors import ConfigError
from coloft.model.spec import (
    Accel,
    ArbiterSpec,
    HeartbeatSpec,
    NodeSpec,
    PairSpec,
    Policy,
    PolicySpec,
    ReprotectSpec,
    SecuritySpec,
    Tuning,
    VmSpec,
)

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NIC_MODELS = ("e1000", "virtio-net-pci", "rtl8139")
# Ports used on a node, as offsets from its port_base (see effects.argv).
PORTS_PER_NODE = 7
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 1024 * 1024


class _Reader:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, source: Path, where: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.where = where
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str | None, problem: str) -> ConfigError:
        field = f"{self.where}.{key}" if key else self.where
        return ConfigError(f"{self.source}: {field}: {problem}")

    def _get(self, key: str, kind: type[T], kind_name: str, default: T | None, required: bool) -> T:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.fail(key, "required field is missing")
            return default  # type: ignore[return-value]
        value = self.table[key]
        # bool is an int in Python; a spec saying `memory_mib = true` is wrong.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"expected {kind_name}, got {_describe(value)}")
        return value

    def string(self, key: str, default: str | None = None, required: bool = False) -> str:
        return self._get(key, str, "a string", default, required)

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, bool, "a boolean", default, False)

    def integer(
        self,
        key: str,
        default: int | None = None,
        required: bool = False,
        low: int | None = None,
        high: int | None = None,
        unit: str = "",
    ) -> int:
        value = self._get(key, int, "an integer", default, required)
        if value is not None and (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            raise self.fail(key, f"{value}{unit} is out of range {low}..{high}{unit}")
        return value

    def number(self, key: str, default: float, low: float, high: float, unit: str = "") -> float:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_describe(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"{value:g}{unit} is out of range {low:g}..{high:g}{unit}")
        return float(value)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a non-empty array of strings, got {_describe(value)}")
        return tuple(value)

    def path(self, key: str, required: bool = False) -> Path | None:
        text = self.string(key, required=required)
        if text is None:
            return None
        if not text:
            raise self.fail(key, "path is empty")
        p = Path(text)
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    def checked(
        self,
        key: str,
        check: Callable[[str], object],
        what: str,
        default: str | None = None,
        required: bool = False,
    ) -> str:
        value = self.string(key, default=default, required=required)
        if value is not None and not check(value):
            raise self.fail(key, f"{value!r} is not {what}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.fail(None, f"unknown key {unknown[0]!r} (known keys: {known})")


def _describe(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _service(r: _Reader) -> tuple[str, int] | None:
    text = r.string("service")
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not _is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise r.fail("service", f'{text!r} is not ADDRESS:PORT (e.g. "192.0.2.10:7000")')
    return host, int(port)


def _vm(source: Path, table: Mapping[str, Any]) -> VmSpec:
    r = _Reader(source, "[vm]", table)
    accel_text = r.checked(
        "accel", lambda v: v in {a.value for a in Accel}, "one of kvm, tcg, auto", default="auto"
    )
    vm = VmSpec(
        name=r.checked(
            "name",
            NAME_RE.match,
            "a name of lowercase letters, digits and '-' starting with a letter (max 31)",
            required=True,
        ),
        memory_mib=r.integer(
            "memory_mib", required=True, low=MIN_MEMORY_MIB, high=MAX_MEMORY_MIB, unit=" MiB"
        ),
        vcpus=r.integer("vcpus", default=1, low=1, high=64),
        disk=r.path("disk", required=True) or Path(),
        kernel=r.path("kernel"),
        initrd=r.path("initrd"),
        append=r.string("append"),
        nic_model=r.checked(
            "nic_model",
            lambda v: v in NIC_MODELS,
            f"a supported NIC model ({', '.join(NIC_MODELS)})",
            default="e1000",
        ),
        mac=r.checked(
            "mac",
            MAC_RE.match,
            "a lowercase MAC address like 52:54:00:12:34:56",
            default="52:54:00:c0:10:0a",
        ),
        machine=r.checked(
            "machine",
            lambda v: v == "pc" or v.startswith("pc-i440fx"),
            "an i440fx machine type ('pc'; q35 crashes COLO's secondary)",
            default="pc",
        ),
        accel=Accel(accel_text),
        service=_service(r),
    )
    r.finish()
    if (vm.initrd or vm.append) and not vm.kernel:
        raise ConfigError(f"{source}: [vm].kernel: required when initrd or append is set")
    return vm


def _node(source: Path, name: str, table: object) -> NodeSpec:
    where = f"[nodes.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where}: expected a table, got {_describe(table)}")
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: {where}: node name must be lowercase letters, digits, '-'")
    r = _Reader(source, where, table)
    node = NodeSpec(
        name=name,
        replication_address=r.checked(
            "replication_address", _is_ip, "an IP address", required=True
        ),
        bridge=r.checked(
            "bridge", IFNAME_RE.match, "an interface name (max 15 chars)", required=True
        ),
        port_base=r.integer("port_base", required=True, low=1024, high=65535 - PORTS_PER_NODE),
        netns=r.string("netns"),
        disk=r.path("disk"),
        run_dir=r.path("run_dir"),
        lan_address=r.checked("lan_address", _is_ip, "an IP address"),
    )
    r.finish()
    return node


def _tuning(source: Path, table: Mapping[str, Any]) -> Tuning:
    r = _Reader(source, "[tuning]", table)
    t = Tuning(
        checkpoint_interval_ms=r.integer(
            "checkpoint_interval_ms", default=2000, low=100, high=3_600_000, unit=" ms"
        ),
        compare_timeout_ms=r.integer(
            "compare_timeout_ms", default=3000, low=10, high=600_000, unit=" ms"
        ),
        expired_scan_cycle_ms=r.integer(
            "expired_scan_cycle_ms", default=1000, low=10, high=600_000, unit=" ms"
        ),
        max_queue_size=r.integer("max_queue_size", default=1024, low=16, high=1_000_000),
        migration_mib_s=r.integer(
            "migration_mib_s", default=1024, low=1, high=1_000_000, unit=" MiB/s"
        ),
        checkpoint_at_start=r.boolean("checkpoint_at_start", True),
    )
    r.finish()
    return t


def _arbiter(source: Path, table: Mapping[str, Any]) -> ArbiterSpec:
    r = _Reader(source, "[arbiter]", table)
    d = ArbiterSpec()
    endpoints = r.strings("endpoints", d.endpoints)
    for e in endpoints:
        try:
            parse_endpoint(e)
        except ConfigError as err:
            raise r.fail("endpoints", str(err)) from err
    embedded = r.string("embedded_netns")
    is_embedded = r.boolean("embedded", True)
    a = ArbiterSpec(
        endpoints=endpoints,
        embedded_netns=(embedded or "") if is_embedded else None,
        data_dir=r.path("data_dir") or d.data_dir,
        ttl_s=r.number("ttl_s", d.ttl_s, 2, 60, " s"),
        renew_every_s=r.number("renew_every_s", d.renew_every_s, 0.05, 30, " s"),
        call_deadline_s=r.number("call_deadline_s", d.call_deadline_s, 0.05, 30, " s"),
        fence_margin_s=r.number("fence_margin_s", d.fence_margin_s, 0.05, 30, " s"),
    )
    r.finish()
    if embedded and not is_embedded:
        raise r.fail("embedded_netns", "set, but embedded = false")
    if is_embedded and len(endpoints) != 1:
        raise r.fail("endpoints", "an embedded etcd has exactly one endpoint")
    timing = LeaseTiming(a.ttl_s, a.renew_every_s, a.call_deadline_s, a.fence_margin_s)
    for problem in problems(timing):
        raise r.fail(None, f"unsafe lease timing: {problem}")
    return a


def _heartbeat(source: Path, table: Mapping[str, Any]) -> HeartbeatSpec:
    r = _Reader(source, "[heartbeat]", table)
    h = HeartbeatSpec(
        interval_ms=r.integer("interval_ms", default=50, low=10, high=10_000, unit=" ms"),
        misses=r.integer("misses", default=3, low=2, high=100),
        port=r.integer("port", default=0, low=0, high=65535),
    )
    r.finish()
    return h


def _policy(source: Path, table: Mapping[str, Any]) -> PolicySpec:
    r = _Reader(source, "[policy]", table)
    choices = {p.value: p for p in Policy}
    names = ", ".join(choices)

    def one(key: str, default: Policy) -> Policy:
        return choices[r.checked(key, lambda v: v in choices, f"one of {names}", default.value)]

    d = PolicySpec()
    p = PolicySpec(
        mirror=one("mirror", d.mirror),
        compare_in=one("compare-in", d.compare_in),
        probe=one("probe", d.probe),
    )
    r.finish()
    return p


def _reprotect(source: Path, table: Mapping[str, Any]) -> ReprotectSpec:
    r = _Reader(source, "[reprotect]", table)
    d = ReprotectSpec()
    p = ReprotectSpec(
        auto=r.boolean("auto", d.auto),
        backoff_s=r.number("backoff_s", d.backoff_s, 0.1, 600, " s"),
        backoff_max_s=r.number("backoff_max_s", d.backoff_max_s, 0.1, 3600, " s"),
        disk_mib_s=r.integer("disk_mib_s", default=d.disk_mib_s, low=0, high=1_000_000),
        spare_after_s=r.number("spare_after_s", d.spare_after_s, 0.5, 86400, " s"),
    )
    r.finish()
    if p.backoff_max_s < p.backoff_s:
        raise r.fail("backoff_max_s", f"{p.backoff_max_s:g} s is below backoff_s {p.backoff_s:g} s")
    return p


def _security(source: Path, table: Mapping[str, Any]) -> SecuritySpec:
    r = _Reader(source, "[security]", table)
    d = SecuritySpec()
    modes = ("required", "off")
    p = SecuritySpec(
        replication=r.checked(
            "replication", lambda v: v in modes, "one of required, off", d.replication
        ),
        certs=r.path("certs"),
    )
    r.finish()
    return p


def parse_spec(source: Path, data: Mapping[str, Any]) -> PairSpec:
    """Validate an already-parsed TOML document."""
    top = _Reader(source, "spec", data)

    def table(key: str, required: bool) -> Mapping[str, Any]:
        top.used.add(key)
        value = data.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{source}: [{key}]: required table is missing")
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a table, got {_describe(value)}")
        return value

    vm = _vm(source, table("vm", True))
    nodes_table = table("nodes", True)
    nodes = [_node(source, name, t) for name, t in nodes_table.items()]
    names = [n.name for n in nodes]
    spare = top.string("spare", default="")
    if spare and spare not in names:
        raise ConfigError(f"{source}: spec.spare: {spare!r} is not one of the nodes {names}")
    wanted = 3 if spare else 2
    if len(nodes) != wanted:
        what = "two nodes and the spare" if spare else "exactly two nodes (three with `spare`)"
        raise ConfigError(f"{source}: [nodes]: a pair needs {what}, found {len(nodes)}")
    runs = [n for n in nodes if n.name != spare]
    primary = top.string("primary", default=runs[0].name)
    if primary not in names:
        raise ConfigError(f"{source}: spec.primary: {primary!r} is not one of the nodes {names}")
    if primary == spare:
        raise ConfigError(f"{source}: spec.primary: {primary!r} is the spare; name another node")
    runs.sort(key=lambda n: n.name != primary)
    nodes = runs + [n for n in nodes if n.name == spare]
    tuning = _tuning(source, table("tuning", False))
    arbiter = _arbiter(source, table("arbiter", False))
    heartbeat = _heartbeat(source, table("heartbeat", False))
    policy = _policy(source, table("policy", False))
    reprotect = _reprotect(source, table("reprotect", False))
    metrics = _Reader(source, "[metrics]", table("metrics", False))
    metrics_port = metrics.integer("port", default=0, low=0, high=65535)
    metrics.finish()
    security = _security(source, table("security", False))
    qemu = _Reader(source, "[qemu]", table("qemu", False))
    binary = qemu.path("binary")
    qemu.finish()
    top.finish()
    _cross_checks(source, vm, nodes)
    return PairSpec(
        source=source,
        vm=vm,
        nodes=tuple(nodes),
        tuning=tuning,
        qemu_binary=binary,
        arbiter=arbiter,
        heartbeat=heartbeat,
        policy=policy,
        reprotect=reprotect,
        metrics_port=metrics_port,
        security=security,
    )


def _cross_checks(source: Path, vm: VmSpec, nodes: list[NodeSpec]) -> None:
    for i, b in enumerate(nodes):
        for a in nodes[:i]:
            _apart(source, vm, a, b)


def _apart(source: Path, vm: VmSpec, a: NodeSpec, b: NodeSpec) -> None:
    if a.replication_address == b.replication_address:
        raise ConfigError(
            f"{source}: [nodes.{b.name}].replication_address: same as node "
            f"{a.name!r}; the nodes must be different hosts"
        )
    disks = {(a.disk or vm.disk), (b.disk or vm.disk)}
    # Without namespaces each node is a host of its own (an agent runs on each).
    same_host = a.netns is not None and a.netns == b.netns
    if same_host and len(disks) == 1:
        raise ConfigError(
            f"{source}: [nodes.{b.name}].disk: nodes {a.name!r} and {b.name!r} would open "
            f"{vm.disk} on the same host; give each node its own disk copy"
        )


def load_spec(path: Path) -> PairSpec:
    """Read and validate a spec file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read spec: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse_spec(path.resolve(), data)


def check_together(specs: Sequence[PairSpec], node: str) -> None:
    """Pairs one agent runs on host `node`: each has that node, names and TAP devices
    differ, and no channel port of one pair is a port of another on the same address
    (the metrics port is shared: one endpoint serves every pair; so may heartbeat
    ports be)."""
    seen: dict[str, Path] = {}
    taps: dict[str, str] = {}
    disks: dict[Path, str] = {}
    used: dict[tuple[str, int], str] = {}
    for spec in specs:
        names = [n.name for n in spec.nodes]
        if node not in names:
            raise ConfigError(f"{spec.source}: no node {node!r} (nodes: {', '.join(names)})")
        if spec.vm.name in seen:
            raise ConfigError(
                f"{spec.source}: VM name {spec.vm.name!r} is also the name in "
                f"{seen[spec.vm.name]}; each pair needs its own"
            )
        seen[spec.vm.name] = spec.source
        tap = tap_name(spec)
        if tap in taps:
            raise ConfigError(
                f"{spec.source}: VM names {taps[tap]!r} and {spec.vm.name!r} give the same "
                f"TAP device {tap!r} (its first 12 characters); make them differ there"
            )
        taps[tap] = spec.vm.name
        n = spec.node(node)
        disk = spec.disk_of(n).resolve()
        if disk in disks:
            raise ConfigError(
                f"{spec.source}: disk {disk} on node {node!r} is also pair {disks[disk]!r}'s"
            )
        disks[disk] = spec.vm.name
        # Channels listen on the replication address. Heartbeats are UDP, and an
        # agent's pairs share their sockets (effects.heartbeat.Hub): never a conflict.
        for address, p in [(n.replication_address, p) for p in all_ports(n)]:
            other = used.get((address, p))
            if other is not None:
                raise ConfigError(
                    f"{spec.source}: port {p} on {address} is also used by pair "
                    f"{other!r}; give the pairs port_base values at least "
                    f"{HEARTBEAT + 1} apart"
                )
            used[(address, p)] = spec.vm.name
    metrics = {(s.node(node).replication_address, s.metrics_port) for s in specs if s.metrics_port}
    for address, p in metrics:
        other = used.get((address, p))
        if other is not None:
            raise ConfigError(f"metrics port {p} on {address} is a channel port of pair {other!r}")
