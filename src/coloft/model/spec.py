"""A protected pair, as the operator describes it (validated by coloft.config)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Accel(Enum):
    KVM = "kvm"
    TCG = "tcg"
    AUTO = "auto"


@dataclass(frozen=True)
class VmSpec:
    name: str
    memory_mib: int
    vcpus: int
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    nic_model: str = "e1000"
    mac: str = "52:54:00:c0:10:0a"
    machine: str = "pc"
    accel: Accel = Accel.AUTO
    service: tuple[str, int] | None = None


@dataclass(frozen=True)
class NodeSpec:
    name: str
    replication_address: str
    bridge: str
    port_base: int
    netns: str | None = None
    disk: Path | None = None
    run_dir: Path | None = None
    # A second, independent path for the agents' heartbeats (the client LAN).
    lan_address: str | None = None


@dataclass(frozen=True)
class Tuning:
    checkpoint_interval_ms: int = 2000
    compare_timeout_ms: int = 3000
    expired_scan_cycle_ms: int = 1000
    max_queue_size: int = 1024
    # The migration's bandwidth cap (QEMU's own default, 128 MiB/s, makes the first
    # copy of a 256 MiB guest take 2 s with the guest paused).
    migration_mib_s: int = 1024
    # Checkpoint as soon as COLO runs: the secondary is proven (and may be named the
    # sync node) at once rather than one interval later.
    checkpoint_at_start: bool = True


@dataclass(frozen=True)
class ArbiterSpec:
    """Where the pair's leadership lease lives, and its timing (see core.lease)."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # Start a single etcd here (the lab's witness namespace, or "" for this host's
    # own namespace) with `coloft up`; None means an existing cluster.
    embedded_netns: str | None = ""
    data_dir: Path = Path("/run/coloft/etcd")
    ttl_s: float = 2.0
    renew_every_s: float = 0.5
    call_deadline_s: float = 0.4
    fence_margin_s: float = 0.4


@dataclass(frozen=True)
class HeartbeatSpec:
    interval_ms: int = 50
    misses: int = 3
    # One UDP port on every node for the heartbeats of all pairs that name it (0: each
    # pair its own, port_base + ports.HEARTBEAT).
    port: int = 0

    @property
    def timeout_s(self) -> float:
        return self.interval_ms * self.misses / 1000.0


class Policy(Enum):
    """What the agents do when one link of the comparison path breaks (core.policy)."""

    ALERT = "alert"
    REESTABLISH = "re-establish"
    RUN_ALONE = "run-alone"


@dataclass(frozen=True)
class PolicySpec:
    """The policy per reason that leaves a choice; the others always run alone."""

    mirror: Policy = Policy.REESTABLISH
    compare_in: Policy = Policy.REESTABLISH
    probe: Policy = Policy.ALERT

    def of(self, reason: str) -> Policy:
        """The policy for a reason's kind ("mirror", "compare-in", "probe")."""
        return {"mirror": self.mirror, "compare-in": self.compare_in, "probe": self.probe}.get(
            reason, Policy.RUN_ALONE
        )


@dataclass(frozen=True)
class ReprotectSpec:
    """Bringing a new secondary in after a failover (core.reprotect)."""

    auto: bool = True
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    # Cap of the disk copy to the new secondary; 0 = no cap.
    disk_mib_s: int = 0
    # With a spare node: how long a primary running alone waits for its lost
    # secondary to come back before it takes the spare as its new secondary.
    spare_after_s: float = 10.0


@dataclass(frozen=True)
class SecuritySpec:
    """TLS on the four replication channels (migration, NBD, mirror, compare-in)."""

    # "required": x509 with peer verification and the peer's name as the only
    # identity allowed; "off": plain TCP (a trusted, isolated replication network).
    replication: str = "required"
    # What `coloft certs` wrote: one directory per node under it (None: the
    # default /etc/coloft/tls/<vm name>).
    certs: Path | None = None

    @property
    def tls(self) -> bool:
        return self.replication == "required"


@dataclass(frozen=True)
class PairSpec:
    source: Path
    vm: VmSpec
    # The primary and the secondary the pair starts with, then the spare if any.
    nodes: tuple[NodeSpec, ...]
    tuning: Tuning
    qemu_binary: Path | None = None
    arbiter: ArbiterSpec = ArbiterSpec()
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    policy: PolicySpec = PolicySpec()
    reprotect: ReprotectSpec = ReprotectSpec()
    # Each agent serves GET /metrics on its replication address at this port (0: off).
    metrics_port: int = 0
    security: SecuritySpec = SecuritySpec()

    @property
    def primary(self) -> NodeSpec:
        return self.nodes[0]

    @property
    def secondary(self) -> NodeSpec:
        return self.nodes[1]

    @property
    def spare(self) -> NodeSpec | None:
        """A third node that may replace a lost one (it runs nothing until then)."""
        return self.nodes[2] if len(self.nodes) > 2 else None

    @property
    def first_members(self) -> tuple[str, str]:
        """The two nodes that run the pair until the arbiter records others."""
        return self.nodes[0].name, self.nodes[1].name

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def peer_of(self, name: str, members: tuple[str, ...] | None = None) -> NodeSpec:
        """The other member of the pair (the first members unless told otherwise)."""
        a, b = members or self.first_members
        return self.node(b if a == name else a)

    def disk_of(self, node: NodeSpec) -> Path:
        return node.disk if node.disk is not None else self.vm.disk

    def certs_dir(self) -> Path:
        return self.security.certs or Path("/etc/coloft/tls") / self.vm.name

    def certs_of(self, node: NodeSpec) -> Path:
        """The directory QEMU's tls-creds-x509 objects read on `node`."""
        return self.certs_dir() / node.name

    def run_dir_of(self, node: NodeSpec) -> Path:
        if node.run_dir is not None:
            return node.run_dir
        return Path("/run/coloft") / self.vm.name / node.name
