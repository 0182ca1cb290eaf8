"""`backtrack replay-upstream`: the stand-in LLM server, from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

from proxy.core.errors import ConfigError
from proxy.replay.app import DEMO_CORPUS, WIRES, create_replay_app, load_rows
from proxy.replay.judge import install_judge, load_judge


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `replay-upstream` to the `backtrack` command line."""
    parser = subparsers.add_parser(
        "replay-upstream",
        help="serve recorded responses as a stand-in LLM (OpenAI, Anthropic and Ollama APIs)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEMO_CORPUS,
        help="JSONL rows with prompt and response (default: demo corpus)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        help="deltas per second per stream (default: no limit)",
    )
    parser.add_argument(
        "--wire",
        choices=WIRES,
        default="openai",
        help="how the OpenAI routes speak: as OpenAI does, or as `transformers serve` does",
    )
    parser.add_argument(
        "--judge",
        type=Path,
        help="also answer moderation and safety-classifier requests from this JSONL of recorded verdicts",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the replay server until interrupted; 2 when the data file is bad."""
    try:
        rows = load_rows(args.data)
    except ConfigError as exc:
        print(f"backtrack replay-upstream: error: {exc.message}", file=sys.stderr)
        return 2
    app = create_replay_app(rows, args.tokens_per_second, args.wire)
    if args.judge is not None:
        try:
            judge = load_judge(args.judge)
        except ConfigError as exc:
            print(f"backtrack replay-upstream: error: {exc.message}", file=sys.stderr)
            return 2
        install_judge(app, judge)
        print(f"replay-upstream: recorded judge for {', '.join(sorted(judge.models))}", file=sys.stderr)
    print(
        f"replay-upstream: {len(rows)} rows from {args.data} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    # No access log: a benchmark sends thousands of requests and the log line costs as much as the reply.
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0
