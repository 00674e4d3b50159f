"""One fault round: a protected pair under client load, a fault, the oracles' findings.

Shared by the failover tests and bench/failover.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coloft.agent.pair import FailoverRecord, Pair, supervise
from coloft.core.argv import tap_name
from coloft.errors import FatalError
from coloft.lab import faults, net, workload
from coloft.lab.oracle import FrameWatch
from coloft.lab.probe import wait_ready

BOOT_DEADLINE_S = 90.0


async def up_and_serving(pair: Pair) -> None:
    """Bring the pair up and wait until the guest's service answers the client."""
    await pair.up()
    assert pair.spec.vm.service is not None
    host, port = pair.spec.vm.service
    if not await asyncio.to_thread(wait_ready, net.CLIENT_NS, host, port, BOOT_DEADLINE_S):
        console = pair.spec.run_dir_of(pair.spec.primary) / "console.log"
        raise FatalError(f"guest service never answered; console: {console}")


@dataclass
class FaultRound:
    fault: str
    fault_at: float
    result: dict[str, Any]
    checked: dict[str, Any]
    overlap_ms: float
    frames: dict[str, int]
    failovers: list[FailoverRecord] = field(default_factory=list)

    @property
    def detected_ms(self) -> float | None:
        if not self.failovers:
            return None
        return (self.failovers[0].detected_at - self.fault_at) * 1000.0


async def fault_round(
    pair: Pair, fault: str, out: Path, load_s: float = 24.0, fault_after_s: float = 8.0
) -> FaultRound:
    """Run the round on a pair that is not up yet; leaves the pair up (caller tears down)."""
    assert pair.spec.vm.service is not None
    target = "{}:{}".format(*pair.spec.vm.service)
    await up_and_serving(pair)
    watch = FrameWatch({n.name: n.netns or "" for n in pair.spec.nodes}, tap_name(pair.spec))
    watch.start()
    try:
        client = workload.start_workload(net.CLIENT_NS, target, out, load_s)
        stop = asyncio.Event()
        fault_at = 0.0

        async def inject() -> None:
            nonlocal fault_at
            try:
                await asyncio.sleep(fault_after_s)
                if not (await pair.observe()).protected:
                    raise FatalError("pair not protected when the fault was due")
                fault_at = faults.inject(pair, fault)
                await asyncio.to_thread(client.wait, load_s + 30)
            finally:
                stop.set()

        injector = asyncio.create_task(inject())
        supervisor = asyncio.create_task(supervise(pair, stop))
        await asyncio.gather(injector, supervisor)
    finally:
        watch.stop()
    checked = await asyncio.to_thread(workload.verify, net.CLIENT_NS, target, out / "acked.jsonl")
    return FaultRound(
        fault,
        fault_at,
        workload.read_result(out),
        checked,
        watch.overlap_ms(),
        {n: watch.frames(n) for n in watch.hosts},
        list(pair.failovers),
    )
