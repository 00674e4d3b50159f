"""Wait until the guest's service answers PING, from inside a namespace.

Runs as `python -m coloft.lab.probe HOST:PORT DEADLINE_S` (Python 3.11 cannot
enter a namespace in-process), exit 0 once PONG came back.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from coloft.effects.process import netns_argv


def ping(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\n")
            return s.makefile("rb").readline().strip() == b"PONG"
    except OSError:
        return False


def wait_ready(ns: str | None, host: str, port: int, deadline_s: float) -> bool:
    argv = [sys.executable, "-m", "coloft.lab.probe", f"{host}:{port}", str(deadline_s)]
    done = subprocess.run(
        netns_argv(ns, argv), capture_output=True, check=False, timeout=deadline_s + 10
    )
    return done.returncode == 0


def main() -> int:
    host, _, port = sys.argv[1].rpartition(":")
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        if ping(host, int(port), 2.0):
            return 0
        time.sleep(0.3)
    return 1


if __name__ == "__main__":
    sys.exit(main())
