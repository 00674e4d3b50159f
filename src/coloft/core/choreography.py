"""The bring-up of a COLO pair as an ordered list of QMP steps, and the pure
checks the executor applies to QEMU's replies.

Order matters and follows QEMU's COLO docs: the secondary must have x-colo set,
its disk exported and its network redirectors in place before the primary
mirrors the disk, attaches the replication child, inserts colo-compare and
starts the migration that turns into COLO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coloft.core import ports
from coloft.core.argv import (
    DISK_ID,
    NETDEV_ID,
    SECONDARY_PARENT,
    TLS_CLIENT,
    TLS_PEERS,
    TLS_SERVER,
)
from coloft.model.spec import NodeSpec, PairSpec
from coloft.model.steps import Step, Until

# QEMU's words for "that is already there", per command. Kept narrow: "Address
# already in use" from a failed listen must never pass for "already done".
CHARDEV_EXISTS = ("already exists",)
OBJECT_EXISTS = ("attempt to add duplicate property",)
NBD_RUNNING = ("NBD server already running",)
EXPORT_EXISTS = ("Block export id",)
INCOMING_STARTED = ("incoming migration has already been started",)
NODE_EXISTS = ("Duplicate nodes with node-name",)
NO_JOB = ("not found",)
NO_NODE = ("Failed to find node",)
REPLICATION_NODE = "replication0"
RESYNC_TARGET = "resync0"
NBD_NODE = "nbd0"
RESYNC_JOB = "resync"
# Reconnect period of the secondary's sockets towards the primary.
RECONNECT_MS = 250
# The first full RAM copy under TCG: 128 MiB at ~100 MiB/s plus the disk mirror.
MIGRATE_DEADLINE_S = 120.0
DISK_SYNC_DEADLINE_S = 300.0


def _inet(host: str, port: int) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


def _socket_chardev(
    node: str, cid: str, host: str, port: int, server: bool, tls: bool = False
) -> Step:
    # Each packet is written in two or three pieces (length, header length, frame):
    # Nagle would hold the later pieces back for an acknowledgement, and every
    # delay here is time colo-compare holds the client's packet.
    data: dict[str, Any] = {"addr": _inet(host, port), "server": server, "nodelay": True}
    if server:
        data["wait"] = False
    else:
        data["reconnect-ms"] = RECONNECT_MS
    if tls and server:
        data |= {"tls-creds": TLS_SERVER, "tls-authz": TLS_PEERS}
    elif tls:
        data["tls-creds"] = TLS_CLIENT
    return Step(
        node,
        f"add chardev {cid}",
        "chardev-add",
        {"id": cid, "backend": {"type": "socket", "data": data}},
        accept=CHARDEV_EXISTS,
    )


def _local_chardev_pair(node: str, server_id: str, client_id: str, path: Path) -> list[Step]:
    """Two ends of a UNIX socket in the node's run directory: colo-compare's
    connections inside one QEMU are nobody else's business (no TCP port)."""
    addr = {"type": "unix", "data": {"path": str(path)}}

    def end(cid: str, data: dict[str, Any]) -> Step:
        backend = {"type": "socket", "data": {"addr": addr, **data}}
        return Step(
            node,
            f"add chardev {cid}",
            "chardev-add",
            {"id": cid, "backend": backend},
            accept=CHARDEV_EXISTS,
        )

    # The client end connects synchronously at once, so it has no reconnect.
    return [end(server_id, {"server": True, "wait": False}), end(client_id, {"server": False})]


def _object(node: str, qom_type: str, oid: str, **props: Any) -> Step:
    return Step(
        node,
        f"add {qom_type} {oid}",
        "object-add",
        {"qom-type": qom_type, "id": oid, **props},
        accept=OBJECT_EXISTS,
    )


def _x_colo(node: str) -> Step:
    return Step(
        node,
        "enable x-colo",
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-colo", "state": True}]},
    )


def _server_tls(spec: PairSpec) -> dict[str, str]:
    """What a listener of the secondary (NBD, incoming migration) checks."""
    return {"tls-creds": TLS_SERVER, "tls-authz": TLS_PEERS} if spec.security.tls else {}


def secondary_bringup(spec: PairSpec, primary: NodeSpec, secondary: NodeSpec) -> list[Step]:
    s = secondary.name
    here = secondary.replication_address
    there = primary.replication_address
    tls = spec.security.tls
    incoming_tls = (
        [Step(s, "require TLS on incoming migration", "migrate-set-parameters", _server_tls(spec))]
        if tls
        else []
    )
    return [
        _x_colo(s),
        Step(
            s,
            "start NBD server",
            "nbd-server-start",
            {"addr": _inet(here, ports.port(secondary, ports.NBD)), **_server_tls(spec)},
            accept=NBD_RUNNING,
        ),
        Step(
            s,
            "export disk",
            "nbd-server-add",
            {"device": SECONDARY_PARENT, "writable": True},
            accept=EXPORT_EXISTS,
        ),
        _socket_chardev(s, "red0", there, ports.port(primary, ports.MIRROR), False, tls),
        _socket_chardev(
            s, "red1", there, ports.port(primary, ports.COMPARE_SECONDARY_IN), False, tls
        ),
        _object(s, "filter-redirector", "f1", netdev=NETDEV_ID, queue="tx", indev="red0"),
        _object(s, "filter-redirector", "f2", netdev=NETDEV_ID, queue="rx", outdev="red1"),
        _object(s, "filter-rewriter", "rew0", netdev=NETDEV_ID, queue="all"),
        *incoming_tls,
        Step(
            s,
            "listen for migration",
            "migrate-incoming",
            {"uri": f"tcp:{here}:{ports.port(secondary, ports.MIGRATION)}"},
            accept=INCOMING_STARTED,
        ),
    ]


def _disk_copy(p: str, there: str, nbd_port: int, tls: bool, mib_s: int = 0) -> list[Step]:
    # The target is a node of its own (a known name to yank if its link dies), and
    # only blockdev-add can give an NBD client TLS credentials.
    target: dict[str, Any] = {
        "node-name": RESYNC_TARGET,
        "driver": "nbd",
        "server": {"type": "inet", "host": there, "port": str(nbd_port)},
        "export": SECONDARY_PARENT,
    }
    if tls:
        target["tls-creds"] = TLS_CLIENT
    args: dict[str, Any] = {
        "device": DISK_ID,
        "job-id": RESYNC_JOB,
        "target": RESYNC_TARGET,
        "sync": "full",
    }
    if mib_s:
        args["speed"] = mib_s << 20
    return [
        Step(p, "connect to secondary's disk", "blockdev-add", target, accept=NODE_EXISTS),
        Step(
            p,
            "copy disk to secondary",
            "blockdev-mirror",
            args,
            deadline_s=DISK_SYNC_DEADLINE_S,
            expect_event="BLOCK_JOB_READY",
            event_data={"device": RESYNC_JOB},
        ),
    ]


def end_disk_copy(p: str, force: bool = False) -> list[Step]:
    """Cancel the copy (in sync, it ends with both disks equal) and drop its target."""
    cancel = {"device": RESYNC_JOB, **({"force": True} if force else {})}
    return [
        Step(p, "end disk copy", "block-job-cancel", cancel, accept=NO_JOB if force else ()),
        Step(
            p,
            "wait for disk copy to end",
            "query-block-jobs",
            deadline_s=30.0,
            until=Until.NO_BLOCK_JOB,
            until_args=(RESYNC_JOB,),
        ),
        Step(
            p,
            "disconnect secondary's disk",
            "blockdev-del",
            {"node-name": RESYNC_TARGET},
            accept=NO_NODE if force else (),
        ),
    ]


def _filter(p: str, qom_type: str, oid: str, before: str | None, **props: Any) -> Step:
    # A former secondary keeps its rewriter (the clients' TCP offsets): the primary's
    # filters go in front of it, as QEMU's COLO docs say.
    where = {} if before is None else {"position": f"id={before}", "insert": "before"}
    return _object(p, qom_type, oid, netdev=NETDEV_ID, **where, **props)


def _channels(spec: PairSpec, primary: NodeSpec) -> list[Step]:
    """The primary's ends of the packet channels. Alone they change nothing for the
    guest, so a re-protection adds them while it runs: the secondary's sockets
    (reconnecting every RECONNECT_MS) are in by the time the guest pauses."""
    p = primary.name
    here = primary.replication_address
    tls = spec.security.tls
    run = spec.run_dir_of(primary)
    return [
        _socket_chardev(p, "mirror0", here, ports.port(primary, ports.MIRROR), True, tls),
        _socket_chardev(
            p, "compare1", here, ports.port(primary, ports.COMPARE_SECONDARY_IN), True, tls
        ),
        *_local_chardev_pair(p, "compare0", "compare0-0", run / "compare0.sock"),
        *_local_chardev_pair(p, "compare_out", "compare_out0", run / "compare-out.sock"),
    ]


def _sockets_connected(p: str) -> Step:
    return Step(
        p,
        "wait for secondary's sockets",
        "query-chardev",
        deadline_s=10.0,
        until=Until.CHARDEVS_CONNECTED,
        until_args=("mirror0", "compare1"),
    )


def _into_colo(
    spec: PairSpec, primary: NodeSpec, secondary: NodeSpec, before: str | None
) -> list[Step]:
    """From a stopped primary whose disk copy is ready to COLO: the shared tail of a
    first bring-up and of a re-protection."""
    p = primary.name
    there = secondary.replication_address
    nbd_port = ports.port(secondary, ports.NBD)
    t = spec.tuning
    replication = (
        f"drive_add -n buddy driver=replication,mode=primary,"
        f"node-name={REPLICATION_NODE},file.driver=nbd,file.node-name={NBD_NODE},"
        f"file.host={there},file.port={nbd_port},file.export={SECONDARY_PARENT}"
    )
    migration: dict[str, Any] = {
        "x-checkpoint-delay": t.checkpoint_interval_ms,
        "max-bandwidth": t.migration_mib_s << 20,
    }
    if spec.security.tls:
        replication += f",file.tls-creds={TLS_CLIENT}"
        # A former secondary still has its server credentials set for migration.
        migration |= {"tls-creds": TLS_CLIENT, "tls-hostname": there}
    return [
        *end_disk_copy(p),
        Step(
            p,
            "attach replication child",
            "human-monitor-command",
            {"command-line": replication},
            hmp=True,
            accept=("Duplicate ID",),
        ),
        Step(
            p,
            "add replication child to quorum",
            "x-blockdev-change",
            {"parent": DISK_ID, "node": REPLICATION_NODE},
        ),
        _filter(p, "filter-mirror", "m0", before, queue="tx", outdev="mirror0"),
        _filter(p, "filter-redirector", "redire0", before, queue="rx", indev="compare_out"),
        _filter(p, "filter-redirector", "redire1", before, queue="rx", outdev="compare0"),
        _object(p, "iothread", "iothread1"),
        _object(
            p,
            "colo-compare",
            "comp0",
            primary_in="compare0-0",
            secondary_in="compare1",
            outdev="compare_out0",
            iothread="iothread1",
            compare_timeout=t.compare_timeout_ms,
            expired_scan_cycle=t.expired_scan_cycle_ms,
            max_queue_size=t.max_queue_size,
        ),
        _sockets_connected(p),
        _x_colo(p),
        Step(
            p,
            "set migration parameters",
            "migrate-set-parameters",
            migration,
        ),
        Step(
            p,
            "start migration",
            "migrate",
            {"uri": f"tcp:{there}:{ports.port(secondary, ports.MIGRATION)}"},
        ),
        Step(
            p,
            "wait for COLO",
            "query-migrate",
            deadline_s=MIGRATE_DEADLINE_S,
            until=Until.MIGRATION_IN_COLO,
        ),
        # COLO resumes the guest once its checkpoint timer exists (setting the
        # delay before that would touch a timer not yet made).
        Step(p, "wait for the guest to run", "query-status", deadline_s=10.0, until=Until.RUNNING),
        # Setting the delay in COLO checkpoints at once: the secondary is proven in
        # lock-step now, not one interval later.
        *(
            [
                Step(
                    p,
                    "take the first checkpoint now",
                    "migrate-set-parameters",
                    {"x-checkpoint-delay": t.checkpoint_interval_ms},
                )
            ]
            if t.checkpoint_at_start
            else []
        ),
        # Switches learned the guest's MAC elsewhere if it ever ran elsewhere.
        Step(
            p,
            "announce guest MAC",
            "announce-self",
            {"initial": 50, "max": 550, "rounds": 5, "step": 100},
        ),
    ]


def primary_bringup(spec: PairSpec, primary: NodeSpec, secondary: NodeSpec) -> list[Step]:
    """A first bring-up: the guest has not run yet, so it stays paused throughout."""
    p = primary.name
    there = secondary.replication_address
    return [
        Step(p, "pause guest", "stop"),
        *_channels(spec, primary),
        *_disk_copy(p, there, ports.port(secondary, ports.NBD), spec.security.tls),
        *_into_colo(spec, primary, secondary, before=None),
    ]


def primary_reprotect(
    spec: PairSpec, primary: NodeSpec, secondary: NodeSpec, former_secondary: bool
) -> list[Step]:
    """Protect a running primary again with a fresh secondary: the disk is copied
    while the guest serves (the mirror job tracks what it writes meanwhile), and the
    guest pauses only for the end of the copy and the first RAM copy. The new
    secondary's own disk is overwritten: a failed node's copy has diverged."""
    p = primary.name
    there = secondary.replication_address
    return [
        *_channels(spec, primary),
        *_disk_copy(
            p,
            there,
            ports.port(secondary, ports.NBD),
            spec.security.tls,
            spec.reprotect.disk_mib_s,
        ),
        _sockets_connected(p),
        Step(p, "pause guest", "stop"),
        *_into_colo(spec, primary, secondary, before="rew0" if former_secondary else None),
    ]


def confirm_secondary(secondary: NodeSpec) -> list[Step]:
    return [
        Step(
            secondary.name,
            "wait for secondary COLO",
            "query-colo-status",
            deadline_s=30.0,
            until=Until.COLO_MODE,
            until_args=("secondary",),
        )
    ]


def bringup(spec: PairSpec) -> list[Step]:
    """The whole bring-up, secondary first. Deterministic for a given spec."""
    p, s = spec.primary, spec.secondary
    return [*secondary_bringup(spec, p, s), *primary_bringup(spec, p, s), *confirm_secondary(s)]


def listeners(steps: list[Step]) -> list[dict[str, Any]]:
    """Every TCP socket the steps make QEMU listen on, with the credentials it
    requires (None: plain TCP), in step order."""
    found: list[dict[str, Any]] = []
    migration_tls: dict[str, str | None] = {}
    for st in steps:
        a = st.arguments or {}
        if st.command == "migrate-set-parameters" and "tls-creds" in a:
            migration_tls[st.node] = a["tls-creds"] or None
        data = a["backend"]["data"] if st.command == "chardev-add" else {}
        if data.get("server") and data["addr"]["type"] == "inet":
            where, creds = data["addr"]["data"], data.get("tls-creds")
            found.append({"node": st.node, "channel": f"chardev {a['id']}", **where, "tls": creds})
        elif st.command == "nbd-server-start":
            where, creds = a["addr"]["data"], a.get("tls-creds")
            found.append({"node": st.node, "channel": "nbd", **where, "tls": creds})
        elif st.command == "migrate-incoming":
            host, port = a["uri"].removeprefix("tcp:").rsplit(":", 1)
            creds = migration_tls.get(st.node)
            found.append(
                {"node": st.node, "channel": "migration", "host": host, "port": port, "tls": creds}
            )
    return found


def condition_met(until: Until, args: tuple[str, ...], reply: Any) -> bool:
    """Whether a polled step's reply shows what it waits for."""
    if until is Until.MIGRATION_IN_COLO:
        status = reply.get("status") if isinstance(reply, dict) else None
        return status == "colo"
    if until is Until.NO_BLOCK_JOB:
        return isinstance(reply, list) and not any(j.get("device") in args for j in reply)
    if until is Until.CHARDEVS_CONNECTED:
        if not isinstance(reply, list):
            return False
        found = {c.get("label"): str(c.get("filename", "")) for c in reply}
        return all(a in found and not found[a].startswith("disconnected") for a in args)
    if until is Until.COLO_MODE:
        return isinstance(reply, dict) and reply.get("mode") in args
    if until is Until.RUNNING:
        return isinstance(reply, dict) and reply.get("status") == "running"
    raise ValueError(f"unknown condition {until}")


def failure_in_poll(until: Until, reply: Any) -> str | None:
    """A reply that means the awaited state can no longer come."""
    if until is Until.MIGRATION_IN_COLO and isinstance(reply, dict):
        status = reply.get("status")
        if status in ("failed", "cancelled", "completed"):
            detail = reply.get("error-desc", "")
            # "completed" instead of "colo" is the 10.0.0-10.0.6 regression.
            return f"migration ended {status!r} instead of entering COLO {detail}".strip()
    return None


def is_accepted(step: Step, error: str) -> bool:
    """An error that means the step's effect is already in place."""
    return any(a.lower() in error.lower() for a in step.accept)


def hmp_error(output: str) -> str | None:
    """HMP reports failures as text in a successful reply."""
    text = output.strip()
    return text or None
