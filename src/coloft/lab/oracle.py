"""The split-brain oracle: did both hosts ever put the VM's frames on the LAN at once?

Each host's tap counts the frames its VM sent (the tap's rx side). A secondary
in COLO sends nothing there: its output is redirected to the primary's
colo-compare. So frames leaving both taps in the same short window mean two
active copies. The counters are read from /proc/PID/net/dev of a `sleep` kept
in each host namespace (cheap enough to sample every few milliseconds).
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from dataclasses import dataclass, field

from coloft.effects.process import netns_argv

SAMPLE_S = 0.005


def _rx_packets(pid: int, iface: str) -> int | None:
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == iface:
                    return int(rest.split()[1])
    except OSError:
        return None
    return None


@dataclass
class FrameWatch:
    """Samples the tap counters of both hosts, together, until stopped.

    Overlap is the summed length of the sampling intervals (a few ms each) in
    which both hosts' VMs sent frames.
    """

    hosts: dict[str, str]  # node -> netns
    iface: str
    samples: list[tuple[float, dict[str, int | None]]] = field(default_factory=list)
    _windows: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        for node, ns in self.hosts.items():
            self._windows[node] = subprocess.Popen(netns_argv(ns, ["sleep", "3600"]))
        self._thread = threading.Thread(target=self._run, name="frame-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = {n: _rx_packets(w.pid, self.iface) for n, w in self._windows.items()}
            self.samples.append((time.monotonic(), counts))
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for window in self._windows.values():
            window.kill()
            window.wait()

    def _sent(self, before: dict[str, int | None], after: dict[str, int | None], node: str) -> bool:
        b, a = before.get(node), after.get(node)
        return b is not None and a is not None and a > b

    def overlap_ms(self) -> float:
        total = 0.0
        nodes = list(self._windows)
        for (t0, before), (t1, after) in zip(self.samples, self.samples[1:], strict=False):
            if all(self._sent(before, after, n) for n in nodes):
                total += t1 - t0
        return round(total * 1000.0, 1)

    def frames(self, node: str) -> int:
        # A tap made anew (a node that rejoined) starts counting from zero again.
        counts = [c[node] or 0 for _, c in self.samples if c.get(node) is not None]
        return sum(max(0, b - a) for a, b in itertools.pairwise(counts))
