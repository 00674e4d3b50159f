"""`coloft certs`: a CA and per-node certificates that openssl itself accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from coloft.config.load import load_spec
from coloft.effects.certs import heartbeat_key, make
from coloft.lab.setup import EXAMPLE_SPEC


def openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=True)
    return done.stdout


def test_each_node_gets_a_server_and_a_client_certificate_from_one_ca(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLE_SPEC)
    dirs = make(spec, tmp_path / "tls")
    assert [d.name for d in dirs] == ["a", "b"]
    ca = tmp_path / "tls" / "ca-cert.pem"
    for d, node in zip(dirs, spec.nodes, strict=True):
        files = sorted(p.name for p in d.iterdir())
        assert files == [
            "ca-cert.pem",
            "client-cert.pem",
            "client-key.pem",
            "heartbeat.key",
            "server-cert.pem",
            "server-key.pem",
        ]
        assert (d / "heartbeat.key").stat().st_mode & 0o077 == 0
        assert len(heartbeat_key(d)) == 32
        for kind in ("server", "client"):
            cert = d / f"{kind}-cert.pem"
            assert "OK" in openssl("verify", "-CAfile", str(ca), str(cert))
            assert (d / f"{kind}-key.pem").stat().st_mode & 0o077 == 0
        text = openssl("x509", "-in", str(d / "server-cert.pem"), "-noout", "-text")
        assert f"IP Address:{node.replication_address}" in text and "TLS Web Server" in text
        assert f"CN = {node.name}" in text or f"CN={node.name}" in text
    # Run again: nothing is replaced.
    before = (dirs[0] / "server-cert.pem").read_bytes()
    key = heartbeat_key(dirs[0])
    make(spec, tmp_path / "tls")
    assert (dirs[0] / "server-cert.pem").read_bytes() == before
    assert heartbeat_key(dirs[0]) == heartbeat_key(dirs[1]) == key


def test_the_cli_writes_where_the_spec_reads(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from coloft.cli.main import cli
    from tests.unit.test_config import GOOD

    spec = tmp_path / "pair.toml"
    spec.write_text(GOOD + '[security]\ncerts = "tls"\n')
    done = CliRunner().invoke(cli, ["certs", str(spec)])
    assert done.exit_code == 0, done.output
    assert f"x: {tmp_path / 'tls' / 'x'}" in done.output
    assert len(heartbeat_key(load_spec(spec).certs_of(load_spec(spec).primary))) == 32
