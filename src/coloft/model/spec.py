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


@dataclass(frozen=True)
class Tuning:
    checkpoint_interval_ms: int = 2000
    compare_timeout_ms: int = 3000
    expired_scan_cycle_ms: int = 1000
    max_queue_size: int = 1024


@dataclass(frozen=True)
class PairSpec:
    source: Path
    vm: VmSpec
    nodes: tuple[NodeSpec, NodeSpec]
    tuning: Tuning
    qemu_binary: Path | None = None

    @property
    def primary(self) -> NodeSpec:
        return self.nodes[0]

    @property
    def secondary(self) -> NodeSpec:
        return self.nodes[1]

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def disk_of(self, node: NodeSpec) -> Path:
        return node.disk if node.disk is not None else self.vm.disk

    def run_dir_of(self, node: NodeSpec) -> Path:
        if node.run_dir is not None:
            return node.run_dir
        return Path("/run/coloft") / self.vm.name / node.name
