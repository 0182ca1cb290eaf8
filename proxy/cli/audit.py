"""`backtrack audit export`: the audit log of resets and flags, read back from Redis as JSONL."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from proxy.state.audit import export, parse_since
from proxy.state.store import RedisStore, StoreUnavailable


def register(subparsers: Any) -> None:
    """Add `audit export` to the `backtrack` command."""
    audit = subparsers.add_parser("audit", help="the audit log of resets and flags (in Redis)")
    sub = audit.add_subparsers(dest="audit", required=True)
    p = sub.add_parser(
        "export", help="print audit events as JSONL in the shared data schema, with their audit fields"
    )
    p.add_argument("--config", type=Path, help="config.yaml naming redis.url (BACKTRACK_REDIS_URL overrides)")
    p.add_argument("--since", help="only events at or after this: ISO 8601 time, or an age like 30m, 12h, 7d")
    p.set_defaults(func=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    from proxy.core.config import load_settings

    settings = load_settings(args.config)
    if settings.redis_url is None:
        print(
            "backtrack audit export: no redis.url (or BACKTRACK_REDIS_URL); without Redis the audit log "
            "lives in the proxy's memory only",
            file=sys.stderr,
        )
        return 2
    try:
        since = None if args.since is None else parse_since(args.since, time.time())
    except ValueError as exc:
        print(f"backtrack audit export: {exc}", file=sys.stderr)
        return 2
    redis = settings.file.redis
    store = RedisStore(settings.redis_url, prefix=redis.prefix, audit_maxlen=redis.audit_maxlen)

    async def go() -> int:
        try:
            return await export(store, since, sys.stdout.write)
        finally:
            await store.close()

    try:
        count = asyncio.run(go())
    except StoreUnavailable as exc:
        print(f"backtrack audit export: {exc}", file=sys.stderr)
        return 1
    print(f"backtrack audit export: {count} events", file=sys.stderr)
    return 0
