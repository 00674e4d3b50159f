"""Which COLO channel is broken, from the kernel's view of its TCP sockets. Pure.

Every channel is a TCP connection between the two hosts' replication addresses;
the kernel (sock_diag over netlink, or /proc/net/tcp) tells, per socket, how
many bytes the peer has not acknowledged and how many retransmissions or probes
are running. A channel whose packets are silently dropped keeps unacknowledged
bytes under retransmission; one that was reset has no connection at all. These
signals only *name* the broken link: the verdict that the comparison path is
broken comes from the active probe, so that a retransmission on a busy but
healthy network never claims a failure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from coloft.core import ports
from coloft.model.spec import NodeSpec
from coloft.model.steps import Role

ESTABLISHED = 0x01
LISTEN = 0x0A

DESCRIPTION = {
    "mirror": "mirror channel (primary -> secondary input)",
    "compare-in": "compare-in channel (secondary output -> colo-compare)",
    "migration": "migration/checkpoint stream",
    "nbd": "NBD disk replication",
}


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    unacked: int
    retransmits: int
    probes: int


def _addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    # The kernel prints the IPv4 address as a little-endian 32-bit hex number.
    raw = int(host, 16)
    ip = ".".join(str((raw >> shift) & 0xFF) for shift in (0, 8, 16, 24))
    return ip, int(port, 16)


def parse_proc_net_tcp(text: str) -> list[TcpSocket]:
    """The IPv4 sockets of a /proc/net/tcp listing; malformed lines are skipped."""
    found = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 13:
            continue
        try:
            tx_queue = int(f[4].split(":")[0], 16)
            found.append(
                TcpSocket(
                    local=_addr(f[1]),
                    remote=_addr(f[2]),
                    state=int(f[3], 16),
                    unacked=tx_queue,
                    retransmits=int(f[6], 16),
                    probes=int(f[8]),
                )
            )
        except ValueError:
            continue
    return found


# sock_diag's answer per socket (linux/inet_diag.h): struct inet_diag_msg, then
# attributes; INET_DIAG_INFO carries struct tcp_info, whose third and fourth bytes
# are the retransmission and probe counts /proc/net/tcp shows.
DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")
INET_DIAG_INFO = 2


def parse_sock_diag(messages: list[bytes]) -> list[TcpSocket]:
    """The IPv4 sockets of a sock_diag dump (one inet_diag_msg with its attributes
    per message); short or malformed messages are skipped."""
    found = []
    for m in messages:
        if len(m) < DIAG_MSG.size:
            continue
        family, state, _timer, retrans, sport, dport, src, dst, *_, wqueue, _uid, _ino = (
            DIAG_MSG.unpack_from(m)
        )
        if family != 2:  # AF_INET
            continue
        retransmits, probes = retrans, 0
        off = DIAG_MSG.size
        while off + 4 <= len(m):
            length, kind = struct.unpack_from("=HH", m, off)
            if length < 4:
                break
            if kind == INET_DIAG_INFO and length >= 8:
                retransmits, probes = m[off + 6], m[off + 7]
            off += (length + 3) & ~3
        found.append(
            TcpSocket(
                local=(_ipv4(src), int.from_bytes(sport, "big")),
                remote=(_ipv4(dst), int.from_bytes(dport, "big")),
                state=state,
                # A listener's write queue field is its backlog, not bytes in flight.
                unacked=0 if state == LISTEN else wqueue,
                retransmits=retransmits,
                probes=probes,
            )
        )
    return found


def _ipv4(raw: bytes) -> str:
    return ".".join(str(b) for b in raw[:4])


@dataclass(frozen=True)
class Endpoint:
    """A channel's socket on this host: identified by our port (and the peer's
    address: a stranger knocking on the port is not part of the channel) or by the
    peer's address and port."""

    local_port: int | None = None
    remote: tuple[str, int] | None = None
    peer: str | None = None


def endpoints(role: Role, node: NodeSpec, peer: NodeSpec) -> dict[str, Endpoint]:
    """The channels whose sockets live on `node` in `role`."""
    if role is Role.PRIMARY:
        return {
            "mirror": Endpoint(
                local_port=ports.port(node, ports.MIRROR), peer=peer.replication_address
            ),
            "compare-in": Endpoint(
                local_port=ports.port(node, ports.COMPARE_SECONDARY_IN),
                peer=peer.replication_address,
            ),
            "migration": Endpoint(
                remote=(peer.replication_address, ports.port(peer, ports.MIGRATION))
            ),
            "nbd": Endpoint(remote=(peer.replication_address, ports.port(peer, ports.NBD))),
        }
    return {
        "mirror": Endpoint(remote=(peer.replication_address, ports.port(peer, ports.MIRROR))),
        "compare-in": Endpoint(
            remote=(peer.replication_address, ports.port(peer, ports.COMPARE_SECONDARY_IN))
        ),
    }


def _matches(s: TcpSocket, e: Endpoint) -> bool:
    if e.local_port is not None:
        return s.local[1] == e.local_port and e.peer in (None, s.remote[0])
    return s.remote == e.remote


def assess(sockets: list[TcpSocket], wanted: dict[str, Endpoint]) -> dict[str, str]:
    """Per channel: "ok", "disconnected", "stale: ..." (a server end holding more than one
    connection: QEMU serves one client, so one of them is dead), or "unacknowledged: ..."
    (data under retransmission)."""
    result = {}
    for name, e in wanted.items():
        mine = [s for s in sockets if s.state == ESTABLISHED and _matches(s, e)]
        if not mine:
            result[name] = "disconnected"
            continue
        stuck = [s for s in mine if s.unacked > 0 and (s.retransmits > 0 or s.probes > 0)]
        if e.local_port is not None and len(mine) > 1:
            result[name] = f"stale: {len(mine)} connections where QEMU serves one"
        elif stuck:
            s = stuck[0]
            result[name] = (
                f"unacknowledged: {s.unacked} bytes, {max(s.retransmits, s.probes)} retransmissions"
            )
        else:
            result[name] = "ok"
    return result


# Retransmissions of one segment before a channel counts as broken on its own: the
# minimum RTO is 200 ms and doubles, so two mean the peer acknowledged nothing for
# 600 ms, which a working link here never does.
STUCK_RETRANSMISSIONS = 2


def retransmissions(state: str) -> int:
    """The retransmission count in an "unacknowledged: ..." channel state (else 0)."""
    if not state.startswith("unacknowledged"):
        return 0
    words = state.replace(",", " ").split()
    return next((int(words[i - 1]) for i, w in enumerate(words) if w == "retransmissions"), 0)


@dataclass(frozen=True)
class Break:
    """One broken channel, from its state as assess() wrote it (possibly on the peer)."""

    channel: str
    detail: str

    @property
    def condition(self) -> str:
        """ "disconnected", "stale" or "unacknowledged"."""
        return self.detail.split(":")[0]

    @property
    def code(self) -> str:
        return f"{self.channel}-{self.condition}"

    @property
    def text(self) -> str:
        return f"{DESCRIPTION[self.channel]} {self.detail}"

    @property
    def conclusive(self) -> bool:
        """Broken by itself: gone, or a segment unacknowledged through two retransmissions."""
        return (
            self.condition in ("disconnected", "stale")
            or retransmissions(self.detail) >= STUCK_RETRANSMISSIONS
        )


def broken(primary: dict[str, str], secondary: dict[str, str]) -> list[Break]:
    """Each broken channel, seen from either side (the primary's view first)."""
    found = []
    for name in DESCRIPTION:
        states = [v for v in (primary.get(name), secondary.get(name)) if v not in (None, "ok")]
        if states:
            found.append(Break(name, states[0]))
    return found


def replication_stuck(primary: dict[str, str]) -> Break | None:
    """A checkpoint-stream or NBD channel of the primary that is conclusively broken."""
    return next(
        (b for b in broken(primary, {}) if b.channel in ("migration", "nbd") and b.conclusive),
        None,
    )
