"""The CPU a relay cannot avoid: its event loop woken once per chunk, with nothing else to do.

At one paced stream each chunk reaches the proxy alone, so each one wakes the proxy from idle. On the
virtual machines this project runs on, such a wakeup costs a large part of the CPU LiteLLM spends on a
whole chunk (seen here: about 0.2 ms of CPU for an empty wakeup every 20 ms, 0.05 ms every 1 ms). The
wakeup is spent before the first line of the proxy runs, so the CPU target at one stream must clear
it: `bench all` measures it after the servers stop, at each paced rate's chunk period, and reports it
beside the CPU target.

The loop is the kind `serve` runs (uvloop when installed), and its CPU is this thread's own time: the
rest of the process (the load client's session, torch's threads) is not counted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def _wake(period: float, wakeups: int) -> float:
    started = time.thread_time()
    for _ in range(wakeups):
        await asyncio.sleep(period)
    return time.thread_time() - started


def wakeup_floor(period: float, wakeups: int) -> dict[str, Any]:
    """CPU seconds per 1,000 wakeups of an idle event loop woken every `period` seconds (runs its own
    loop: call it outside one)."""
    from proxy.cli.main import loop_factory  # at call time: that module registers `bench` and imports it

    factory = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        cpu = runner.run(_wake(period, wakeups))
    return {
        "period_s": period,
        "wakeups": wakeups,
        "loop": "asyncio" if factory is None else "uvloop",
        "cpu_s_per_1k_wakeups": cpu / wakeups * 1000,
    }
