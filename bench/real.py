"""`backtrack bench real`: the proxy in front of a real model, guard on and off, beside direct.

One run starts `transformers serve` with SmolLM2-135M-Instruct on CPU (bench/real_model.py, prepared
once under `.cache/`) and two proxies in front of it, then sends the same greedy workload three ways:

    direct       client -> transformers serve
    guard off    client -> backtrack serve (marker detector only, the default 24-token hold-back) -> it
    guard on     client -> backtrack serve --config config.yaml (the stock default policy) -> it

Per path and stream count it reports TTFT (first content token), the gap between content chunks, content
chunks per second, the CPU seconds per 1,000 chunks of the proxy and of the model's server, and how busy
the machine was with other work meanwhile. Both proxies hold back 24 tokens, so guard on minus guard off
is what the guard costs; guard off minus direct is the hold-back and the proxy. The model, the proxy and
its guard share the same cores: every CPU second the proxy spends is one the model does not get.

A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.command import PACKAGE_ROOT, BenchError, add_command, number_list, publish, run_in_workdir
from bench.load import Load, Target, Workload, run_path
from bench.measure import format_number, format_pair
from bench.real_model import MODEL_NAME, prepare, start
from bench.servers import Server, free_port, proxy_command, servers, wait_until_up, write_proxy_config

# Prompts whose answers outrun the 24-token hold-back, so text flows while the model writes.
PROMPTS = [
    "Write a short story about a cat who finds a key.",
    "Explain how rain forms, in one paragraph.",
    "Describe a walk through a forest in autumn.",
    "Write a paragraph about the history of bread.",
]
# transformers serve generates one request at a time: with N streams a request may wait for N - 1
# others before its first byte.
READ_TIMEOUT_SECONDS = 600.0


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `real` to `backtrack bench`."""
    parser = add_command(
        subparsers, "real", "the proxy in front of a real model on CPU, guard on and off", __doc__
    )
    concurrency = number_list(int, 1, "integers", "give one or more stream counts, each at least 1")
    parser.add_argument("--concurrency", type=concurrency, default=[1, 4], help="stream counts, e.g. 1,4")
    parser.add_argument("--requests-per-stream", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer at most (greedy)")
    parser.add_argument("--out", type=Path, default=None, help="write bench-real.json and bench-real.md here")
    parser.set_defaults(func=main)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the model and the proxies, run every path at every stream count, and return the report."""
    try:
        folder = prepare()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    marker_only = {"detectors": {"marker": {"enabled": True}, "model": {"enabled": False}}}
    configs = {"guard off": write_proxy_config(workdir, "guard-off", marker_only),
               "guard on": PACKAGE_ROOT / "config.yaml"}  # fmt: skip
    workload = Workload(PROMPTS, {}, None)
    body = {"max_tokens": args.max_tokens, "temperature": 0}
    with servers() as started:
        model = start(folder, free_port(), workdir / "transformers-serve.log")
        started.append(model)
        paths = {"direct": model}
        for name, config in configs.items():
            paths[name] = _proxy(name, config, model.url, free_port(), workdir)
            started.append(paths[name])
        async with aiohttp.ClientSession() as session:
            await wait_until_up(session, model, "/health")
            for name in configs:
                await wait_until_up(session, paths[name], "/readyz")
        results = []
        for concurrency in args.concurrency:
            for name, server in paths.items():
                target = Target(f"{server.url}/v1/chat/completions", model=MODEL_NAME, body=body)
                upstream = None if server is model else model
                load = Load(requests=args.requests_per_stream)
                path_run = await run_path(
                    server, name, concurrency, load, workload, target, upstream, READ_TIMEOUT_SECONDS
                )
                results.append(path_run.summary())
                print(
                    f"  {name:>9}  {concurrency:>2} streams  {results[-1]['chunks']} chunks", file=sys.stderr
                )
    return {
        "command": "backtrack bench real " + " ".join(_argv(args)),
        "settings": {
            "concurrency": args.concurrency,
            "requests_per_stream": args.requests_per_stream,
            "max_tokens": args.max_tokens,
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32) on transformers serve, CPU",
            "cpu_count": os.cpu_count(),
        },
        "results": results,
    }


def _proxy(name: str, config: Path, upstream: str, port: int, workdir: Path) -> Server:
    return Server(name, proxy_command(config, upstream, port), port, workdir / f"{port}.log")


def _argv(args: argparse.Namespace) -> list[str]:
    return [
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--requests-per-stream", str(args.requests_per_stream),
        "--max-tokens", str(args.max_tokens),
    ]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write it and the JSON to `--out`; 1 when it cannot run."""
    if args.requests_per_stream < 1 or args.max_tokens < 1:
        print(
            "backtrack bench real: error: --requests-per-stream and --max-tokens must be >= 1",
            file=sys.stderr,
        )
        return 2
    report = run_in_workdir("real", lambda workdir: run(args, workdir), prefix="backtrack-bench-real-")
    if report is None:
        return 1
    publish(report, markdown_table(report), args.out, "bench-real")
    return 0


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table with a short key."""
    lines = [
        "| path | streams | requests | errors | chunks | TTFT p50 / p99 (ms) | gap p50 / p99 (ms) | chunks/s "
        "| proxy CPU s / 1k chunks | model CPU s / 1k chunks | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["results"]:
        direct = row["path"] == "direct"
        chunks = row["chunks"] or 0
        model_cpu = row["cpu_s_per_1k_chunks"] if direct else _per_1k(row["upstream_cpu_s"], chunks)
        lines.append(
            f"| {row['path']} | {row['concurrency']} | {row['requests']} | {row['errors']} | {chunks} "
            f"| {format_pair(row['ttft_ms'])} | {format_pair(row['gap_ms'])} "
            f"| {format_number(row['chunks_per_s'], '.1f')} "
            f"| {'' if direct else format_number(row['cpu_s_per_1k_chunks'], '.1f')} "
            f"| {format_number(model_cpu, '.1f')} | {format_number(_share(row['other_load']), '.0f')}% |"
        )
    settings = report["settings"]
    lines += [
        "",
        f"`{report['command']}`: {settings['requests_per_stream']} requests per stream, "
        f"{settings['max_tokens']} tokens per answer, greedy; {settings['model']}; {settings['cpu_count']} "
        "cores shared by the model, the proxy and its guard. TTFT: first content token (through the proxy "
        "it includes the 24-token hold-back); gap: between consecutive content chunks of one response; "
        "other load: the share of the machine busy with work other than this run's.",
    ]
    return "\n".join(lines)


def _per_1k(seconds: float | None, chunks: int) -> float | None:
    return None if seconds is None or not chunks else seconds / chunks * 1000


def _share(value: float | None) -> float | None:
    return None if value is None else value * 100
