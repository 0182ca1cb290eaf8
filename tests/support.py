"""Plumbing any test may need: where the repository is, a free TCP port (the benchmarks' picker, which
keeps out of the ephemeral range), and waiting for something to become true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.servers import free_port

__all__ = ["REPO", "eventually", "free_port"]

REPO = Path(__file__).resolve().parents[1]
"""The repository root (where `config.yaml` and `policies/` are, and where `backtrack` runs)."""


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    what: str | Callable[[], str],
    *,
    seconds: float = 10.0,
    interval: float = 0.05,
) -> None:
    """Call `check` (sync or async) every `interval` s until it returns true; fail after `seconds`.

    `check` is called at least once after the `seconds` have passed, so a slow check never shortens the
    wait. The failure is an `AssertionError` naming `what` was awaited; `what` may be a callable when the
    message needs facts known only then (a log file, say). An exception `check` raises ends the wait.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"gave up after {seconds:g} s waiting for {described}")
        await asyncio.sleep(interval)
