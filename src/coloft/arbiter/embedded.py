"""Run a single-member etcd as a child process: the default witness.

The witness must never outlive the agent that started it (an orphaned etcd
holding a stale leader key would keep fencing decisions alive with nobody
watching), so the child gets PR_SET_PDEATHSIG=SIGKILL. That signal fires when
the *thread* that forked it exits: call start_etcd from a long-lived thread.

Debian's etcd-server package installs a systemd unit; we never rely on it and
always run our own process on our own data dir and ports.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from coloft.effects.process import die_with_parent, netns_argv
from coloft.errors import FatalError, TransientError

ETCD_BINARY = Path("/usr/bin/etcd")


def probe_health(client_url: str, timeout_s: float = 0.5) -> bool:
    """True iff etcd at client_url answers /health with health=true."""
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=timeout_s) as resp:
            return b'"health":"true"' in resp.read().replace(b" ", b"")
    except (OSError, urllib.error.URLError):
        return False


def _healthy(client_url: str, netns: str | None) -> bool:
    if netns is None:
        return probe_health(client_url)
    # 127.0.0.1 inside a namespace is not ours: ask from within it.
    code = "import sys; from coloft.arbiter.embedded import probe_health as p; "
    code += "sys.exit(0 if p(sys.argv[1]) else 1)"
    argv = netns_argv(netns, [sys.executable, "-c", code, client_url])
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


@dataclass
class EtcdProcess:
    """A running etcd child; `endpoint` is the host:port the arbiter dials."""

    name: str
    client_url: str
    data_dir: Path
    log_path: Path
    netns: str | None
    argv: list[str]
    popen: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return urlsplit(self.client_url).netloc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace_s; returns once the process is reaped."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def etcd_argv(data_dir: Path, client_url: str, peer_url: str, name: str) -> list[str]:
    """The command line of a single-member cluster; pure, so tests can read it."""
    return [
        str(ETCD_BINARY),
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={name}={peer_url}",
        # Ignored by etcd when data_dir already holds a member: restarts keep state.
        "--initial-cluster-state=new",
        "--logger=zap",
        "--log-outputs=stderr",
    ]


def start_etcd(
    data_dir: Path,
    client_url: str = "http://127.0.0.1:2379",
    peer_url: str = "http://127.0.0.1:2380",
    name: str = "coloft",
    *,
    netns: str | None = None,
    ready_timeout_s: float = 15.0,
) -> EtcdProcess:
    """Start etcd on data_dir and return once it answers /health.

    Raises FatalError if the binary is missing or etcd exits during start-up
    (with its exit code, command line and log tail), TransientError if it is
    still not healthy after ready_timeout_s (it is killed in that case).
    """
    if not ETCD_BINARY.exists():
        raise FatalError(f"{ETCD_BINARY} not found: install the Debian package etcd-server")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = data_dir.with_name(f"{data_dir.name}.etcd.log")
    argv = netns_argv(netns, etcd_argv(data_dir, client_url, peer_url, name))
    # ETCD_* variables would silently override or conflict with our flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            # preexec_fn is the only way to set PDEATHSIG from Python.
            preexec_fn=die_with_parent(),
        )
    proc = EtcdProcess(name, client_url, data_dir, log_path, netns, argv, popen)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FatalError(
                f"etcd exited with code {popen.returncode} during start-up\n"
                f"  command: {shlex.join(argv)}\n  log: {proc.log_tail() or '(empty)'}"
            )
        if _healthy(client_url, netns):
            return proc
        time.sleep(0.05)
    proc.stop()
    raise TransientError(
        f"etcd at {client_url} not healthy after {ready_timeout_s:g}s\n"
        f"  command: {shlex.join(argv)}\n  log: {proc.log_tail() or '(empty)'}"
    )
