"""Who leads a pair, as the arbiter says."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Leader:
    """The node holding a pair's leader key, and the key's create revision: the fencing
    epoch, which only grows across leaders."""

    node: str
    epoch: int


@dataclass(frozen=True)
class PairRecord:
    """Everything the arbiter keeps about a pair, read at one revision: the leader,
    the node allowed to take over (sync), the operator's protection switch (None:
    never set) and the source: the node that took the lead last, whose disk holds
    every write the guest acknowledged (None: the pair never ran), and the two
    nodes that run the pair when a spare replaced one (None: the spec's first two)."""

    leader: Leader | None
    sync: str | None
    protection: bool | None
    source: str | None = None
    members: tuple[str, str] | None = None


def members_text(members: tuple[str, str]) -> str:
    return ",".join(members)


def members_of(text: str) -> tuple[str, str] | None:
    """The members as stored; None for anything but two distinct names."""
    parts = text.split(",")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        return None
    return parts[0], parts[1]
