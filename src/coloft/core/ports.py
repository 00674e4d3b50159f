"""Which port on a node serves what, as offsets from the node's port_base."""

from __future__ import annotations

from coloft.model.spec import NodeSpec

# On a primary: mirror and compare listen on the replication address; the
# colo-compare loopback pairs stay on 127.0.0.1 inside the host.
MIRROR = 0
COMPARE_SECONDARY_IN = 1
COMPARE_PRIMARY_IN = 2
COMPARE_OUT = 3
# On a secondary: the disk export and the incoming migration.
NBD = 4
MIGRATION = 5
# On both: the agents' UDP heartbeats (replication address and LAN address).
HEARTBEAT = 6


def port(node: NodeSpec, offset: int) -> int:
    return node.port_base + offset


def all_ports(node: NodeSpec) -> list[int]:
    return [
        node.port_base + o
        for o in (MIRROR, COMPARE_SECONDARY_IN, COMPARE_PRIMARY_IN, COMPARE_OUT, NBD, MIGRATION)
    ]
