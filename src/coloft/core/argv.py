"""QEMU command lines, built from the spec. Pure: no file or process is touched.

Only what must exist at start is on the command line: the VM, its tap, the quorum
disk (a quorum cannot be inserted later) and, on a secondary, the replication
stack under it. Everything COLO adds at run time (filters, colo-compare, the
replication child on the primary) comes from the bring-up steps, so the same
steps can later protect a VM that already runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coloft.core.compare_log import TRACE_EVENTS
from coloft.model.spec import Accel, NodeSpec, PairSpec
from coloft.model.steps import Role

# Node and device ids that the choreographies refer to.
DISK_ID = "colo-disk0"
SECONDARY_PARENT = "parent0"
SECONDARY_CHILD = "childs0"
NETDEV_ID = "hn0"
# TLS objects every node has when replication is encrypted, whatever its role: a
# secondary that takes over serves and connects the other way round.
TLS_SERVER = "tls-server"
TLS_CLIENT = "tls-client"
TLS_PEERS = "tls-peers"
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")


@dataclass(frozen=True)
class RunPaths:
    """Files of one node's QEMU, all under the node's run directory."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def qmp_oob(self) -> Path:
        # A second monitor keeps the out-of-band path (yank) free when the first hangs.
        return self.run_dir / "qmp-oob.sock"

    @property
    def qmp_watch(self) -> Path:
        # A third monitor for observers that check the agents (the lab's oracles).
        return self.run_dir / "qmp-watch.sock"

    @property
    def qmp_poll(self) -> Path:
        # A fourth monitor for the agent's steady polls, read without waiting (effects.qmp_poll).
        return self.run_dir / "qmp-poll.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def active(self) -> Path:
        return self.run_dir / "active.qcow2"

    @property
    def hidden(self) -> Path:
        return self.run_dir / "hidden.qcow2"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"


def tap_name(spec: PairSpec) -> str:
    # Interface names are at most 15 characters.
    return f"ct-{spec.vm.name}"[:15]


def tls_objects(spec: PairSpec, node: NodeSpec) -> list[str]:
    """Credentials for both ends and the allow-list of identities: the certificate
    names of the pair's other nodes only (its peer, and the spare that may replace
    it while this QEMU runs)."""
    d = spec.certs_of(node)
    others = [n.name for n in spec.nodes if n.name != node.name]
    peers = {
        "qom-type": "authz-list",
        "id": TLS_PEERS,
        "policy": "deny",
        "rules": [{"match": f"CN={o}", "policy": "allow", "format": "exact"} for o in others],
    }
    return [
        "-object",
        f"tls-creds-x509,id={TLS_SERVER},endpoint=server,dir={d},verify-peer=on",
        "-object",
        f"tls-creds-x509,id={TLS_CLIENT},endpoint=client,dir={d},verify-peer=on",
        "-object",
        json.dumps(peers, separators=(",", ":")),
    ]


def qemu_argv(spec: PairSpec, node: NodeSpec, role: Role, binary: Path, accel: Accel) -> list[str]:
    if accel is Accel.AUTO:
        raise ValueError("resolve the accelerator before building the command line")
    vm = spec.vm
    paths = RunPaths(spec.run_dir_of(node))
    argv = [
        str(binary),
        "-name",
        f"{vm.name}-{node.name},debug-threads=on",
        "-machine",
        vm.machine,
        "-accel",
        accel.value,
        "-m",
        str(vm.memory_mib),
        "-smp",
        str(vm.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-serial",
        f"file:{paths.console}",
        "-chardev",
        f"socket,id=qmp0,path={paths.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp0,mode=control",
        "-chardev",
        f"socket,id=qmp1,path={paths.qmp_oob},server=on,wait=off",
        "-mon",
        "chardev=qmp1,mode=control",
        "-chardev",
        f"socket,id=qmp2,path={paths.qmp_watch},server=on,wait=off",
        "-mon",
        "chardev=qmp2,mode=control",
        "-chardev",
        f"socket,id=qmp3,path={paths.qmp_poll},server=on,wait=off",
        "-mon",
        "chardev=qmp3,mode=control",
        "-pidfile",
        str(paths.pidfile),
    ]
    if spec.security.tls:
        argv += tls_objects(spec, node)
    # colo-compare tells some of its troubles only in trace events (core.compare_log).
    for event in TRACE_EVENTS:
        argv += ["-trace", f"enable={event}"]
    for d in FIRMWARE_DIRS:
        argv += ["-L", d]
    if vm.kernel is not None:
        argv += ["-kernel", str(vm.kernel)]
    if vm.initrd is not None:
        argv += ["-initrd", str(vm.initrd)]
    if vm.append is not None:
        argv += ["-append", vm.append]
    argv += [
        "-netdev",
        f"tap,id={NETDEV_ID},ifname={tap_name(spec)},script=no,downscript=no,vhost=off",
        "-device",
        f"{vm.nic_model},id=nic0,netdev={NETDEV_ID},mac={vm.mac}",
    ]
    disk = spec.disk_of(node)
    if role is Role.PRIMARY:
        argv += [
            "-drive",
            f"if=none,id={DISK_ID},driver=quorum,read-pattern=fifo,vote-threshold=1,"
            f"children.0.file.filename={disk},children.0.driver=raw",
            "-S",
        ]
    else:
        argv += [
            "-drive",
            f"if=none,id={SECONDARY_PARENT},file.filename={disk},driver=raw",
            "-drive",
            f"if=none,id={SECONDARY_CHILD},driver=replication,mode=secondary,"
            f"file.driver=qcow2,top-id={DISK_ID},"
            f"file.file.filename={paths.active},"
            f"file.backing.driver=qcow2,file.backing.file.filename={paths.hidden},"
            f"file.backing.backing={SECONDARY_PARENT}",
            "-drive",
            f"if=none,id={DISK_ID},driver=quorum,read-pattern=fifo,vote-threshold=1,"
            f"children.0={SECONDARY_CHILD}",
            "-incoming",
            "defer",
        ]
    argv += ["-device", f"virtio-blk-pci,id=vdisk0,drive={DISK_ID}"]
    return argv
