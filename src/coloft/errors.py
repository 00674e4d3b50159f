"""The error tree: each branch says what the caller does next."""

from __future__ import annotations


class ColoftError(Exception):
    """Root of every error coloft raises on purpose."""


class TransientError(ColoftError):
    """Worth retrying on the next tick: a timeout, a peer that is restarting."""


class FatalError(ColoftError):
    """Give up this operation: retrying the same thing will fail the same way."""


class ConfigError(FatalError):
    """The operator must fix the input (spec file, CLI arguments)."""


class ProtocolError(FatalError):
    """A peer (QEMU, the arbiter) said no or answered something unexpected."""


class StepError(FatalError):
    """A choreography step failed; names the step and QEMU's answer."""

    def __init__(self, node: str, step: str, detail: str) -> None:
        super().__init__(f"{node}: step '{step}' failed: {detail}")
        self.node = node
        self.step = step
        self.detail = detail
