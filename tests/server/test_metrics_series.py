"""A fresh proxy's /metrics already has every error series, at 0: dashboards read 0, not "no data"."""

from __future__ import annotations

from proxy.dialects.routes import ROUTES
from tests.harness import Harness


async def test_error_series_exist_at_zero_before_any_error(harness: Harness) -> None:
    proxy = await harness.proxy(await harness.replay())
    session = await harness.session()

    async with session.get(f"{proxy}/metrics") as resp:
        text = await resp.text()

    for route in ROUTES:
        for kind in ("UpstreamError", "UpstreamTimeout", "InBandError"):
            assert f'backtrack_upstream_errors_total{{kind="{kind}",route="{route}"}} 0.0' in text
    for kind in ("timeout", "GuardError", "GuardOverloaded", "error"):
        for mode in ("open", "closed"):
            series = f'backtrack_guard_failures_total{{fail_mode="{mode}",kind="{kind}",policy="test"}}'
            assert f"{series} 0.0" in text
