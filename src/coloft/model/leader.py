"""Who leads a pair, as the arbiter says."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Leader:
    """The node holding a pair's leader key, and the key's create revision: the fencing
    epoch, which only grows across leaders."""

    node: str
    epoch: int
