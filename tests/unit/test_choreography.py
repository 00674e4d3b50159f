"""The bring-up as data: order, determinism, idempotency, and the reply checks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from coloft.config.load import load_spec
from coloft.core import choreography
from coloft.core.choreography import condition_met, failure_in_poll, is_accepted
from coloft.model.steps import Step, Until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"

# What QEMU 10.0 answers when a step's effect is already in place (seen on the lab build).
QEMU_ALREADY = {
    "nbd-server-start": "NBD server already running",
    "nbd-server-add": "Block export id 'parent0' is already in use",
    "chardev-add": "Chardev with id 'red0' already exists",
    "object-add": "attempt to add duplicate property 'f1' to object (type 'container')",
    "migrate-incoming": "The incoming migration has already been started",
}


@pytest.fixture
def steps() -> list[Step]:
    return choreography.bringup(load_spec(EXAMPLE))


def index(steps: list[Step], node: str, name: str) -> int:
    for i, s in enumerate(steps):
        if s.node == node and s.name == name:
            return i
    raise AssertionError(f"no step {node}: {name}")


def test_planning_is_deterministic() -> None:
    spec = load_spec(EXAMPLE)
    assert choreography.bringup(spec) == choreography.bringup(spec)


def test_secondary_is_ready_before_the_primary_starts(steps: list[Step]) -> None:
    first_primary = next(i for i, s in enumerate(steps) if s.node == "a")
    assert all(s.node == "b" for s in steps[:first_primary])
    assert index(steps, "b", "enable x-colo") < index(steps, "b", "listen for migration")
    assert index(steps, "b", "export disk") < index(steps, "a", "copy disk to secondary")


def test_primary_order(steps: list[Step]) -> None:
    order = [
        "pause guest",
        "add chardev mirror0",
        "add chardev compare0-0",
        "copy disk to secondary",
        "end disk copy",
        "wait for disk copy to end",
        "attach replication child",
        "add replication child to quorum",
        "add filter-mirror m0",
        "add colo-compare comp0",
        "wait for secondary's sockets",
        "enable x-colo",
        "set migration parameters",
        "start migration",
        "wait for COLO",
        "wait for the guest to run",
        "take the first checkpoint now",
    ]
    positions = [index(steps, "a", name) for name in order]
    assert positions == sorted(positions)
    assert steps[-1].node == "b" and steps[-1].until is Until.COLO_MODE


def test_colo_compare_uses_tuning(steps: list[Step]) -> None:
    comp = steps[index(steps, "a", "add colo-compare comp0")]
    assert comp.arguments["compare_timeout"] == 3000
    assert comp.arguments["expired_scan_cycle"] == 1000
    assert comp.arguments["max_queue_size"] == 1024
    delay = steps[index(steps, "a", "set migration parameters")]
    assert delay.arguments["x-checkpoint-delay"] == 2000
    assert delay.arguments["max-bandwidth"] == 1024 << 20


def _tls_of(step: Step) -> str | None:
    args = step.arguments
    if step.command == "chardev-add":
        creds: str | None = args["backend"]["data"].get("tls-creds")
        return creds
    if step.command == "human-monitor-command":
        return "tls-client" if "file.tls-creds=tls-client" in args["command-line"] else None
    return args.get("tls-creds")


def test_every_replication_channel_is_tls_with_the_peer_allowed(steps: list[Step]) -> None:
    want = {
        ("b", "start NBD server"): "tls-server",
        ("b", "add chardev red0"): "tls-client",
        ("b", "add chardev red1"): "tls-client",
        ("b", "require TLS on incoming migration"): "tls-server",
        ("a", "add chardev mirror0"): "tls-server",
        ("a", "add chardev compare1"): "tls-server",
        ("a", "connect to secondary's disk"): "tls-client",
        ("a", "attach replication child"): "tls-client",
        ("a", "set migration parameters"): "tls-client",
    }
    for (node, name), creds in want.items():
        step = steps[index(steps, node, name)]
        assert _tls_of(step) == creds, step.describe()
    for node, name in [("b", "start NBD server"), ("a", "add chardev mirror0")]:
        step = steps[index(steps, node, name)]
        data = step.arguments.get("backend", {}).get("data", step.arguments)
        assert data["tls-authz"] == "tls-peers"
    incoming = index(steps, "b", "require TLS on incoming migration")
    assert incoming < index(steps, "b", "listen for migration")
    # The loopback pairs inside the primary's host stay plain.
    assert _tls_of(steps[index(steps, "a", "add chardev compare0-0")]) is None


def test_no_tls_anywhere_when_replication_is_off() -> None:
    spec = load_spec(EXAMPLE)
    plain = replace(spec, security=replace(spec.security, replication="off"))
    steps = choreography.bringup(plain)
    assert all(_tls_of(s) is None for s in steps)
    assert not [s for s in steps if s.name == "require TLS on incoming migration"]


def test_replaying_a_prefix_is_accepted(steps: list[Step]) -> None:
    """Every step that creates something accepts QEMU's "already there" answer."""
    creating = [s for s in steps if s.command in QEMU_ALREADY]
    assert len(creating) >= 15
    for s in creating:
        assert is_accepted(s, QEMU_ALREADY[s.command]), s.describe()


@pytest.mark.parametrize(
    "error",
    [
        "Could not open '/dev/nonexistent': No such file",
        "Failed to find an available port: Address already in use",
        "Failed to connect to '198.51.100.2:9004': Connection refused",
    ],
)
def test_real_errors_are_not_accepted(steps: list[Step], error: str) -> None:
    for s in steps:
        assert not is_accepted(s, error), s.name


def test_disk_copy_waits_for_ready_event(steps: list[Step]) -> None:
    mirror = steps[index(steps, "a", "copy disk to secondary")]
    assert mirror.expect_event == "BLOCK_JOB_READY"
    assert mirror.event_data == {"device": "resync"}


def test_conditions() -> None:
    assert condition_met(Until.MIGRATION_IN_COLO, (), {"status": "colo"})
    assert not condition_met(Until.MIGRATION_IN_COLO, (), {"status": "active"})
    assert condition_met(Until.NO_BLOCK_JOB, ("resync",), [])
    assert not condition_met(Until.NO_BLOCK_JOB, ("resync",), [{"device": "resync"}])
    connected = [
        {"label": "mirror0", "filename": "tcp:1.2.3.4:9000,server=on <-> 5.6.7.8:1"},
        {"label": "compare1", "filename": "disconnected:tcp:1.2.3.4:9001,server=on"},
    ]
    assert not condition_met(Until.CHARDEVS_CONNECTED, ("mirror0", "compare1"), connected)
    assert condition_met(Until.CHARDEVS_CONNECTED, ("mirror0",), connected)
    assert condition_met(Until.COLO_MODE, ("secondary",), {"mode": "secondary"})


def test_migration_that_completes_instead_of_colo_fails_fast() -> None:
    problem = failure_in_poll(Until.MIGRATION_IN_COLO, {"status": "completed"})
    assert problem is not None and "instead of entering COLO" in problem
    assert failure_in_poll(Until.MIGRATION_IN_COLO, {"status": "active"}) is None


def test_reprotect_copies_the_disk_while_the_guest_runs() -> None:
    spec = load_spec(EXAMPLE)
    # b took over and runs alone; a comes back as its new secondary.
    steps = choreography.primary_reprotect(spec, spec.secondary, spec.primary, True)
    names = [s.name for s in steps]
    # The channels' ends and the disk copy come while the guest runs.
    copy = names.index("copy disk to secondary")
    # The secondary's sockets connect while the guest still runs.
    assert names[copy + 1 : copy + 3] == ["wait for secondary's sockets", "pause guest"]
    assert all(n.startswith("add chardev") for n in names[: copy - 1])
    assert steps[copy].arguments["target"] == steps[copy - 1].arguments["node-name"]
    assert all(s.node == "b" for s in steps)
    target = steps[copy - 1].arguments
    assert target["server"] == {
        "type": "inet",
        "host": spec.primary.replication_address,
        "port": str(9000 + 4),
    }
    assert target["export"] == "parent0"
    # The tail is the first bring-up's, towards the other node.
    first = choreography.primary_bringup(spec, spec.primary, spec.secondary)
    assert names[copy + 3 :] == [s.name for s in first[copy + 2 :]]
    # A former secondary keeps its rewriter: the primary's filters go in front of it.
    filters = [
        s for s in steps if s.name in ("add filter-mirror m0", "add filter-redirector redire0")
    ]
    assert len(filters) == 2
    assert all(f.arguments["position"] == "id=rew0" for f in filters)
    assert all(f.arguments["insert"] == "before" for f in filters)
    fresh = choreography.primary_reprotect(spec, spec.primary, spec.secondary, False)
    assert not any("position" in s.arguments for s in fresh)


def test_the_first_checkpoint_at_start_can_be_left_to_the_interval(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("checkpoint_at_start = true", "checkpoint_at_start = false")
    late = tmp_path / "late.toml"
    late.write_text(text)
    names = [s.name for s in choreography.bringup(load_spec(late))]
    assert "take the first checkpoint now" not in names
    assert "take the first checkpoint now" in [
        s.name for s in choreography.bringup(load_spec(EXAMPLE))
    ]


def test_plan_shows_tls_on_every_replication_listener_and_none_on_a_wildcard() -> None:
    from click.testing import CliRunner

    from coloft.cli.main import cli

    done = CliRunner().invoke(cli, ["plan", "--json", str(EXAMPLE)])
    assert done.exit_code == 0, done.output
    plan = json.loads(done.output)
    spec = load_spec(EXAMPLE)
    address = {n.name: n.replication_address for n in spec.nodes}
    channels = {(ls["node"], ls["channel"]) for ls in plan["listeners"]}
    assert channels == {
        ("b", "nbd"),
        ("b", "migration"),
        ("a", "chardev mirror0"),
        ("a", "chardev compare1"),
    }
    for ls in plan["listeners"]:
        assert ls["host"] == address[ls["node"]] and ls["tls"] == "tls-server", ls
    assert "0.0.0.0" not in done.output
    assert any("tls-creds-x509" in arg for arg in plan["commands"]["a"])
