"""The `coloft` command. Thin: parse, call, render."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from coloft.config.load import load_spec
from coloft.core import choreography
from coloft.core.argv import qemu_argv
from coloft.effects import preflight, qemu_binary
from coloft.effects.process import netns_argv, pid_alive
from coloft.errors import ColoftError
from coloft.lab.faults import FAULT_NAMES
from coloft.model.spec import Accel, PairSpec
from coloft.model.steps import Role

SPEC = click.argument("spec", type=click.Path(path_type=Path))


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"coloft: error: {message}", err=True)
    sys.exit(code)


def _load(path: Path) -> PairSpec:
    try:
        return load_spec(path)
    except ColoftError as e:
        _fail(str(e), 2)
        raise  # unreachable; keeps mypy sure of the return


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log each step and decision to stderr.")
def cli(verbose: bool) -> None:
    """coloft: COLO fault tolerance for QEMU virtual machines.

    A pair spec (TOML) describes one VM protected on two nodes; see examples/lab.toml.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # qemu.qmp reports a peer that died (expected in a failover) as an ERROR.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@cli.command()
@SPEC
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plan(spec: Path, as_json: bool) -> None:
    """Print each side's QEMU command line, the ordered bring-up steps and the
    sockets QEMU will listen on (address, TLS credentials); runs nothing."""
    s = _load(spec)
    accel = s.vm.accel
    if accel is Accel.AUTO:
        accel = Accel.KVM if qemu_binary.kvm_usable()[0] else Accel.TCG
    binary = s.qemu_binary or qemu_binary.lab_qemu() or Path("qemu-system-x86_64")
    commands = {
        node.name: netns_argv(node.netns, qemu_argv(s, node, role, binary, accel))
        for node, role in ((s.primary, Role.PRIMARY), (s.secondary, Role.SECONDARY))
    }
    steps = choreography.bringup(s)
    listening = choreography.listeners(steps)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "commands": commands,
                    "steps": [
                        {
                            "node": st.node,
                            "name": st.name,
                            "command": st.command,
                            "arguments": st.arguments,
                            "deadline_s": st.deadline_s,
                        }
                        for st in steps
                    ],
                    "listeners": listening,
                    "spare": None if s.spare is None else s.spare.name,
                },
                indent=1,
            )
        )
        return
    for node, role in ((s.primary, "primary"), (s.secondary, "secondary")):
        click.echo(f"# {role} on node {node.name}")
        click.echo(shlex.join(commands[node.name]) + "\n")
    if s.spare is not None:
        click.echo(
            f"# spare on node {s.spare.name}: runs nothing until a node stays lost for "
            f"{s.reprotect.spare_after_s:g} s, then starts as the new secondary\n"
        )
    click.echo("# bring-up steps")
    for i, st in enumerate(steps, 1):
        args = json.dumps(st.arguments) if st.arguments else ""
        click.echo(f"{i:2}. [{st.node}] {st.name}: {st.command} {args}")
    click.echo("\n# listening sockets")
    for ls in listening:
        tls = f"tls-creds={ls['tls']}" if ls["tls"] else "plain TCP"
        click.echo(f"[{ls['node']}] {ls['channel']}: {ls['host']}:{ls['port']} {tls}")


@cli.command()
@SPEC
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def check(spec: Path, as_json: bool) -> None:
    """Preflight: QEMU binary and features, accelerator, memory, ports, disks."""
    s = _load(spec)
    checks = preflight.run_checks(s)
    ok = all(c.ok for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [c.__dict__ for c in checks]}, indent=1))
    else:
        for c in checks:
            mark = "ok  " if c.ok else "FAIL"
            click.echo(f"{mark} {c.name}: {c.detail}")
            if not c.ok and c.fix:
                click.echo(f"     fix: {c.fix}")
    sys.exit(0 if ok else 1)


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--node", required=True, help="This host's node name in every spec.")
def agent(specs: tuple[Path, ...], node: str) -> None:
    """Run this host's agent for every pair SPEC places on it (a directory: every *.toml
    in it): owns their QEMUs, holds or waits for each pair's lease, fails over on its
    own. One per host (systemd); the QEMUs die with it. Pairs on one host need distinct
    VM names and port ranges."""
    from coloft.agent.run import run_agents
    from coloft.config.load import load_spec

    loaded = []
    for path in specs:
        if path.is_dir():  # the pairs of a cluster: this host runs those that name it
            found = []
            for f in sorted(path.glob("*.toml")):
                try:
                    found.append(load_spec(f))
                except ColoftError as e:  # another host's pair must not stop this one
                    click.echo(f"coloft: skipping {f}: {e}", err=True)
            vms = [s.vm.name for s in found]
            twice = sorted({n for n in vms if vms.count(n) > 1})
            if twice:
                _fail(f"{path}: VM name(s) {', '.join(twice)} in more than one spec", 2)
            loaded += [s for s in found if node in {n.name for n in s.nodes}]
            continue
        s = _load(path)
        if node not in {n.name for n in s.nodes}:
            names = ", ".join(n.name for n in s.nodes)
            _fail(f"--node {node!r} is not a node of {path} ({names})", 2)
        loaded.append(s)
    if not loaded:
        _fail(f"no pair spec names node {node!r} in {', '.join(map(str, specs))}", 2)
    try:  # run_agents checks the pairs together before it starts anything
        asyncio.run(run_agents(loaded, node, echo=lambda line: click.echo(line, err=True)))
    except ColoftError as e:
        _fail(str(e))


@cli.command()
@SPEC
@click.pass_context
def up(ctx: click.Context, spec: Path) -> None:
    """Run a whole pair from this machine (the lab): the embedded etcd when the spec
    asks for one and an agent per node inside its namespace; Ctrl-C or `coloft down`
    stops it."""
    from coloft.agent.launch import running_launcher
    from coloft.agent.run import run_up

    s = _load(spec)
    pid = running_launcher(s)
    if pid is not None:
        _fail(f"{s.vm.name} is already up (pid {pid}); `coloft down {spec}` first")
    verbose = bool(ctx.parent and ctx.parent.params.get("verbose"))
    try:
        run_up(s, echo=lambda line: click.echo(line, err=True), verbose=verbose)
    except ColoftError as e:
        _fail(str(e))


def _agents_of(name: str) -> dict[str, dict[str, Any] | None]:
    from coloft.agent import api

    return {node: api.status_or_none(sock) for node, sock in api.agent_sockets(name).items()}


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--table", is_flag=True, help="A table per pair instead of one line.")
def status(spec: Path | None, as_json: bool, table: bool) -> None:
    """Each pair in one line: protection, leader and epoch, each node's state, how
    recently each heartbeat path heard the peer, and the reason. Asks the agents."""
    from coloft.agent import api
    from coloft.model.status import one_line, pair_view

    names = [_load(spec).vm.name] if spec else api.pairs_here()
    pairs = []
    for name in names:
        agents = _agents_of(name)
        if agents:
            view = pair_view(name, agents)
            if as_json:
                view["agents"] = agents
            pairs.append(view)
    if as_json:
        click.echo(json.dumps({"pairs": pairs}, indent=1))
        return
    if not pairs:
        click.echo("no pairs running" + (f" for {spec}" if spec else ""))
        sys.exit(1)
    from coloft.cli.view import status_table

    for view in pairs:
        click.echo(status_table(view) if table else one_line(view))


@cli.command()
@SPEC
@click.option("--force", is_flag=True, help="Take over even where the safety rules refuse.")
@click.option(
    "--accept-data-loss",
    is_flag=True,
    help="Required with --force: the secondary may lack acknowledged writes.",
)
def failover(spec: Path, force: bool, accept_data_loss: bool) -> None:
    """Planned failover: the leader hands over to its secondary, which takes over.
    Refused unless the secondary is the in-sync node; --force overrides that."""
    from coloft.agent import api

    s = _load(spec)
    if force and not accept_data_loss:
        _fail("--force may lose acknowledged writes; add --accept-data-loss to confirm", 2)
    agents = _agents_of(s.vm.name)
    leader = next((n for n, v in agents.items() if v and v["state"] in ("primary", "alone")), None)
    if leader is None and not force:
        _fail(f"{s.vm.name}: no leading agent answers; only --force can make a node take over")
    others = [n for n in agents if n != leader and agents[n] is not None]
    answer: dict[str, Any] = {}
    try:
        # The others first: a forced secondary must be ready to acquire once the leader resigns.
        for node in [*others, *([leader] if leader else [])]:
            sock = api.socket_path(s, node)
            answer = api.call(sock, "POST", "/failover", {"force": force}, timeout=5.0)
    except ColoftError as e:
        _fail(str(e))
    if not answer:
        _fail(f"{s.vm.name}: no agent answers")
    click.echo(f"{answer['node']}: {answer['state']} ({answer['reason']})")
    if answer["state"] not in ("fenced", "alone") and not (leader is None and force):
        sys.exit(1)


def _progress(line: str) -> None:
    click.echo(f"  {line}", err=True)


def _report(result: dict[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(result) if as_json else text)


@cli.command()
@SPEC
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Directory for the CA and one directory per node (default: the spec's [security] certs).",
)
def certs(spec: Path, out: Path | None) -> None:
    """A small CA and, per node, the server and client certificates QEMU's
    tls-creds-x509 reads (CA, server cert with the node's name and replication
    address, client cert), and the pair's heartbeat key, in the spec's
    [security] certs directory (default /etc/coloft/tls/VM); copy each node's
    directory to its host. Keeps what exists; keys readable by root alone."""
    from coloft.effects import certs as made

    s = _load(spec)
    target = out or s.certs_dir()
    try:
        dirs = made.make(s, target)
    except ColoftError as e:
        _fail(str(e))
    for d in dirs:
        click.echo(f"{d.name}: {d}  (copy to that host)")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path), required=False)
@click.option(
    "--pair", "pair_name", help="Only this pair (default: the spec's, else every pair here)."
)
@click.option("--follow", is_flag=True, help="Keep printing new events until interrupted.")
@click.option("--since", type=float, default=0.0, help="Only events after this unix time.")
def events(spec: Path | None, pair_name: str | None, follow: bool, since: float) -> None:
    """The agents' events, oldest first, one JSON object per line: state changes,
    decisions, failover and re-protection steps, verdicts, operator actions. Each
    has unix, pair, node, kind, text (and kind-specific keys)."""
    import time

    from coloft.agent import api
    from coloft.cli import ops

    names = [pair_name] if pair_name else [_load(spec).vm.name] if spec else api.pairs_here()
    if not names:
        _fail("no pairs here; name one with --pair")
    while True:
        for name in names:
            for e in ops.pair_events(name, since):
                click.echo(json.dumps(e))
                since = max(since, float(e["unix"]))
        if not follow:
            return
        time.sleep(0.5)


def _switch(spec: Path, on: bool, timeout: float, as_json: bool) -> None:
    from coloft.cli import ops

    s = _load(spec)
    try:
        r = ops.switch(s, on, timeout, None if as_json else _progress)
    except ColoftError as e:
        _fail(str(e))
    text = (
        f"PROTECTED by {r['leader']} ({r['took_ms']:.0f} ms)"
        if on
        else f"unprotected, running alone on {r['leader']}"
    )
    _report(r, as_json, f"{s.vm.name}: {text}")


@cli.command()
@SPEC
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def protect(spec: Path, timeout: float, as_json: bool) -> None:
    """Switch protection on for a VM that runs alone: the other node (its agent must
    run) becomes a fresh secondary, disk and memory are copied while the guest
    serves, then PROTECTED. Progress goes to stderr. The switch is kept in etcd."""
    _switch(spec, True, timeout, as_json)


@cli.command()
@SPEC
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def unprotect(spec: Path, timeout: float, as_json: bool) -> None:
    """Switch protection off: the leader drops its secondary (no failover, the guest
    keeps running) and the pair stays unprotected until `coloft protect`."""
    _switch(spec, False, timeout, as_json)


@cli.command()
@SPEC
@click.option("--timeout", default=180.0, show_default=True, help="Seconds per wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def switchover(spec: Path, timeout: float, as_json: bool) -> None:
    """Planned role swap of a PROTECTED pair (host maintenance): the secondary takes
    over with no acknowledged write lost, then the old primary is re-protected as
    the new secondary."""
    from coloft.cli import ops

    s = _load(spec)
    try:
        r = ops.switchover(s, timeout, None if as_json else _progress)
    except ColoftError as e:
        _fail(str(e))
    _report(r, as_json, _leg_text(r))


def _leg_text(r: dict[str, Any]) -> str:
    return (
        f"{r['from']} -> {r['to']}: serving after {r['takeover_ms']:.0f} ms, PROTECTED again "
        f"after {r['protected_again_ms']} ms (guest paused {r['guest_paused_ms']} ms)"
    )


@cli.command()
@SPEC
@click.option("--timeout", default=180.0, show_default=True, help="Seconds per wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def drill(spec: Path, timeout: float, as_json: bool) -> None:
    """Failover drill: switchover there and back, then a short report. Exits non-zero
    when a leg failed or did not end PROTECTED."""
    from coloft.cli import ops

    s = _load(spec)
    try:
        r = ops.drill(s, timeout, None if as_json else _progress)
    except ColoftError as e:
        _fail(f"drill failed: {e}")
    _report(r, as_json, "\n".join([f"{s.vm.name}: drill passed", *map(_leg_text, r["legs"])]))


@cli.command()
@SPEC
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
def down(spec: Path, timeout: float) -> None:
    """Stop a pair started by `coloft up`: agents stop their QEMUs, then etcd stops."""
    import time

    from coloft.agent.launch import running_launcher

    s = _load(spec)
    pid = running_launcher(s)
    if pid is None:
        click.echo(f"{s.vm.name}: not running")
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if pid_alive(pid):
        _fail(f"`coloft up` pid {pid} still running after {timeout:g} s")
    click.echo(f"{s.vm.name}: stopped")


@cli.group()
def lab() -> None:
    """The simulated hosts (network namespaces) and the guest image."""


@lab.command("up")
def lab_up() -> None:
    """Create the namespaces, links and the lab guest; idempotent."""
    from coloft.lab import setup

    try:
        paths = setup.lab_up()
    except ColoftError as e:
        _fail(str(e))
    click.echo(f"lab up; spec: {paths}")


@lab.command("image")
@click.argument("guest_file", type=click.Path(path_type=Path), required=False)
def lab_image(guest_file: Path | None) -> None:
    """Build (or find cached) the lab guest, with GUEST_FILE's Debian packages and
    services when given (examples/guests/redis.toml); prints the paths as JSON."""
    from coloft.lab import guest

    try:
        extra = None if guest_file is None else guest.load_guest_spec(guest_file)
        image = guest.build_guest(extra=extra)
    except guest.GuestBuildError as e:
        _fail(str(e))
    paths = {k: str(v) for k, v in image.__dict__.items()}
    click.echo(json.dumps(paths, indent=1))


@lab.command("down")
def lab_down() -> None:
    """Remove every lab namespace and link, even after a crash; idempotent."""
    from coloft.lab import net

    net.lab_down()
    click.echo("lab down")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def lab_status(as_json: bool) -> None:
    """Show which lab namespaces and links exist."""
    from coloft.lab import net

    data = net.lab_status()
    click.echo(json.dumps(data, indent=1 if as_json else None))


@cli.command()
@click.option("--duration", default=60.0, show_default=True, help="Seconds of client load.")
@click.option(
    "--json", "as_json", is_flag=True, help="No live view; print one JSON summary as the last line."
)
@click.option("--interval-ms", default=2000, show_default=True, help="Checkpoint interval.")
@click.option(
    "--fault",
    type=click.Choice(sorted([*FAULT_NAMES, "kill-host"])),
    help="Inject this fault into the protected pair at 40% of the run; the summary "
    "gains a `failover` object, or for a comparison-path fault (drop-/reset-mirror|compare, "
    "cut-compare, drop-replication, freeze-secondary; lifted after 5 s) a `protection` object.",
)
@click.option(
    "--reprotect",
    is_flag=True,
    help="After a failover fault, let the failed side come back (its agent restarted if it "
    "was killed) and be re-protected as the new secondary; the summary gains a `reprotect` "
    "object {protected_again_ms, synced_bytes, ...}.",
)
@click.option(
    "--workload",
    "workload_name",
    type=click.Choice(["redis"]),
    help="Run the guest of examples/guests/NAME.toml (Debian's Redis) and drive it with "
    "Debian's redis-benchmark and redis-cli from the client host; the summary gains a "
    "`workload` object {name, client, requests, errors, resets, latency_ms_p50, "
    "latency_ms_p99, lost_acked_writes}.",
)
@click.option(
    "--pairs",
    type=click.IntRange(1, 9),
    help="Run this many pairs around the lab's hosts (three hosts from 3 pairs on), one "
    "agent per host for all of them; with --fault kill-host the primary host of the first "
    "pair is killed. Prints `pairs: [{name, state, gap_ms, lost_acked_writes, ...}]` and "
    "`metrics_ok`.",
)
def demo(
    duration: float,
    as_json: bool,
    interval_ms: int,
    fault: str | None,
    reprotect: bool,
    workload_name: str | None,
    pairs: int | None,
) -> None:
    """Lab up, a protected pair, client load with a live view, then a summary; cleans up."""
    from coloft.lab.demo import run_demo

    if pairs is not None:
        _fleet_demo(pairs, duration, interval_ms, fault, as_json, reprotect or workload_name)
    if fault == "kill-host":
        _fail("--fault kill-host needs --pairs N (one agent per host running several pairs)", 2)
    try:
        summary = asyncio.run(
            run_demo(
                duration,
                interval_ms,
                live=not as_json,
                fault=fault,
                reprotect=reprotect,
                workload_name=workload_name,
            )
        )
    except ColoftError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        from coloft.cli.view import summary_text

        click.echo(summary_text(summary))
    if fault is None:
        held = summary["protected"]
    elif "protection" in summary:
        held = summary["protection"]["degraded_after_ms"] is not None
    else:
        held = not summary["failover"]["error"]
        if "reprotect" in summary:
            held = held and summary["reprotect"]["protected_again_ms"] is not None
    ok = not summary["lost_acked_writes"] and held
    w = summary.get("workload")
    if w is not None:
        ok = ok and not w["errors"] and not w["lost_acked_writes"]
    sys.exit(0 if ok else 1)


def _fleet_demo(
    pairs: int,
    duration: float,
    interval_ms: int,
    fault: str | None,
    as_json: bool,
    other: object,
) -> None:
    from coloft.lab.fleet_demo import run_fleet_demo

    if other:
        _fail("--pairs runs the lab's own client on each pair: no --reprotect or --workload", 2)
    if fault not in (None, "kill-host"):
        _fail(f"with --pairs the only fault is kill-host, not {fault}", 2)
    try:
        summary = asyncio.run(run_fleet_demo(pairs, duration, interval_ms, fault))
    except (ColoftError, TimeoutError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for r in summary["pairs"]:
            click.echo(
                f"{r['name']} on {'+'.join(r['hosts'])}: {r['state']} (leader {r['leader']}), "
                f"gap {r['gap_ms']} ms, {r['requests_failed']} failed, "
                f"{r['lost_acked_writes']} acknowledged writes lost"
            )
        click.echo(f"metrics ok: {summary['metrics_ok']} {summary['metrics_errors']}")
    ok = summary["metrics_ok"] and all(
        r["lost_acked_writes"] == 0 and r["requests_failed"] == 0 for r in summary["pairs"]
    )
    if fault:
        ok = ok and all(
            r["leader"] != summary["killed_host"]
            and (r["affected"] or (r["state"] == "PROTECTED" and not r["ever_unprotected"]))
            for r in summary["pairs"]
        )
    sys.exit(0 if ok else 1)


def main() -> None:
    cli()
