"""Simulated hosts for the COLO lab: network namespaces, veths and bridges.

Layout (only TEST-NET addresses, no default routes, no NAT)::

    coloft-client   eth0 192.0.2.100/24
                      |
    coloft-lan      to-client --[lan0 bridge, no IP]-- to-a, to-b
                                                       |     |
    coloft-a        br0 192.0.2.1/24 -- uplink --------'     |
                    repl 198.51.100.1/24 -- to-a -.          |
    coloft-b        br0 192.0.2.2/24 -- uplink ---|----------'
                    repl 198.51.100.2/24 -- to-b -+--[repl0 bridge in coloft-rs]
    coloft-c        br0 192.0.2.3/24 -- uplink (to-c on lan0)
                    repl 198.51.100.3/24 -- to-c -'

Hosts a and b run the pair of examples/lab.toml; c is a third host for fleets of
pairs and spare nodes. The witness ``coloft-w`` (203.0.113.3) has a management link
to each host (a .1, b .2, c .4).

The VM's tap joins ``br0`` later (:func:`coloft.effects.tap.ensure_tap`); ``lo`` is up everywhere.

The topology is the declarative table :data:`HOSTS`: every host names its namespace, its
bridges and veth links (a link names the peer host and the peer's end); each link is declared
once, by one of its two hosts. Adding a host (e.g. a witness ``coloft-w`` on a 203.0.113.0/24
management network) is one more entry.

The lab is machine-global: hold :func:`lab_lock` around a session of use (tests do).
:func:`lab_down` also terminates processes left inside the lab namespaces.

Every veth is created in the root namespace under a temporary unique name (prefix
:data:`TEMP_PREFIX`), its ends are moved into their namespaces and renamed there: a final name
such as ``eth0`` would clash in the root namespace.

Fault injection: :func:`blackhole` silently drops all traffic on an interface both ways with
nftables (table ``coloft_fault`` in the ``inet``, ``bridge`` and ``arp`` families, so routed,
local, bridged and ARP traffic are all covered); :func:`link_down` takes it down visibly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coloft.effects.process import netns_argv

__all__ = [
    "CLIENT_NS",
    "GUEST_CIDR",
    "GUEST_IP",
    "GUEST_MAC",
    "HOSTS",
    "HOST_IFACES",
    "HOST_NS",
    "LOCK_PATH",
    "NS_PREFIX",
    "REPLICATION_IP",
    "TEMP_PREFIX",
    "VM_BRIDGE",
    "WITNESS_IP",
    "WITNESS_NS",
    "Bridge",
    "Host",
    "LabError",
    "Peer",
    "Veth",
    "blackhole",
    "blackholed",
    "break_channel",
    "heal",
    "isolate",
    "lab_down",
    "lab_lock",
    "lab_status",
    "lab_up",
    "link_down",
    "link_up",
    "mend_channels",
    "netns_argv",
    "unblackhole",
]

# --------------------------------------------------------------------------------------------
# Topology


@dataclass(frozen=True)
class Bridge:
    """A Linux bridge inside a host's namespace."""

    name: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peer:
    """The far end of a veth: its host key (in :data:`HOSTS`), name, addresses, bridge."""

    host: str
    name: str
    addrs: tuple[str, ...] = ()
    master: str | None = None


@dataclass(frozen=True)
class Veth:
    """A veth pair owned by a host: the local end's name/addresses/bridge, and the peer."""

    name: str
    peer: Peer
    addrs: tuple[str, ...] = ()
    master: str | None = None


@dataclass(frozen=True)
class Host:
    """One simulated machine: a namespace with bridges and the veth links it declares."""

    ns: str
    bridges: tuple[Bridge, ...] = ()
    links: tuple[Veth, ...] = field(default_factory=tuple)


NS_PREFIX = "coloft-"
#: Temporary names of veth ends before they are moved and renamed (<= 15 characters).
TEMP_PREFIX = "coloft-t"

VM_BRIDGE = "br0"
GUEST_IP = "192.0.2.10"
GUEST_CIDR = "192.0.2.10/24"
GUEST_MAC = "52:54:00:c0:10:0a"
CLIENT_NS = "coloft-client"
WITNESS_NS = "coloft-w"
WITNESS_IP = "203.0.113.3"
#: Every link a lab host has to the world: blackholing all of them isolates it.
HOST_IFACES = ("uplink", "repl", "mgmt")

#: The topology. Each link (veth pair) is declared once, by one of its two hosts.
HOSTS: dict[str, Host] = {
    "lan": Host(ns="coloft-lan", bridges=(Bridge("lan0"),)),
    # The replication network: a switch of its own, so that any two hosts can pair.
    "rs": Host(ns="coloft-rs", bridges=(Bridge("repl0"),)),
    **{
        key: Host(
            ns=f"coloft-{key}",
            bridges=(Bridge(VM_BRIDGE, (f"192.0.2.{i}/24",)),),
            links=(
                Veth("uplink", master=VM_BRIDGE, peer=Peer("lan", f"to-{key}", master="lan0")),
                Veth(
                    "repl",
                    addrs=(f"198.51.100.{i}/24",),
                    peer=Peer("rs", f"to-{key}", master="repl0"),
                ),
            ),
        )
        for i, key in enumerate(("a", "b", "c"), start=1)
    },
    "client": Host(
        ns=CLIENT_NS,
        links=(
            Veth("eth0", addrs=("192.0.2.100/24",), peer=Peer("lan", "to-client", master="lan0")),
        ),
    ),
    # The witness: runs the embedded etcd, reachable from each host on its own network.
    "w": Host(
        ns=WITNESS_NS,
        bridges=(Bridge("mgmt0", (f"{WITNESS_IP}/24",)),),
        links=(
            Veth("to-a", master="mgmt0", peer=Peer("a", "mgmt", ("203.0.113.1/24",))),
            Veth("to-b", master="mgmt0", peer=Peer("b", "mgmt", ("203.0.113.2/24",))),
            Veth("to-c", master="mgmt0", peer=Peer("c", "mgmt", ("203.0.113.4/24",))),
        ),
    ),
}

HOST_NS: dict[str, str] = {k: HOSTS[k].ns for k in ("a", "b", "c")}
REPLICATION_IP: dict[str, str] = {"a": "198.51.100.1", "b": "198.51.100.2", "c": "198.51.100.3"}

_CMD_TIMEOUT_S = 30.0
_FAULT_TABLE = "coloft_fault"
_FAULT_SET = "ifaces"


class LabError(Exception):
    """A lab command failed; the message names the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        rc = "timed out" if returncode is None else f"exit status {returncode}"
        super().__init__(f"command failed ({rc}): {' '.join(self.argv)}: {self.stderr or '-'}")


# --------------------------------------------------------------------------------------------
# Command helpers


def _run(
    argv: Sequence[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            check=False,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=_CMD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(argv, None, f"no answer within {_CMD_TIMEOUT_S:.0f} s") from exc
    except FileNotFoundError as exc:
        raise LabError(argv, 127, f"{argv[0]}: not installed ({exc})") from exc
    if check and proc.returncode != 0:
        raise LabError(argv, proc.returncode, proc.stderr)
    return proc


def _ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] if ns is None else ["ip", "-n", ns]
    return _run([*argv, *args], check=check)


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    # Lines look like "coloft-a (id: 3)" or just "coloft-a".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links(ns: str | None) -> dict[str, dict[str, Any]]:
    """``ip -j -d link show`` of a namespace as {ifname: entry}."""
    out = _ip(ns, "-j", "-d", "link", "show").stdout
    entries: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return {str(e["ifname"]): e for e in entries}


def _addrs(ns: str | None) -> dict[str, list[str]]:
    """IPv4 addresses per interface as {ifname: ["a.b.c.d/len", ...]}."""
    out = _ip(ns, "-j", "-4", "addr", "show").stdout
    entries: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    result: dict[str, list[str]] = {}
    for e in entries:
        infos = e.get("addr_info", [])
        result[str(e["ifname"])] = [f"{a['local']}/{a['prefixlen']}" for a in infos]
    return result


def _kind(entry: Mapping[str, Any]) -> str | None:
    info = entry.get("linkinfo")
    if isinstance(info, dict):
        kind = info.get("info_kind")
        return str(kind) if kind is not None else None
    return None


def _is_up(entry: Mapping[str, Any]) -> bool:
    return "UP" in entry.get("flags", [])


def _ns_sysctl(ns: str, key: str, value: str) -> None:
    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])


def _ns_path_exists(ns: str, path: str) -> bool:
    return _run(["ip", "netns", "exec", ns, "test", "-e", path], check=False).returncode == 0


# --------------------------------------------------------------------------------------------
# Lock

#: The lab is machine-global (fixed namespace names): concurrent users must take turns.
LOCK_PATH = Path("/run/lock/coloft-lab.lock")


@contextlib.contextmanager
def lab_lock(timeout_s: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide lab lock (``flock`` on :data:`LOCK_PATH`) for a whole session
    of lab use, e.g. a test fixture doing ``lab_up`` ... ``lab_down``. Not re-entrant; the
    lab functions themselves do not take it."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(
                        ["flock", str(LOCK_PATH)], None, f"lab busy for {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# lab_up


def _ensure_namespace(ns: str, existing: list[str]) -> None:
    if ns in existing:
        # A stale /run/netns entry (e.g. left by a crash mid-delete) is not usable: recreate it.
        if _ip(ns, "link", "show", "lo", check=False).returncode == 0:
            return
        _run(["ip", "netns", "delete", ns], check=False)
    _run(["ip", "netns", "add", ns])


def _configure_namespace(ns: str) -> None:
    _ip(ns, "link", "set", "lo", "up")
    # No IPv6 in the lab: only TEST-NET IPv4 addresses, no link-local noise on the bridges
    # (colo-compare never compares IPv6 and the guest runs with ipv6.disable=1).
    _ns_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
    _ns_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
    # br_netfilter (loaded on this machine) would pass bridged frames through iptables.
    if _ns_path_exists(ns, "/proc/sys/net/bridge"):
        for proto in ("iptables", "ip6tables", "arptables"):
            key = f"/proc/sys/net/bridge/bridge-nf-call-{proto}"
            if _ns_path_exists(ns, key):
                _ns_sysctl(ns, f"net.bridge.bridge-nf-call-{proto}", "0")


def _ensure_addrs(ns: str, ifname: str, wanted: Sequence[str], current: Sequence[str]) -> None:
    for addr in current:
        if addr not in wanted:
            _ip(ns, "addr", "del", addr, "dev", ifname)
    for addr in wanted:
        if addr not in current:
            _ip(ns, "addr", "add", addr, "dev", ifname)


def _ensure_bridge(ns: str, bridge: Bridge) -> None:
    links = _links(ns)
    entry = links.get(bridge.name)
    if entry is not None and _kind(entry) != "bridge":
        _ip(ns, "link", "del", bridge.name)
        entry = None
    if entry is None:
        _ip(
            ns, "link", "add", bridge.name, "type", "bridge", "stp_state", "0", "forward_delay", "0"
        )
    else:
        _ip(
            ns, "link", "set", bridge.name, "type", "bridge", "stp_state", "0", "forward_delay", "0"
        )
    # A fixed MAC: a bridge otherwise takes the lowest MAC among its ports, so the host's
    # address would move to a new MAC whenever a VM tap comes or goes.
    mac = _bridge_mac(ns, bridge.name)
    if (entry or {}).get("address") != mac:
        _ip(ns, "link", "set", bridge.name, "address", mac)
    _ensure_addrs(ns, bridge.name, bridge.addrs, _addrs(ns).get(bridge.name, []))
    _ip(ns, "link", "set", bridge.name, "up")


def _bridge_mac(ns: str, name: str) -> str:
    """A stable locally administered unicast MAC for a lab bridge."""
    digest = hashlib.sha256(f"{ns}/{name}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def _veth_pair_ok(local: Mapping[str, Any] | None, remote: Mapping[str, Any] | None) -> bool:
    """Both ends exist, are veths and point at each other's ifindex."""
    if local is None or remote is None:
        return False
    if _kind(local) != "veth" or _kind(remote) != "veth":
        return False
    return local.get("link_index") == remote.get("ifindex") and remote.get(
        "link_index"
    ) == local.get("ifindex")


def _create_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    tag = secrets.token_hex(3)
    tmp_a, tmp_b = f"{TEMP_PREFIX}{tag}a", f"{TEMP_PREFIX}{tag}b"
    try:
        _ip(None, "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _ip(None, "link", "set", tmp_a, "netns", ns_a)
        _ip(None, "link", "set", tmp_b, "netns", ns_b)
        _ip(ns_a, "link", "set", tmp_a, "name", name_a)
        _ip(ns_b, "link", "set", tmp_b, "name", name_b)
    except LabError:
        # Deleting either end deletes the pair, wherever it is now.
        for ns, tmp in ((None, tmp_a), (None, tmp_b), (ns_a, tmp_a), (ns_b, tmp_b)):
            _ip(ns, "link", "del", tmp, check=False)
        raise


def _ensure_end(ns: str, name: str, addrs: Sequence[str], master: str | None) -> None:
    entry = _links(ns)[name]
    current_master = entry.get("master")
    if master is not None and current_master != master:
        _ip(ns, "link", "set", name, "master", master)
    elif master is None and current_master is not None:
        _ip(ns, "link", "set", name, "nomaster")
    _ensure_addrs(ns, name, addrs, _addrs(ns).get(name, []))
    _ip(ns, "link", "set", name, "up")


def _ensure_veth(host: Host, veth: Veth) -> None:
    peer_ns = HOSTS[veth.peer.host].ns
    local = _links(host.ns).get(veth.name)
    remote = _links(peer_ns).get(veth.peer.name)
    if not _veth_pair_ok(local, remote):
        if local is not None:
            _ip(host.ns, "link", "del", veth.name, check=False)
        if remote is not None:
            _ip(peer_ns, "link", "del", veth.peer.name, check=False)
        _create_veth(host.ns, veth.name, peer_ns, veth.peer.name)
    _ensure_end(host.ns, veth.name, veth.addrs, veth.master)
    _ensure_end(peer_ns, veth.peer.name, veth.peer.addrs, veth.peer.master)


def _remove_temp_links(ns: str | None) -> list[str]:
    removed = []
    for name in _links(ns):
        if name.startswith(TEMP_PREFIX):
            _ip(ns, "link", "del", name, check=False)
            removed.append(name)
    return removed


def lab_up() -> None:
    """Create or repair the lab; leaves what is already right untouched. Idempotent."""
    _remove_temp_links(None)
    existing = _namespaces()
    for host in HOSTS.values():
        _ensure_namespace(host.ns, existing)
    for host in HOSTS.values():
        _configure_namespace(host.ns)
        _remove_temp_links(host.ns)
    for host in HOSTS.values():
        for bridge in host.bridges:
            _ensure_bridge(host.ns, bridge)
    for host in HOSTS.values():
        for veth in host.links:
            _ensure_veth(host, veth)


# --------------------------------------------------------------------------------------------
# lab_down


def _kill_ns_processes(ns: str, grace_s: float = 2.0) -> list[int]:
    """Terminate processes still living in a namespace (e.g. a QEMU left by a crashed test).

    Deleting a namespace only unmounts its name: a process inside keeps it, its veths and
    taps alive and invisible.
    """
    proc = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _pid_alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def lab_down(*, kill_processes: bool = True) -> None:
    """Remove every ``coloft-*`` namespace and leftover temporary veths. Idempotent.

    With ``kill_processes`` (the default), processes still running inside those namespaces
    are terminated first (SIGTERM, then SIGKILL after 2 s), else they would keep the
    namespace alive after its name is gone.
    """
    errors: list[LabError] = []
    for ns in _namespaces():
        if not ns.startswith(NS_PREFIX):
            continue
        if kill_processes:
            _kill_ns_processes(ns)
        try:
            _run(["ip", "netns", "delete", ns])
        except LabError as exc:
            errors.append(exc)
    _remove_temp_links(None)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------
# lab_status


def _expected_ifaces(host_key: str) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    """{ifname: (kind, addrs, master)} expected in a host's namespace."""
    host = HOSTS[host_key]
    want: dict[str, tuple[str, tuple[str, ...], str | None]] = {"lo": ("lo", (), None)}
    for bridge in host.bridges:
        want[bridge.name] = ("bridge", bridge.addrs, None)
    for veth in host.links:
        want[veth.name] = ("veth", veth.addrs, veth.master)
    for other in HOSTS.values():
        for veth in other.links:
            if veth.peer.host == host_key:
                want[veth.peer.name] = ("veth", veth.peer.addrs, veth.peer.master)
    return want


def lab_status() -> dict[str, object]:
    """JSON-able state of the lab: namespaces, links (up, carrier, master, addresses),
    blackholed interfaces, and a list of ``problems`` (empty and ``ok`` true when the lab
    matches :data:`HOSTS`)."""
    existing = _namespaces()
    problems: list[str] = []
    hosts: dict[str, object] = {}
    for key, host in HOSTS.items():
        info: dict[str, object] = {"ns": host.ns, "exists": host.ns in existing}
        hosts[key] = info
        if host.ns not in existing:
            problems.append(f"namespace {host.ns} missing")
            continue
        try:
            links = _links(host.ns)
            addrs = _addrs(host.ns)
        except LabError as exc:
            problems.append(f"namespace {host.ns} unusable: {exc}")
            continue
        link_info: dict[str, object] = {}
        for name, entry in links.items():
            link_info[name] = {
                "kind": _kind(entry) or ("lo" if name == "lo" else None),
                "up": _is_up(entry),
                "operstate": entry.get("operstate"),
                "carrier": "NO-CARRIER" not in entry.get("flags", []),
                "master": entry.get("master"),
                "mac": entry.get("address"),
                "addrs": addrs.get(name, []),
            }
        info["links"] = link_info
        for name, (kind, want_addrs, master) in _expected_ifaces(key).items():
            found = links.get(name)
            if found is None:
                problems.append(f"{host.ns}: {name} missing")
                continue
            if kind != "lo" and _kind(found) != kind:
                problems.append(f"{host.ns}: {name} is {_kind(found)}, expected {kind}")
            if not _is_up(found):
                problems.append(f"{host.ns}: {name} is down")
            if master is not None and found.get("master") != master:
                problems.append(f"{host.ns}: {name} not enslaved to {master}")
            missing = [a for a in want_addrs if a not in addrs.get(name, [])]
            if missing:
                problems.append(f"{host.ns}: {name} lacks {', '.join(missing)}")
            extra = [a for a in addrs.get(name, []) if kind != "lo" and a not in want_addrs]
            if extra:
                problems.append(f"{host.ns}: {name} has unexpected {', '.join(extra)}")
        try:
            holes = blackholed(host.ns)
        except LabError as exc:
            problems.append(f"{host.ns}: cannot read nftables: {exc}")
            holes = []
        info["blackholed"] = holes
    root_temp = [n for n in _links(None) if n.startswith(TEMP_PREFIX)]
    if root_temp:
        problems.append(f"leftover temporary veths in the root namespace: {root_temp}")
    return {
        "ok": not problems,
        "problems": problems,
        "hosts": hosts,
        "other_coloft_namespaces": sorted(
            ns
            for ns in existing
            if ns.startswith(NS_PREFIX) and ns not in {h.ns for h in HOSTS.values()}
        ),
        "root_temp_links": root_temp,
    }


# --------------------------------------------------------------------------------------------
# Fault injection


_FAULT_FAMILIES = ("inet", "bridge", "arp")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")


def _check_ifname(iface: str) -> None:
    if not _IFNAME_RE.fullmatch(iface):
        raise ValueError(f"not a valid interface name: {iface!r}")


def _fault_ruleset(ifaces: Sequence[str]) -> str:
    """One atomic nft transaction replacing the fault tables with ``ifaces`` blackholed.

    inet: routed and local IP traffic; bridge: frames bridged through a port (they never reach
    the inet hooks); arp: ARP on non-bridged interfaces. No interfaces: the tables are removed.
    """
    out: list[str] = []
    elems = ", ".join(f'"{i}"' for i in sorted(set(ifaces)))
    for family in _FAULT_FAMILIES:
        # "add" then "delete" makes the delete safe when the table does not exist yet.
        out.append(f"add table {family} {_FAULT_TABLE}")
        out.append(f"delete table {family} {_FAULT_TABLE}")
        if not ifaces:
            continue
        out.append(f"table {family} {_FAULT_TABLE} {{")
        out.append(f"  set {_FAULT_SET} {{ type ifname; elements = {{ {elems} }}; }}")
        out.append(
            "  chain input { type filter hook input priority -300; policy accept;"
            f" iifname @{_FAULT_SET} drop; }}"
        )
        out.append(
            "  chain output { type filter hook output priority -300; policy accept;"
            f" oifname @{_FAULT_SET} drop; }}"
        )
        if family != "arp":
            out.append(
                "  chain forward { type filter hook forward priority -300; policy accept;"
                f" iifname @{_FAULT_SET} drop; oifname @{_FAULT_SET} drop; }}"
            )
        out.append("}")
    return "\n".join(out) + "\n"


def blackholed(ns: str) -> list[str]:
    """Interfaces of ``ns`` currently blackholed by :func:`blackhole`."""
    argv = ["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", _FAULT_TABLE, _FAULT_SET]
    proc = _run(argv, check=False)
    if proc.returncode != 0:
        if "No such file" in proc.stderr or "does not exist" in proc.stderr:
            return []
        raise LabError(argv, proc.returncode, proc.stderr)
    data = json.loads(proc.stdout)
    for item in data.get("nftables", []):
        if "set" in item:
            elems = item["set"].get("elem", [])
            return sorted(str(e) for e in elems)
    return []


def _set_blackholed(ns: str, ifaces: Sequence[str]) -> None:
    _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=_fault_ruleset(ifaces))


def blackhole(ns: str, iface: str) -> None:
    """Silently drop all traffic in both directions on ``iface`` in ``ns`` (nftables).

    The link stays up with carrier; sockets see nothing but silence. Idempotent.
    """
    _check_ifname(iface)
    current = blackholed(ns)
    if iface not in current:
        _set_blackholed(ns, [*current, iface])


def unblackhole(ns: str, iface: str) -> None:
    """Undo :func:`blackhole`; removes the tables once nothing is blackholed. Idempotent."""
    _check_ifname(iface)
    _set_blackholed(ns, [i for i in blackholed(ns) if i != iface])


def link_down(ns: str, iface: str) -> None:
    """Administratively take ``iface`` down (visible: the veth peer loses carrier)."""
    _ip(ns, "link", "set", iface, "down")


def link_up(ns: str, iface: str) -> None:
    """Bring ``iface`` back up."""
    _ip(ns, "link", "set", iface, "up")


def isolate(ns: str) -> None:
    """Blackhole every link of a lab host at once (one nft transaction)."""
    _set_blackholed(ns, HOST_IFACES)


def heal(ns: str) -> None:
    """Lift every blackhole in ``ns``."""
    _set_blackholed(ns, [])


_CHANNEL_TABLE = "coloft_chan"


DIRECTIONS = ("both", "out", "in")


# A reset sent in answer to a segment must itself get through the output rule.
_RESET = "tcp flags & rst == 0 reject with tcp reset"
# "cut" resets only segments longer than this (IP length, bytes). Each packet on a
# COLO channel is written in pieces, length first (4 bytes; 26 in a TLS record)
# and the frame after it (a TCP frame is 54 bytes or more): the length gets
# through, the frame does not, so the connection dies inside a packet.
CUT_ABOVE = 110
VERDICTS = {"drop": "drop", "reset": _RESET, "cut": f"ip length > {CUT_ABOVE} {_RESET}"}


def channel_fault_ruleset(
    iface: str, ports: Sequence[int], mode: str, direction: str = "both"
) -> str:
    """nft rules that drop, reset with TCP RST, or cut (reset inside a packet) the TCP
    segments to or from `ports` on `iface` (one channel's connection, the rest of the
    link untouched): those leaving this host (`out`), arriving (`in`), or both."""
    if mode not in VERDICTS:
        raise ValueError(f"mode must be one of {', '.join(VERDICTS)}, not {mode!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    _check_ifname(iface)
    verdict = VERDICTS[mode]
    elems = ", ".join(str(p) for p in sorted(set(ports)))
    out = [f"add table inet {_CHANNEL_TABLE}", f"delete table inet {_CHANNEL_TABLE}"]
    if ports:
        match_in = f'iifname "{iface}" tcp dport {{ {elems} }} {verdict}; '
        match_in += f'iifname "{iface}" tcp sport {{ {elems} }} {verdict};'
        match_out = f'oifname "{iface}" tcp dport {{ {elems} }} {verdict}; '
        match_out += f'oifname "{iface}" tcp sport {{ {elems} }} {verdict};'
        hook = "type filter hook {} priority -300; policy accept;"
        out.append(f"table inet {_CHANNEL_TABLE} {{")
        if direction != "out":
            out.append(f"  chain input {{ {hook.format('input')} {match_in} }}")
        if direction != "in":
            out.append(f"  chain output {{ {hook.format('output')} {match_out} }}")
        out.append("}")
    return "\n".join(out) + "\n"


def break_channel(
    ns: str, iface: str, ports: Sequence[int], mode: str, direction: str = "both"
) -> None:
    """Silently drop (``drop``), reset (``reset``) or reset inside a packet (``cut``)
    the TCP connections on ``ports``."""
    _run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        stdin=channel_fault_ruleset(iface, ports, mode, direction),
    )


def mend_channels(ns: str) -> None:
    """Undo :func:`break_channel` in ``ns``; idempotent."""
    _run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=channel_fault_ruleset("lo", [], "drop")
    )
