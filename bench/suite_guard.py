"""Backtrack's two paths in `backtrack bench all`: their policies (the marker only; the default policy with
the guard model), the guard checkpoint they load, and how often the guard let text out unjudged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.command import PACKAGE_ROOT
from bench.servers import Server

DEFAULT_POLICY = PACKAGE_ROOT / "policies" / "default.yaml"
BUNDLED_CHECKPOINT = PACKAGE_ROOT / "guard" / "checkpoint"


def guard_checkpoint(requested: Path | None, workdir: Path) -> tuple[Path, str]:
    """The checkpoint the guard path loads, and how the report names it."""
    if requested is not None:
        return requested, str(requested)
    if (BUNDLED_CHECKPOINT / "guard.json").exists():
        return BUNDLED_CHECKPOINT, "bundled (guard/checkpoint)"
    from guard.model import DEFAULT_BASE, from_base, save_checkpoint

    # No trained guard yet: the base encoder with a head that never fires costs the same FLOPs per token.
    model = from_base(DEFAULT_BASE)
    model.head.weight.data.zero_()
    model.head.bias.data.fill_(-10.0)
    folder = workdir / "guard-stand-in"
    save_checkpoint(model, folder)
    return folder, f"untrained stand-in on {DEFAULT_BASE} (no bundled checkpoint yet)"


def policies() -> tuple[dict[str, Any], dict[str, Any]]:
    """(marker only with no hold-back, the default policy with the guard model on)."""
    marker = {
        "description": "marker detector only, no hold-back: `backtrack bench all`",
        "detectors": {"marker": {"enabled": True}, "model": {"enabled": False}},
        "holdback_tokens": 0,
    }
    guarded = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    guarded["detectors"] = {**guarded.get("detectors", {}), "model": {"enabled": True}}
    return marker, guarded


async def fail_open_count(session: aiohttp.ClientSession, server: Server) -> float:
    """`backtrack_fail_open_total` of a proxy, all policies together."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(server.url + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "backtrack_fail_open_total"
    )
