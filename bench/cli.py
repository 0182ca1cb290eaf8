"""`backtrack bench ...`: the benchmark commands, registered on the proxy's CLI.

Heavy imports (torch, the guard) stay inside the commands, so that `backtrack serve` starts fast.
"""

from __future__ import annotations

import argparse
import json
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
    p = bench_subparsers.add_parser("guard", help="guard throughput and latency, incremental vs re-scoring")
    p.add_argument("--checkpoint", type=Path, default=None, help="guard checkpoint folder (default: bundled)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per stream per feed")
    p.add_argument("--response-tokens", type=int, default=128, help="tokens per stream in total")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from bench.guard import run_bench

    results = run_bench(args.checkpoint, args.streams, args.new_tokens, args.response_tokens, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
