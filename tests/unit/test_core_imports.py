"""core/ stays pure: no I/O, no clock, no asyncio, nothing from the effectful layers."""

from __future__ import annotations

import ast
from pathlib import Path

import coloft.core

FORBIDDEN = {
    "asyncio",
    "socket",
    "subprocess",
    "time",
    "os",
    "threading",
    "select",
    "signal",
    "qemu",
    "coloft.effects",
    "coloft.agent",
    "coloft.api",
    "coloft.cli",
    "coloft.lab",
    "coloft.config",
    "datetime",
    "random",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_imports_nothing_effectful() -> None:
    core_dir = Path(coloft.core.__file__).parent
    offenders = []
    for path in sorted(core_dir.rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.name} imports {name}")
    assert not offenders, "core/ must stay pure: " + "; ".join(offenders)
