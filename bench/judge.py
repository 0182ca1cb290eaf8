"""`backtrack bench judge`: the bundled guard behind `backtrack guard-serve` as a remote judge, against
the same guard in process, in one run.

It starts `replay-upstream`, `backtrack guard-serve` (the bundled checkpoint), and two proxies in front of
the upstream, then sends the same workload (N concurrent streams, each making requests one after
another) three ways:

    direct          client -> replay-upstream
    in-process      client -> backtrack serve (the guard model loaded, every token scored) -> upstream
    guard-serve     client -> backtrack serve (no model; a `backtrack` remote detector asked every
                    `--every-tokens`) -> upstream, the proxy calling guard-serve

Both proxies use the default policy's reset rule (logit_bias -1.75, threshold 0.5) and the same
`--holdback`. Per path and concurrency: TTFT, lag and the slowdown (a response's duration over the
upstream's own pace: 1.0 keeps up), their "added" against direct, chunks/s, and the CPU of the proxy
(and, for guard-serve, of guard-serve apart). A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.command import add_command, number_list, publish, run_in_workdir
from bench.load import BENCH_RESPONSE_TOKENS, Load, Workload, bench_row, expected_answers, run_path
from bench.measure import added_latency, format_number, format_pair
from bench.servers import (
    Server,
    free_port,
    proxy_command,
    replay_command,
    servers,
    wait_until_up,
    write_proxy_config,
)

RULE = {"logit_bias": -1.75, "threshold": 0.5}  # the shipped default policy's operating point


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `judge` to `backtrack bench`."""
    parser = add_command(
        subparsers, "judge", "guard-serve as a remote judge against the in-process guard", __doc__
    )
    concurrency = number_list(int, 1, "integers", "give one or more stream counts, each at least 1")
    parser.add_argument("--concurrency", type=concurrency, default=[1, 32], help="stream counts, e.g. 1,32")
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="upstream pace per stream")
    parser.add_argument("--holdback", type=int, default=24, help="holdback_tokens of both proxies")
    parser.add_argument("--every-tokens", type=int, default=8, help="how often the proxy asks guard-serve")
    parser.add_argument(
        "--out", type=Path, default=None, help="write bench-judge.json and bench-judge.md here"
    )
    parser.set_defaults(func=main)


def _policies(holdback: int, every: int, guard_url: str) -> dict[str, dict[str, Any]]:
    base = {"holdback_tokens": holdback, **RULE, "fail_mode": "open", "guard_timeout_seconds": 10.0}
    remote = {"name": "guard-serve", "protocol": "backtrack", "url": guard_url, "every_tokens": every,
              "timeout_seconds": 5.0, "max_concurrency": 256}  # fmt: skip
    return {
        "in-process": {**base, "detectors": {"marker": {"enabled": True}, "model": {"enabled": True}}},
        "guard-serve": {**base, "detectors": {"marker": {"enabled": True}, "remote": [remote]}},
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    row = bench_row()
    data = workdir / "bench-data.jsonl"
    data.write_text(json.dumps({"prompt": row.prompt, "response": row.response}) + "\n", encoding="utf-8")
    workload = Workload([row.prompt or ""], expected_answers([row]), args.tokens_per_second)

    with servers() as started:
        upstream_port, guard_port = free_port(), free_port()
        upstream = Server(
            "replay-upstream", replay_command(data, upstream_port, args.tokens_per_second), upstream_port,
            workdir / "replay.log",
        )  # fmt: skip
        guard_command = [sys.executable, "-m", "proxy.cli.main", "guard-serve", "--port", str(guard_port)]
        guard = Server("guard-serve", guard_command, guard_port, workdir / "guard-serve.log")
        started += [upstream, guard]
        proxies = []
        for name, policy in _policies(args.holdback, args.every_tokens, guard.url).items():
            port = free_port()
            config = write_proxy_config(workdir, name, policy)
            proxies.append(
                Server(name, proxy_command(config, upstream.url, port), port, workdir / f"{name}.log")
            )
        started += proxies
        async with aiohttp.ClientSession() as session:
            await wait_until_up(session, upstream, "/v1/models")
            await wait_until_up(session, guard, "/healthz")
            for server in proxies:
                await wait_until_up(session, server, "/healthz")

        results = []
        for concurrency in args.concurrency:
            for server in [upstream, *proxies]:
                name = "direct" if server is upstream else server.name
                # guard-serve's CPU counts as the remote path's own (not as other load), shown apart.
                also = guard if server.name == "guard-serve" else None
                load = Load(requests=args.requests_per_stream)
                summary = (await run_path(server, name, concurrency, load, workload, upstream=also)).summary()
                summary["guard_serve_cpu_s"] = summary["upstream_cpu_s"]
                results.append(summary)
                print(f"  {name:>12}  {concurrency:>3} streams  {summary['chunks']} chunks", file=sys.stderr)

    return {
        "command": "backtrack bench judge " + " ".join(_argv(args)),
        "settings": {
            "concurrency": args.concurrency,
            "requests_per_stream": args.requests_per_stream,
            "tokens_per_second": args.tokens_per_second,
            "holdback": args.holdback,
            "every_tokens": args.every_tokens,
            "data": f"generated: one {BENCH_RESPONSE_TOKENS}-token answer",
            "cpu_count": os.cpu_count(),
        },
        "results": results,
        "added": added_latency(results),
    }


def _argv(args: argparse.Namespace) -> list[str]:
    return [
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--requests-per-stream", str(args.requests_per_stream),
        "--tokens-per-second", f"{args.tokens_per_second:g}",
        "--holdback", str(args.holdback),
        "--every-tokens", str(args.every_tokens),
    ]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write it and the JSON to `--out`; 1 when it cannot run."""
    report = run_in_workdir("judge", lambda workdir: run(args, workdir), prefix="backtrack-bench-")
    if report is None:
        return 1
    publish(report, markdown_table(report), args.out, "bench-judge")
    return 0


def markdown_table(report: dict[str, Any]) -> str:
    added = {(a["path"], a["concurrency"]): a for a in report["added"]}
    lines = [
        "| path | streams | requests | errors | TTFT p50 / p99 | added TTFT p50 / p99 | added lag p50 / p99 "
        "| slowdown p50 / p99 | chunks/s | proxy CPU s / 1k chunks | guard-serve CPU s | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["results"]:
        extra = added.get((row["path"], row["concurrency"]))
        lines.append(
            f"| {row['path']} | {row['concurrency']} | {row['requests']} | {row['errors'] + row['cut']} "
            f"| {format_pair(row['ttft_ms'])} "
            f"| {format_pair(extra['ttft_ms'], signed=True) if extra else ''} "
            f"| {format_pair(extra['lag_ms'], signed=True) if extra else ''} "
            f"| {format_pair(row['slowdown'])} | {format_number(row['chunks_per_s'], '.0f')} "
            f"| {format_number(row['cpu_s_per_1k_chunks'], '.3f')} "
            f"| {format_number(row['guard_serve_cpu_s'], '.1f')} "
            f"| {format_number(row['other_load'], '.2f')} |"
        )
    s = report["settings"]
    lines += [
        "",
        f"`{report['command']}`: {s['requests_per_stream']} requests per stream of one "
        f"{BENCH_RESPONSE_TOKENS}-token answer at {s['tokens_per_second']:g} tokens/s, hold-back "
        f"{s['holdback']} on both proxies, guard-serve asked every {s['every_tokens']} tokens; "
        f"{s['cpu_count']} CPUs. Added = path minus direct; slowdown = a response's duration over the "
        "upstream's pace (1.0 keeps up). Times in ms.",
    ]
    return "\n".join(lines)
