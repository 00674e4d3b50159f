"""A fleet: three pairs around three hosts, one agent per host running every pair placed
on it (each host primary of one pair and secondary of another), under client load on
every pair; one host dies. The pair whose primary was there fails over, the pair whose
secondary was there goes on alone, the third pair never notices; no pair loses an
acknowledged write or a connection, and the surviving agents' metrics say so.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from coloft.lab.watchdog import NotifyListener
from tests.integration.test_cli import assert_keys, coloft

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_three_pairs_three_hosts_one_host_killed(lab: None, watchdog: NotifyListener) -> None:
    done = coloft(
        "demo", "--pairs", "3", "--fault", "kill-host", "--duration", "60", "--json", timeout=840
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary (exit {done.returncode}): {done.stderr[-3000:]}"

    summary = json.loads(lines[-1])
    assert_keys(summary, "pairs metrics_ok")
    rows = {r["name"]: r for r in summary["pairs"]}
    for r in rows.values():
        assert_keys(r, "name state gap_ms lost_acked_writes")
        assert r["lost_acked_writes"] == 0 and r["requests_failed"] == 0, r
        assert r["connection_resets"] == 0, r
    killed = summary["killed_host"]
    assert killed == "a", summary
    # vm0: primary on a -> taken over by b; vm2: secondary on a -> c runs alone.
    # A dead host's lease must run out first (ttl 2 s), and the client's TCP backs off
    # its retransmissions meanwhile (0.2, 0.4, 0.8, 1.6 s ...): a few seconds of gap.
    assert rows["vm0"]["leader"] == "b" and rows["vm0"]["gap_ms"] < 6000, rows["vm0"]
    assert rows["vm2"]["leader"] == "c", rows["vm2"]
    # vm1 (b + c) never left PROTECTED.
    assert rows["vm1"]["state"] == "PROTECTED" and not rows["vm1"]["ever_unprotected"], rows
    assert summary["metrics_ok"], summary["metrics_errors"]
    assert done.returncode == 0, (summary, done.stderr[-2000:])
    leftover = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name vm"], check=False)
    assert leftover.returncode == 1, "QEMU left running"
