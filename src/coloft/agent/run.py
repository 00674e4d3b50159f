"""`coloft up`: bring a pair up, supervise it until SIGTERM/SIGINT, then tear it down."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from coloft.agent.pair import Pair, publish, supervise
from coloft.effects import qemu_binary
from coloft.model.spec import PairSpec
from coloft.model.steps import Step


async def run_pair(spec: PairSpec, echo: Callable[[str], None]) -> None:
    choice = qemu_binary.choose(spec.vm.accel, spec.qemu_binary)
    echo(f"{spec.vm.name}: {choice.binary} ({choice.why})")
    pair = Pair(spec, choice)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def progress(step: Step, took: float) -> None:
        echo(f"  ok {step.describe()} ({took * 1000:.0f} ms)")

    try:
        await pair.up(progress)
        echo(f"{spec.vm.name}: in COLO; supervising (Ctrl-C or `coloft down` to stop)")
        await supervise(pair, stop)
    finally:
        await pair.down()
        publish(spec, None)
        echo(f"{spec.vm.name}: stopped")
