"""The host's TCP table from the kernel, and its sock_diag parser."""

from __future__ import annotations

import socket
import struct

from coloft.core.channels import DIAG_MSG, INET_DIAG_INFO, parse_sock_diag
from coloft.effects import sockets


def diag_msg(state: int, wqueue: int, retrans: int, probes: int) -> bytes:
    src, dst = bytes([192, 0, 2, 1]) + bytes(12), bytes([192, 0, 2, 2]) + bytes(12)
    head = DIAG_MSG.pack(
        2, state, 1, 0, (9000).to_bytes(2, "big"), (54321).to_bytes(2, "big"),
        src, dst, 0, 0, 0, 0, wqueue, 0, 0,
    )  # fmt: skip
    info = bytes([state, 0, retrans, probes]) + bytes(4)
    return head + struct.pack("=HH", 4 + len(info), INET_DIAG_INFO) + info


def test_sock_diag_messages_give_addresses_queue_and_retransmissions() -> None:
    (s,) = parse_sock_diag([diag_msg(1, 1234, 3, 2), b"short"])
    assert (s.local, s.remote, s.state) == (("192.0.2.1", 9000), ("192.0.2.2", 54321), 1)
    assert (s.unacked, s.retransmits, s.probes) == (1234, 3, 2)
    (listener,) = parse_sock_diag([diag_msg(0x0A, 128, 0, 0)])
    assert listener.unacked == 0, "a listener's backlog is no unacknowledged data"


def test_the_kernel_lists_connections_not_listeners_and_one_reading_serves_a_moment() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                here = client.getsockname()
                listed = parse_sock_diag(sockets.diag_dump())
                mine = [s for s in listed if s.local == here]
                assert [(s.remote, s.state, s.unacked) for s in mine] == [
                    (("127.0.0.1", port), 1, 0)
                ]
                assert ("127.0.0.1", port) not in [s.local for s in listed if s.remote[1] == 0], (
                    "the listener is left out: only connections are asked for"
                )
                assert {s.state for s in listed} == {1}
                first = sockets.tcp_sockets()
                assert sockets.tcp_sockets() is first, "read again within MAX_AGE_S"
