"""`backtrack guard-serve`: the bundled (or a trained) guard behind HTTP, shared by many proxy replicas."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `guard-serve` to the `backtrack` command line."""
    parser = subparsers.add_parser(
        "guard-serve", help="serve the guard model over HTTP for proxies with a 'backtrack' remote detector"
    )
    parser.add_argument("--checkpoint", type=Path, help="guard checkpoint folder (default: the bundled one)")
    parser.add_argument(
        "--base", help="the base model's folder or id (default: the one the checkpoint names)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="the guard's arithmetic (default: fp32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument(
        "--api-key-env", help="environment variable holding the key callers must send (default: none needed)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from aiohttp import web

    from guard.scorer import load_scorer
    from proxy.server.guard_serve import create_guard_app

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        print(f"backtrack guard-serve: {args.api_key_env} is not set", file=sys.stderr)
        return 2
    scorer = load_scorer(
        args.checkpoint,
        args.base,
        max_batch_tokens=args.max_batch_tokens,
        queue_size=args.queue_size,
        threads=args.threads,
        precision=args.precision,
    )
    print(f"guard-serve: listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    web.run_app(create_guard_app(scorer, key), host=args.host, port=args.port, print=None, access_log=None)
    return 0
