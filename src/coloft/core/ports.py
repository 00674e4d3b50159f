"""Which port on a node serves what, as offsets from the node's port_base."""

from __future__ import annotations

from coloft.model.spec import NodeSpec

# On a primary: mirror and compare listen on the replication address (offsets 2
# and 3 were colo-compare's loopback pairs, now UNIX sockets; kept free).
MIRROR = 0
COMPARE_SECONDARY_IN = 1
# On a secondary: the disk export and the incoming migration.
NBD = 4
MIGRATION = 5
# On both: the agents' UDP heartbeats (replication address and LAN address).
HEARTBEAT = 6


def port(node: NodeSpec, offset: int) -> int:
    return node.port_base + offset


def heartbeat_port(node: NodeSpec, shared: int) -> int:
    """Where `node` hears heartbeats: the port pairs share (`[heartbeat] port`), else its own."""
    return shared or port(node, HEARTBEAT)


def all_ports(node: NodeSpec) -> list[int]:
    return [node.port_base + o for o in (MIRROR, COMPARE_SECONDARY_IN, NBD, MIGRATION)]
