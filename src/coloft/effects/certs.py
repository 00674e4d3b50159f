"""A small CA and per-node x509 certificates for the replication channels, made with
the openssl command line.

Each node's directory holds what QEMU's tls-creds-x509 object reads (dir=): the CA
certificate, a server certificate (the node's name and replication address, for the
channels it serves: NBD, migration, the primary's packet-channel ends) and a client
certificate (its name, for the channels it connects to), and the pair's shared
heartbeat key. Keys are readable by root alone. Existing files are kept: running it
again adds only what is missing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path

from coloft.errors import FatalError
from coloft.model.spec import PairSpec

DAYS = 825
# The agents' shared key for authenticating heartbeats (effects.heartbeat).
KEY_FILE = "heartbeat.key"


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FatalError(f"openssl {args[0]}: {done.stderr.strip()[-500:]}")


def _key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    os.chmod(path, 0o600)


def _ca(out: Path) -> tuple[Path, Path]:
    cert, key = out / "ca-cert.pem", out / "ca-key.pem"
    if not cert.exists():
        _key(key)
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            str(key),
            "-out",
            str(cert),
            "-days",
            str(DAYS),
            "-subj",
            "/CN=coloft replication CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
    return cert, key


def _issue(ca: tuple[Path, Path], cn: str, usage: str, san: str, cert: Path, key: Path) -> None:
    if cert.exists():
        return
    _key(key)
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(
            f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
        )
        _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[0]),
            "-CAkey",
            str(ca[1]),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            str(DAYS),
            "-extfile",
            str(ext),
        )


def make(spec: PairSpec, out: Path) -> list[Path]:
    """The CA in `out`, one directory per node; returns the node directories."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca = _ca(out)
    key = out / KEY_FILE
    if not key.exists():
        key.write_text(secrets.token_hex(32) + "\n")
        os.chmod(key, 0o600)
    made = []
    for node in spec.nodes:
        d = out / node.name
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        (d / "ca-cert.pem").write_bytes(ca[0].read_bytes())
        (d / KEY_FILE).write_bytes(key.read_bytes())
        os.chmod(d / KEY_FILE, 0o600)
        san = f"DNS:{node.name},IP:{node.replication_address}"
        _issue(ca, node.name, "serverAuth", san, d / "server-cert.pem", d / "server-key.pem")
        _issue(
            ca,
            node.name,
            "clientAuth",
            f"DNS:{node.name}",
            d / "client-cert.pem",
            d / "client-key.pem",
        )
        made.append(d)
    return made


def issue_client(ca_dir: Path, name: str, out: Path) -> Path:
    """A client certificate for `name` from the CA in `ca_dir`, in a directory of its
    own that QEMU's tls-creds-x509 (endpoint=client) reads."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca = ca_dir / "ca-cert.pem", ca_dir / "ca-key.pem"
    (out / "ca-cert.pem").write_bytes(ca[0].read_bytes())
    _issue(ca, name, "clientAuth", f"DNS:{name}", out / "client-cert.pem", out / "client-key.pem")
    return out


def heartbeat_key(node_dir: Path) -> bytes:
    """The pair's heartbeat key from a node's directory."""
    path = node_dir / KEY_FILE
    try:
        text = path.read_text().strip()
        return bytes.fromhex(text)
    except (OSError, ValueError) as e:
        raise FatalError(f"{path}: no heartbeat key ({e}); run `coloft certs SPEC`") from e
