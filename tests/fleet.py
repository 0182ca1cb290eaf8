"""Proxy replicas sharing state (Redis, or the in-memory default): the config they share, with one tenant
(acme, on policy `test`), a replica started from it, and a request sent as that tenant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.core.config import load_settings
from proxy.core.selection import hash_key
from proxy.server.app import create_app
from proxy.server.keys import SHARED
from proxy.state.shared import Shared
from tests.harness import BENIGN, WORDY, Harness, write_policies

TENANT_KEY = "sk-acme-SECRET-tenant-key-0001"
UPSTREAM_KEY = "sk-upstream-SECRET-key-0002"
ADMIN_TOKEN = "admin-SECRET-token-0003"
ENV = {"BACKTRACK_ADMIN_TOKEN": ADMIN_TOKEN}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ACME = {"Authorization": f"Bearer {TENANT_KEY}"}
UNSAFE = WORDY["prompt"]  # its answer says "bomb": a "weapons" reset under every policy here
SAFE = BENIGN["prompt"]
# How long, and how often, to look for a replica to see a change (Redis down or back, a reload, a spool).
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.02


def write_setup(
    harness: Harness, upstream: str, url: str | None, prefix: str, policies: dict[str, dict[str, Any]]
) -> Path:
    """Policy files and a config naming them, one tenant (acme, on `test`), Redis at `url` (None: memory)."""
    config = {
        "upstream": {"url": upstream, "api_key": UPSTREAM_KEY},
        "policies": write_policies(harness.tmp_path, **policies),
        "default_policy": "test",
        "tenants": [{"name": "acme", "key_sha256": [hash_key(TENANT_KEY)], "policy": "test"}],
        "reload": {"poll_seconds": 0},  # only the fleet (or the admin endpoint) reloads here
        "redis": {"url": url, "prefix": prefix, "health_seconds": 0.05},
    }
    path = harness.tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def replica(harness: Harness, config: Path) -> tuple[str, Shared]:
    """A proxy replica on a free port: its root URL and its shared state."""
    app = create_app(load_settings(config, env=ENV))
    root = await harness.serve(app)
    return root, app[SHARED]


async def ask(
    session: aiohttp.ClientSession, root: str, prompt: str, request_id: str | None = None
) -> tuple[int, dict[str, str], str]:
    """One streamed chat completion as tenant acme: (status, headers, body)."""
    headers = dict(ACME)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
    async with session.post(f"{root}/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()
