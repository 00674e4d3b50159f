"""The protection oracle's judgement (its sampling runs in every integration test)."""

from __future__ import annotations

from pathlib import Path

from coloft.config.load import load_spec
from coloft.lab.protection import GRACE_S, ProtectionOracle, _Node

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"


def nodes() -> tuple[_Node, _Node]:
    return _Node("a", Path("/nonexistent/a")), _Node("b", Path("/nonexistent/b"))


def test_a_200_backed_by_both_qemus_in_colo_is_fine() -> None:
    oracle = ProtectionOracle(load_spec(EXAMPLE))
    a, b = nodes()
    a.mode, a.migration, b.mode = "primary", "colo", "secondary"
    a.judge(10.0)
    b.judge(10.0)
    oracle._check(10.0 + 5 * GRACE_S, a, b, fresh_s=4.0)
    assert oracle.violations == []


def test_a_200_while_the_secondary_is_gone_is_a_violation_after_the_grace() -> None:
    oracle = ProtectionOracle(load_spec(EXAMPLE))
    a, b = nodes()
    a.mode, a.migration = "primary", "colo"
    a.judge(10.0)
    b.judge(10.0)  # no answer from b's QEMU: mode None
    oracle._check(10.0 + GRACE_S / 2, a, b, fresh_s=4.0)
    assert oracle.violations == []
    oracle._check(10.0 + GRACE_S * 1.5, a, b, fresh_s=4.0)
    assert len(oracle.violations) == 1 and "b's QEMU was mode None" in oracle.violations[0]


def test_a_200_during_the_initial_sync_is_a_violation() -> None:
    oracle = ProtectionOracle(load_spec(EXAMPLE))
    a, b = nodes()
    a.mode, a.migration, b.mode = "primary", "active", "secondary"
    a.judge(10.0)
    b.judge(10.0)
    oracle._check(12.0, a, b, fresh_s=4.0)
    assert any("migration active" in v for v in oracle.violations)
    # Back in COLO: the primary is fine again from the next sample on.
    a.migration = "colo"
    a.judge(12.1)
    assert a.bad_as_primary_since is None
