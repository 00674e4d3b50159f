"""The QMP steps of a failover, on the surviving node.

Pure. The steps follow QEMU's COLO docs with two additions from what hung here
(shared COLO notes, section 6): every channel that still points at the lost peer
is yanked out-of-band first, so no later step can block on a peer that vanished
without a reset; and the replication NBD node is yanked before drive_del, which
otherwise flushes through the dead connection and blocks QEMU's main loop.
The secondary keeps its filter-rewriter: it holds the TCP sequence offsets of
the clients' open connections, which must survive the takeover.
"""

from __future__ import annotations

from enum import Enum

from coloft.core.argv import DISK_ID
from coloft.core.choreography import NBD_NODE, REPLICATION_NODE, RESYNC_TARGET, end_disk_copy
from coloft.model.steps import Step, Until

NOT_FOUND = ("not found", "does not exist", "No such", "not running")
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


class Action(Enum):
    """The two failovers; which one runs, and when, is core.ha's decision."""

    SECONDARY_TAKES_OVER = "secondary-takes-over"
    PRIMARY_CONTINUES_ALONE = "primary-continues-alone"


def yank(node: str, instance: dict[str, str]) -> Step:
    label = instance.get("id") or instance.get("node-name") or instance["type"]
    return Step(
        node,
        f"yank {label}",
        "yank",
        {"instances": [instance]},
        deadline_s=2.0,
        accept=NOT_FOUND,
        oob=True,
    )


def _del(node: str, command: str, oid: str) -> Step:
    what = "object" if command == "object-del" else "chardev"
    return Step(node, f"remove {what} {oid}", command, {"id": oid}, accept=NOT_FOUND)


def _resume_checks(node: str) -> list[Step]:
    return [
        Step(
            node, "wait for the guest to run", "query-status", deadline_s=10.0, until=Until.RUNNING
        ),
        Step(node, "announce guest MAC", "announce-self", dict(ANNOUNCE)),
    ]


def secondary_takeover(node: str) -> list[Step]:
    return [
        yank(node, {"type": "migration"}),
        yank(node, {"type": "chardev", "id": "red0"}),
        yank(node, {"type": "chardev", "id": "red1"}),
        Step(node, "stop NBD server", "nbd-server-stop", accept=NOT_FOUND),
        Step(node, "declare the primary lost", "x-colo-lost-heartbeat", deadline_s=5.0),
        _del(node, "object-del", "f2"),
        _del(node, "object-del", "f1"),
        _del(node, "chardev-remove", "red1"),
        _del(node, "chardev-remove", "red0"),
        *_resume_checks(node),
    ]


def _drop_secondary(node: str, accept: tuple[str, ...] = ()) -> list[Step]:
    """Cut the primary loose from its secondary: channels yanked first, then the
    replication child and COLO's filters removed. `accept` lets parts that were
    never added pass (an abandoned re-protection)."""
    return [
        yank(node, {"type": "migration"}),
        yank(node, {"type": "chardev", "id": "mirror0"}),
        yank(node, {"type": "chardev", "id": "compare1"}),
        yank(node, {"type": "block-node", "node-name": NBD_NODE}),
        Step(
            node,
            "detach replication child",
            "x-blockdev-change",
            {"parent": DISK_ID, "child": "children.1"},
            accept=accept,
        ),
        Step(
            node,
            "delete replication node",
            "human-monitor-command",
            {"command-line": f"drive_del {REPLICATION_NODE}"},
            hmp=True,
            deadline_s=5.0,
            accept=accept,
        ),
        *(
            _del(node, "object-del", oid)
            for oid in ("comp0", "iothread1", "m0", "redire0", "redire1")
        ),
        *(
            _del(node, "chardev-remove", cid)
            for cid in (
                "mirror0",
                "compare1",
                "compare0-0",
                "compare0",
                "compare_out0",
                "compare_out",
            )
        ),
    ]


def primary_continue_alone(node: str) -> list[Step]:
    return [
        *_drop_secondary(node),
        Step(node, "declare the secondary lost", "x-colo-lost-heartbeat", deadline_s=5.0),
        *_resume_checks(node),
    ]


def abandon_reprotect(node: str) -> list[Step]:
    """Undo a re-protection that failed at any point: the disk copy ended, whatever
    was added removed, COLO left if it had started, and the guest running again.
    Yanking the migration ends a first copy that is under way (the guest stays
    paused until `cont`); migrate_cancel would also break a COLO that did start."""
    return [
        # Cancelling flushes through the copy's NBD link: cut it first in case it hangs.
        yank(node, {"type": "block-node", "node-name": RESYNC_TARGET}),
        *end_disk_copy(node, force=True),
        *_drop_secondary(node, accept=(*NOT_FOUND, "does not have child")),
        Step(
            node,
            "leave COLO if it started",
            "x-colo-lost-heartbeat",
            deadline_s=5.0,
            accept=("not in COLO mode",),
        ),
        Step(node, "resume guest", "cont"),
        *_resume_checks(node),
    ]
