"""A stranger on the replication network: the lab's witness host, routed to both
replication addresses for a while, knocking on the pair's ports with whatever
credentials it has. Used by the security tests.

Each attempt runs in the witness namespace as a small Python child (ssl module)
and reports what came back: whether the TLS handshake finished on the client's
side and whether the server ever sent data. TLS 1.3 lets a client finish its
half before the server has judged the client's certificate, so a refusal shows
as an alert or an end of stream on the first read; a port whose QEMU serves
someone else already shows as silence.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from coloft.effects import certs
from coloft.lab import net
from coloft.model.spec import PairSpec

# The witness reaches each host on 203.0.113.0/24 (net.HOSTS).
VIA = {"198.51.100.1": "203.0.113.1", "198.51.100.2": "203.0.113.2"}

_ATTEMPT = r"""
import json, socket, ssl, sys
host, port, ca, cert, key, wait = sys.argv[1:7]
out = {"connected": False, "handshake": False, "data": False, "closed": False, "error": ""}
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
if cert:
    ctx.load_cert_chain(cert, key)
try:
    raw = socket.create_connection((host, int(port)), timeout=float(wait))
    out["connected"] = True
    raw.settimeout(float(wait))
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        out["handshake"] = True
        got = s.recv(1)
        out["data"], out["closed"] = bool(got), not got
except (OSError, ssl.SSLError) as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Identity:
    """Credentials a stranger presents (cert None: none at all)."""

    name: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Attempt:
    connected: bool
    handshake: bool
    data: bool
    closed: bool
    error: str

    @property
    def served(self) -> bool:
        """Whether the server took the stranger in: it sent application data."""
        return self.data

    @property
    def refused(self) -> bool:
        """The server ended the connection: an alert, a reset or an end of stream."""
        return self.closed or ("timed out" not in self.error and bool(self.error))


def identities(spec: PairSpec, victim: str, out: Path) -> list[Identity]:
    """What a stranger may hold against `victim`'s ports: no certificate; the name
    the victim allows, signed by another CA; a name it does not allow, signed by
    the pair's own CA (a stolen certificate of some other host). Each identity
    trusts the pair's CA, so a refusal is the server's, not the client's."""
    lab = spec.certs_dir()
    allowed = spec.peer_of(victim).name
    out.mkdir(parents=True, exist_ok=True)
    other_dirs = certs.make(spec, out / "other-ca")
    forged = out / "other-ca-peer"
    forged.mkdir(exist_ok=True)
    source = next(d for d in other_dirs if d.name == allowed)
    # Both CAs: the client trusts the pair's servers, and its own certificate passes
    # its own checks (QEMU's client checks it before connecting).
    bundle = (lab / "ca-cert.pem").read_bytes() + (out / "other-ca" / "ca-cert.pem").read_bytes()
    (forged / "ca-cert.pem").write_bytes(bundle)
    for f in ("client-cert.pem", "client-key.pem"):
        (forged / f).write_bytes((source / f).read_bytes())
    wrong = certs.issue_client(lab, "w", out / "wrong-name")

    def held(name: str, d: Path) -> Identity:
        return Identity(name, d / "ca-cert.pem", d / "client-cert.pem", d / "client-key.pem")

    return [
        Identity("no certificate", lab / "ca-cert.pem"),
        held(f"name {allowed!r} from another CA", forged),
        held("the pair's CA, name 'w' not allowed", wrong),
    ]


def attempt(
    host: str, port: int, who: Identity, wait_s: float = 2.0, ns: str | None = net.WITNESS_NS
) -> Attempt:
    argv = ["/usr/bin/python3", "-c", _ATTEMPT, host, str(port), str(who.ca)]
    argv += [str(who.cert or ""), str(who.key or ""), str(wait_s)]
    done = subprocess.run(
        net.netns_argv(ns, argv), capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"intruder attempt failed: {done.stderr.strip()[-500:]}")
    return Attempt(**json.loads(done.stdout))


def nbd_attempt(host: str, port: int, who: Identity) -> str:
    """qemu-img's error opening the NBD export as `who` ("" if it opened)."""
    objects = []
    opts = f"driver=nbd,host={host},port={port},export=parent0"
    if who.cert is not None:
        d = who.cert.parent
        objects = ["--object", f"tls-creds-x509,id=t0,endpoint=client,dir={d}"]
        opts += ",tls-creds=t0"
    argv = ["qemu-img", "info", *objects, "--image-opts", opts]
    done = subprocess.run(
        net.netns_argv(net.WITNESS_NS, argv),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


@contextlib.contextmanager
def routed() -> Iterator[None]:
    """Routes from the witness to both replication addresses, for the block's length."""
    added = []
    try:
        for dst, gw in VIA.items():
            net_ip = ["ip", "-n", net.WITNESS_NS, "route"]
            subprocess.run([*net_ip, "replace", f"{dst}/32", "via", gw], check=True)
            added.append(dst)
        yield
    finally:
        for dst in added:
            subprocess.run(
                ["ip", "-n", net.WITNESS_NS, "route", "del", f"{dst}/32"],
                check=False,
                capture_output=True,
            )


def hold(host: str, port: int) -> subprocess.Popen[bytes]:
    """A connection from the witness that sends a TLS hello and then just stays open."""
    code = (
        "import socket, ssl, sys, time\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False\n"
        "ctx.verify_mode = ssl.CERT_NONE\n"
        "t = ctx.wrap_socket(s, do_handshake_on_connect=False)\n"
        "t.setblocking(False)\n"
        "try:\n    t.do_handshake()\nexcept (ssl.SSLError, OSError):\n    pass\n"
        "print('open', flush=True)\n"
        "time.sleep(600)\n"
    )
    argv = ["/usr/bin/python3", "-c", code, host, str(port)]
    proc = subprocess.Popen(net.netns_argv(net.WITNESS_NS, argv), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"open":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"could not hold a connection to {host}:{port}")
    return proc


def forge_heartbeats(host: str, port: int, pair: str, node: str, count: int = 20) -> None:
    """Datagrams from the witness that look like `node`'s heartbeats, without the key."""
    body = {"pair": pair, "node": node, "seq": 10**9, "boot": "forged", "state": "primary"}
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for path in ('replication', 'lan'):\n"
        "    for i in range(int(sys.argv[3])):\n"
        "        m = dict(json.loads(sys.argv[4]), path=path)\n"
        "        s.sendto(json.dumps(m).encode(), (sys.argv[1], int(sys.argv[2])))\n"
    )
    argv = ["/usr/bin/python3", "-c", code, host, str(port), str(count), json.dumps(body)]
    subprocess.run(net.netns_argv(net.WITNESS_NS, argv), check=True, timeout=30)


def http(host: str, port: int, request: str) -> str:
    """One HTTP request line sent from the witness; the answer's status line."""
    code = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        'body = b\'{"force": true, "on": false}\'\n'
        "s.sendall(sys.argv[3].encode() + b' HTTP/1.1\\r\\nContent-Length: '"
        " + str(len(body)).encode() + b'\\r\\n\\r\\n' + body)\n"
        "print(s.makefile('rb').readline().decode().strip())\n"
    )
    argv = ["/usr/bin/python3", "-c", code, host, str(port), request]
    done = subprocess.run(
        net.netns_argv(net.WITNESS_NS, argv), capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()
