"""`backtrack bench ...`: the benchmark commands, registered on the proxy's CLI.

Heavy imports (torch, the guard) stay inside the commands, so that `backtrack serve` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import judge, proxy, real, soak, suite


def register(subparsers: Any) -> None:
    """Add `bench proxy`, `bench all`, `bench soak`, `bench guard` and `bench judge` to `backtrack`."""
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    proxy.register_bench(bench)
    suite.register_bench(bench)
    soak.register_bench(bench)
    judge.register_bench(bench)
    real.register_bench(bench)
    register_guard_bench(bench)


def register_guard_bench(bench_subparsers: Any) -> None:
    """Add `guard` under `backtrack bench`."""
    from bench.command import number_list

    p = bench_subparsers.add_parser("guard", help="guard throughput and latency, incremental vs re-scoring")
    p.add_argument("--checkpoint", type=Path, default=None, help="guard checkpoint folder (default: bundled)")
    streams = number_list(int, 1, "stream counts", "give one or more stream counts, each at least 1")
    p.add_argument("--streams", type=streams, nargs="+", default=[[1, 8, 32, 64]], help="e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per stream per feed")
    p.add_argument("--response-tokens", type=int, default=128, help="tokens per stream in total")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--precision",
        type=_precisions,
        default=("fp32",),
        help="fp32, bf16, int8, or several (fp32,int8): a row each",
    )
    p.add_argument(
        "--json",
        type=Path,
        nargs="?",
        const=Path("-"),
        default=None,
        help="the results as JSON: on stdout (the table goes to stderr), or to the file given",
    )
    p.set_defaults(func=_bench)


def _precisions(text: str) -> tuple[str, ...]:
    from guard.precision import PRECISIONS  # here, not at the top: it imports torch

    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    if not chosen or set(chosen) - set(PRECISIONS):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give one or more of {', '.join(PRECISIONS)}, comma-separated"
        )
    return chosen


def _bench(args: argparse.Namespace) -> int:
    from bench.guard import run_bench

    to_stdout = args.json == Path("-")
    streams = [n for group in args.streams for n in group]
    results = run_bench(
        args.checkpoint,
        streams,
        args.new_tokens,
        args.response_tokens,
        args.threads,
        args.precision,
        log=sys.stderr if to_stdout else sys.stdout,
    )
    if to_stdout:
        print(json.dumps(results, indent=2))
    elif args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
