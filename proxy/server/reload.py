"""Reloading the live policies while the app runs: the file watcher, and SIGHUP for `backtrack serve`.

What a reload does, and what it leaves alone, is `proxy.state.policies`'s to say.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.server.keys import POLICIES


async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Poll the config and policy files while the app runs (when there is a file and polling is on)."""
    store = app[POLICIES]
    interval = store.settings.file.reload.poll_seconds
    task = None
    if store.settings.path is not None and interval > 0:
        task = asyncio.create_task(store.watch(interval), name="policy-watcher")
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sighup_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reload on SIGHUP. For `backtrack serve` only: a signal handler belongs to the whole process."""
    store = app[POLICIES]
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(store.reload_logged("SIGHUP"))
        pending.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    yield
    loop.remove_signal_handler(signal.SIGHUP)
    await asyncio.gather(*pending, return_exceptions=True)
