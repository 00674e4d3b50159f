"""Spec validation: every error names the file, the field and what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coloft.config.load import check_together, load_spec
from coloft.core.ports import heartbeat_port
from coloft.errors import ConfigError
from coloft.model.spec import Accel, PairSpec, Policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.toml"

GOOD = """
[vm]
name = "web"
memory_mib = 256
disk = "disk.raw"

[nodes.x]
replication_address = "198.51.100.1"
bridge = "br0"
port_base = 9000
disk = "x.raw"

[nodes.y]
replication_address = "198.51.100.2"
bridge = "br0"
port_base = 9100
disk = "y.raw"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pair.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_spec(write(tmp_path, text))
    return str(info.value)


def test_example_spec_loads() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.vm.name == "demo"
    assert spec.primary.name == "a" and spec.secondary.name == "b"
    assert spec.vm.service == ("192.0.2.10", 7000)
    assert spec.tuning.checkpoint_interval_ms == 2000


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.vm.vcpus == 1 and spec.vm.accel is Accel.AUTO and spec.vm.machine == "pc"
    assert spec.disk_of(spec.primary) == tmp_path / "x.raw"
    assert spec.tuning.compare_timeout_ms == 3000
    assert spec.run_dir_of(spec.primary) == Path("/run/coloft/web/x")


def test_primary_key_picks_initial_primary(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, 'primary = "y"\n' + GOOD))
    assert (spec.primary.name, spec.secondary.name) == ("y", "x")
    assert spec.spare is None and spec.peer_of("y").name == "x"


SPARE = """
[nodes.s]
replication_address = "198.51.100.3"
bridge = "br0"
port_base = 9200
disk = "s.raw"
"""


def test_a_third_node_is_the_named_spare(tmp_path: Path) -> None:
    text = 'spare = "s"\nprimary = "y"\n' + GOOD.replace("[nodes.x]", SPARE + "\n[nodes.x]")
    spec = load_spec(write(tmp_path, text + "[reprotect]\nspare_after_s = 3\n"))
    assert [n.name for n in spec.nodes] == ["y", "x", "s"]
    assert spec.spare is not None and spec.spare.name == "s"
    assert spec.first_members == ("y", "x") and spec.reprotect.spare_after_s == 3.0
    assert spec.peer_of("s", ("y", "s")).name == "y"
    assert "the spare" in error_of(tmp_path, text.replace('primary = "y"', 'primary = "s"'))
    same = text.replace('"198.51.100.3"', '"198.51.100.1"')
    assert "[nodes.s].replication_address: same as node 'x'" in error_of(tmp_path, same)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t.replace("memory_mib = 256\n", ""),
            r"pair\.toml: \[vm\]\.memory_mib: required field is missing",
        ),
        (
            lambda t: t.replace("memory_mib = 256", 'memory_mib = "lots"'),
            r"\[vm\]\.memory_mib: expected an integer, got a string \('lots'\)",
        ),
        (
            lambda t: t.replace("memory_mib = 256", "memory_mib = 256\nmemroy = 1"),
            r"\[vm\]: unknown key 'memroy'",
        ),
        (
            lambda t: t.replace("memory_mib = 256", "memory_mib = 0"),
            r"\[vm\]\.memory_mib: 0 MiB is out of range 32\.\.1048576 MiB",
        ),
        (
            lambda t: t.replace("memory_mib = 256", "memory_mib = 99999999"),
            r"\[vm\]\.memory_mib: 99999999 MiB is out of range",
        ),
        (
            lambda t: t.replace("memory_mib = 256", "memory_mib = true"),
            r"\[vm\]\.memory_mib: expected an integer, got a boolean",
        ),
        (
            lambda t: t.replace("port_base = 9100", "port_base = 80"),
            r"\[nodes\.y\]\.port_base: 80 is out of range",
        ),
        (
            lambda t: t.replace('"198.51.100.2"', '"not-an-ip"'),
            r"\[nodes\.y\]\.replication_address: 'not-an-ip' is not an IP address",
        ),
        (
            lambda t: t.replace('"198.51.100.2"', '"198.51.100.1"'),
            r"\[nodes\.y\]\.replication_address: same as node 'x'",
        ),
        (
            lambda t: t + "\n[tuning]\ncheckpoint_interval_ms = 5\n",
            r"\[tuning\]\.checkpoint_interval_ms: 5 ms is out of range",
        ),
        (lambda t: t + "\n[tuning]\nbogus = 1\n", r"\[tuning\]: unknown key 'bogus'"),
        (lambda t: "extra = 1\n" + t, r"spec: unknown key 'extra'"),
        (
            lambda t: t.replace('name = "web"', 'name = "Web Server"'),
            r"\[vm\]\.name: 'Web Server' is not a name",
        ),
        (
            lambda t: t.replace('name = "web"', 'name = "web"\nmachine = "q35"'),
            r"\[vm\]\.machine: 'q35' is not an i440fx machine type",
        ),
        (
            lambda t: t.replace('name = "web"', 'name = "web"\naccel = "hvf"'),
            r"\[vm\]\.accel: 'hvf' is not one of kvm, tcg, auto",
        ),
        (
            lambda t: t.replace('name = "web"', 'name = "web"\nservice = "nowhere"'),
            r"\[vm\]\.service: 'nowhere' is not ADDRESS:PORT",
        ),
        (lambda t: 'primary = "z"\n' + t, r"spec\.primary: 'z' is not one of the nodes"),
        (
            lambda t: t.split("[nodes.y]")[0],
            r"\[nodes\]: a pair needs exactly two nodes \(three with `spare`\), found 1",
        ),
        (lambda t: 'spare = "q"\n' + t, r"spec\.spare: 'q' is not one of the nodes"),
        (
            lambda t: 'spare = "y"\n' + t,
            r"\[nodes\]: a pair needs two nodes and the spare, found 2",
        ),
        (lambda t: t.replace("[vm]", "[vmm]"), r"\[vm\]: required table is missing"),
        (
            # Two nodes in one namespace are one host (the lab): one disk file each.
            lambda t: t.replace('disk = "y.raw"', 'netns = "h"').replace(
                'disk = "x.raw"', 'netns = "h"'
            ),
            r"\[nodes\.y\]\.disk: nodes 'x' and 'y' would open .*disk\.raw on the same host",
        ),
    ],
)
def test_bad_specs_are_named_precisely(tmp_path: Path, edit: object, expected: str) -> None:
    assert callable(edit)
    message = error_of(tmp_path, edit(GOOD))
    assert str(tmp_path / "pair.toml") in message
    assert re.search(expected, message), message


def test_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(tmp_path, "[vm\nname=")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read spec"):
        load_spec(tmp_path / "nope.toml")


def test_example_names_its_witness_and_heartbeat_paths() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.arbiter.endpoints == ("203.0.113.3:2379",)
    assert spec.arbiter.embedded_netns == "coloft-w"
    assert spec.heartbeat.timeout_s == pytest.approx(0.15)
    assert spec.primary.lan_address == "192.0.2.1"
    # The lab's pairs share one heartbeat port; without it each pair has its own.
    assert heartbeat_port(spec.primary, spec.heartbeat.port) == 9460
    assert heartbeat_port(spec.primary, 0) == spec.primary.port_base + 6


def test_arbiter_defaults_to_an_embedded_etcd_here(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.arbiter.embedded_netns == "" and spec.arbiter.endpoints == ("127.0.0.1:2379",)
    existing = load_spec(
        write(tmp_path, GOOD + '[arbiter]\nembedded = false\nendpoints = ["e1:2379", "e2:2379"]\n')
    )
    assert existing.arbiter.embedded_netns is None and len(existing.arbiter.endpoints) == 2


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("[arbiter]\nttl_s = 2\nrenew_every_s = 1.5\n", "unsafe lease timing: renew_every_s"),
        ("[arbiter]\nttl_s = 2.5\n", "whole number of seconds"),
        ("[arbiter]\nendpoints = []\n", "non-empty array of strings"),
        ("[arbiter]\nendpoints = ['nohost']\n", "expected host:port"),
        ("[arbiter]\nendpoints = ['a:1', 'b:2']\n", "an embedded etcd has exactly one endpoint"),
        ("[arbiter]\nembedded = 'yes'\n", "[arbiter].embedded: expected a boolean"),
        ("[arbiter]\nttl = 2\n", "unknown key 'ttl'"),
        ("[heartbeat]\nmisses = 1\n", "[heartbeat].misses: 1 is out of range 2..100"),
        ("[heartbeat]\nport = 70000\n", "[heartbeat].port: 70000 is out of range 0..65535"),
        ("[heartbeat]\ninterval_ms = 'fast'\n", "[heartbeat].interval_ms: expected an integer"),
        (
            "[policy]\nmirror = 'reconnect'\n",
            "[policy].mirror: 'reconnect' is not one of alert, re-establish, run-alone",
        ),
        ("[policy]\nnbd = 'alert'\n", "[policy]: unknown key 'nbd'"),
        ("[reprotect]\nauto = 1\n", "[reprotect].auto: expected a boolean"),
        ("[reprotect]\nbackoff_s = 10\nbackoff_max_s = 5\n", "5 s is below backoff_s 10 s"),
        ("[reprotect]\ndisk_mib_s = -1\n", "[reprotect].disk_mib_s: -1 is out of range"),
        ("[tuning]\nmigration_mib_s = 0\n", "[tuning].migration_mib_s: 0 MiB/s is out of range"),
        (
            "[security]\nreplication = 'opportunistic'\n",
            "[security].replication: 'opportunistic' is not one of required, off",
        ),
        ("[security]\ncerts = ''\n", "[security].certs: path is empty"),
        ("[security]\ntls = true\n", "[security]: unknown key 'tls'"),
    ],
)
def test_arbiter_and_heartbeat_errors(tmp_path: Path, table: str, words: str) -> None:
    message = error_of(tmp_path, GOOD + table)
    assert words in message, message


def test_policies_default_and_can_be_chosen(tmp_path: Path) -> None:
    d = load_spec(write(tmp_path, GOOD)).policy
    assert (d.mirror, d.compare_in, d.probe) == (
        Policy.REESTABLISH,
        Policy.REESTABLISH,
        Policy.ALERT,
    )
    chosen = load_spec(
        write(tmp_path, GOOD + "[policy]\nmirror = 'run-alone'\ncompare-in = 'alert'\n")
    ).policy
    assert (chosen.mirror, chosen.compare_in, chosen.probe) == (
        Policy.RUN_ALONE,
        Policy.ALERT,
        Policy.ALERT,
    )


def test_reprotection_defaults_on_and_can_be_tuned(tmp_path: Path) -> None:
    d = load_spec(write(tmp_path, GOOD)).reprotect
    assert (d.auto, d.backoff_s, d.backoff_max_s, d.disk_mib_s) == (True, 2.0, 60.0, 0)
    off = load_spec(write(tmp_path, GOOD + "[reprotect]\nauto = false\ndisk_mib_s = 50\n"))
    assert not off.reprotect.auto and off.reprotect.disk_mib_s == 50


def test_replication_is_encrypted_unless_turned_off(tmp_path: Path) -> None:
    d = load_spec(write(tmp_path, GOOD))
    assert d.security.tls and d.certs_of(d.primary) == Path("/etc/coloft/tls/web/x")
    off = load_spec(write(tmp_path, GOOD + "[security]\nreplication = 'off'\ncerts = 'tls'\n"))
    assert not off.security.tls and off.certs_dir() == tmp_path / "tls"


def test_the_two_hosts_example_loads() -> None:
    spec = load_spec(EXAMPLE.with_name("two-hosts.toml"))
    assert (spec.primary.name, spec.secondary.name) == ("hv1", "hv2")
    assert spec.arbiter.embedded_netns is None and spec.metrics_port == 9470


@pytest.mark.parametrize("name", ["coloft-agent@.service", "coloft-agent.service"])
def test_the_systemd_units_kill_a_hung_agent_before_its_lease_can_pass(name: str) -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    assert unit.read(EXAMPLE.parents[1] / "deploy" / name)
    service = unit["Service"]
    assert service["Type"] == "notify" and service["KillMode"] == "control-group"
    watchdog = float(service["WatchdogSec"].removesuffix("s"))
    spec = load_spec(EXAMPLE)
    assert watchdog < spec.arbiter.ttl_s - spec.arbiter.fence_margin_s


def variant(tmp_path: Path, name: str, replace: dict[str, str]) -> PairSpec:
    """The example with `replace` done, and disks of its own unless `replace` says."""
    replace = {"disk-a.raw": f"disk-a-{name}.raw", "disk-b.raw": f"disk-b-{name}.raw", **replace}
    text = EXAMPLE.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_spec(path)


def test_pairs_of_one_host_need_their_own_names_and_ports(tmp_path: Path) -> None:
    one = load_spec(EXAMPLE)
    two = variant(
        tmp_path, "two", {'name = "demo"': 'name = "web"', "port_base = 9000": "port_base = 9100"}
    )
    check_together([one, two], "a")  # the metrics port is shared on purpose
    same_name = variant(tmp_path, "same", {"port_base = 9000": "port_base = 9100"})
    with pytest.raises(ConfigError, match="VM name 'demo' is also"):
        check_together([one, same_name], "a")
    close = variant(
        tmp_path, "close", {'name = "demo"': 'name = "web"', "port_base = 9000": "port_base = 9004"}
    )
    with pytest.raises(
        ConfigError, match=r"port 9004 on 198\.51\.100\.1 is also used by pair 'demo'"
    ):
        check_together([one, close], "a")
    same_disk = variant(
        tmp_path,
        "disk",
        {
            'name = "demo"': 'name = "db"',
            "port_base = 9000": "port_base = 9100",
            "disk-b.raw": "disk-b.raw",
        },
    )
    check_together([one, same_disk], "a")  # b's disk is not on a
    with pytest.raises(ConfigError, match=r"disk-b\.raw on node 'b' is also pair 'demo'"):
        check_together([one, same_disk], "b")
    with pytest.raises(ConfigError, match="no node 'c'"):
        check_together([one], "c")
    taps = variant(
        tmp_path,
        "taps",
        {'name = "demo"': 'name = "databases-primary-1"', "port_base = 9000": "port_base = 9100"},
    )
    taps2 = variant(
        tmp_path,
        "taps2",
        {'name = "demo"': 'name = "databases-primary-2"', "port_base = 9000": "port_base = 9200"},
    )
    with pytest.raises(ConfigError, match="same TAP device 'ct-databases-pr'"):
        check_together([taps, taps2], "a")
    on_metrics = variant(
        tmp_path, "m", {'name = "demo"': 'name = "web"', "port_base = 9000": "port_base = 9466"}
    )
    with pytest.raises(ConfigError, match="metrics port 9470"):
        check_together([one, on_metrics], "a")
