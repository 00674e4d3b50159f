"""Wait until the guest's service answers PING, or send it one request, from
inside a namespace.

Runs as `python -m coloft.lab.probe HOST:PORT DEADLINE_S` (Python 3.11 cannot
enter a namespace in-process), exit 0 once PONG came back; or as
`python -m coloft.lab.probe --ask HOST:PORT LINE`, printing the answer's line.
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


def ask(ns: str | None, host: str, port: int, line: str) -> str:
    """One request to the guest's service; its answer line ("" if none came)."""
    argv = [sys.executable, "-m", "coloft.lab.probe", "--ask", f"{host}:{port}", line]
    done = subprocess.run(netns_argv(ns, argv), capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _ask(target: str, line: str) -> int:
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5.0) as s:
            s.sendall(line.encode() + b"\n")
            print(s.makefile("rb").readline().decode(errors="replace").strip())
    except OSError as e:
        print(f"no answer: {e}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    if sys.argv[1] == "--ask":
        return _ask(sys.argv[2], sys.argv[3])
    host, _, port = sys.argv[1].rpartition(":")
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        if ping(host, int(port), 2.0):
            return 0
        time.sleep(0.3)
    return 1


if __name__ == "__main__":
    sys.exit(main())
