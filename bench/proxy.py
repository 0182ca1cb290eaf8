"""`backtrack bench proxy`: what the proxy adds to a stream, measured against the upstream alone.

One run starts `replay-upstream` and two proxies in front of it as subprocesses, then sends the same
workload (N concurrent streams, each making requests one after another) three ways:

    direct          client -> replay-upstream
    proxy           client -> backtrack serve --config CONFIG -> replay-upstream
    proxy (hb N)    the same, with a temporary marker-only policy whose `holdback_tokens` is N (default 0)

Per path and concurrency it reports, over all requests (times from sending the request):
- TTFB: the first SSE event of any kind; TTFT: the first content token.
- gap: between consecutive content chunks of one response.
- lag: per content chunk, its arrival minus the time the replay upstream was due to send the last token in
  it (the upstream paces token j at its stream start + (j + 1) / R; with no rate every token is due at 0).
  Unlike the gap, the lag keeps a constant per-chunk delay: proxy lag minus direct lag is the latency the
  proxy adds to every chunk, even if it re-chunks the text.
- chunks/s, and the server's CPU (utime + stime from /proc/PID/stat) per 1,000 content chunks received.
"Added" = proxy minus direct at the same concurrency, percentile by percentile.

The proxy holds text back until it is `holdback_tokens` behind the head, so through `proxy` TTFT and lag
include waiting for that many upstream tokens. The hb-0 variant takes the hold-back out: its added TTFT
and lag are the proxy's own overhead (the issue's goal: p50 < 2 ms and < 1 ms), and proxy minus
proxy (hb 0) is the hold-back delay. Per-chunk latency is best read with a paced upstream
(`--tokens-per-second 50`): unthrottled, every stream is a throughput test and lags are queueing.

A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.command import PACKAGE_ROOT, BenchError, add_command, number_list, publish, run_in_workdir
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
from proxy.replay.app import load_rows

DEFAULT_CONFIG = PACKAGE_ROOT / "config.yaml"


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `proxy` to `backtrack bench`."""
    parser = add_command(
        subparsers,
        "proxy",
        "latency and CPU the proxy adds to streams, against replay-upstream alone",
        __doc__,
    )
    concurrency = number_list(int, 1, "integers", "give one or more stream counts, each at least 1")
    parser.add_argument(
        "--concurrency", type=concurrency, default=[1, 16, 64], help="stream counts, e.g. 1,16,64"
    )
    parser.add_argument("--requests-per-stream", type=int, default=10)
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        help="upstream deltas per second per stream (default: no limit)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="proxy config (default: the repo's config.yaml, else a marker-only policy, default hold-back)",
    )
    parser.add_argument(
        "--holdback", type=int, default=0, help="hold-back of the marker-only comparison proxy (default: 0)"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="JSONL rows to replay (default: one 200-token benign answer)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write bench-proxy.json and bench-proxy.md here"
    )
    parser.set_defaults(func=main)


def _write_config(directory: Path, name: str, holdback: int | None) -> Path:
    """A config with one marker-only policy; `holdback` None keeps the policy default."""
    policy: dict[str, Any] = {
        "name": "bench",
        "description": "marker detector only, for `backtrack bench proxy`",
        "detectors": {"marker": {"enabled": True}, "model": {"enabled": False}},
    }
    if holdback is not None:
        policy["holdback_tokens"] = holdback
    return write_proxy_config(directory, name, policy)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the servers, run every path at every concurrency, and return the report."""
    if args.data is None:
        rows = [bench_row()]
        data = workdir / "bench-data.jsonl"
        data.write_text(
            json.dumps({"prompt": rows[0].prompt, "response": rows[0].response}) + "\n", encoding="utf-8"
        )
    else:
        data, rows = args.data, load_rows(args.data)
    prompts = sorted({row.prompt for row in rows if row.prompt is not None})
    if not prompts:
        raise BenchError(f"{data}: no row has a prompt to ask")
    workload = Workload(prompts, expected_answers(rows), args.tokens_per_second)
    if args.config is not None:
        config, config_label = args.config, str(args.config)
    elif DEFAULT_CONFIG.exists():
        config, config_label = DEFAULT_CONFIG, str(DEFAULT_CONFIG)
    else:
        config, config_label = _write_config(workdir, "proxy", None), "marker-only policy, default hold-back"
    variant = f"proxy (hb {args.holdback})"

    with servers() as started:
        upstream_port = free_port()
        upstream_command = replay_command(data, upstream_port, args.tokens_per_second)
        upstream = Server("replay-upstream", upstream_command, upstream_port, workdir / "replay.log")
        started.append(upstream)
        for name, cfg in (("proxy", config), (variant, _write_config(workdir, "holdback", args.holdback))):
            port = free_port()
            started.append(
                Server(name, proxy_command(cfg, upstream.url, port), port, workdir / f"{port}.log")
            )
        async with aiohttp.ClientSession() as session:
            await wait_until_up(session, upstream, "/v1/models")
            for server in started[1:]:
                await wait_until_up(session, server, "/healthz")

        results = []
        for concurrency in args.concurrency:
            for server in started:
                name = "direct" if server is upstream else server.name
                load = Load(requests=args.requests_per_stream)
                path_run = await run_path(server, name, concurrency, load, workload)
                results.append(path_run.summary())
                print(
                    f"  {name:>14}  {concurrency:>3} streams  {results[-1]['chunks']} chunks", file=sys.stderr
                )

    return {
        "command": "backtrack bench proxy " + " ".join(_argv(args)),
        "settings": {
            "concurrency": args.concurrency,
            "requests_per_stream": args.requests_per_stream,
            "tokens_per_second": args.tokens_per_second,
            "config": config_label,
            "holdback": args.holdback,
            "data": str(args.data or f"generated: one {BENCH_RESPONSE_TOKENS}-token answer"),
            "cpu_count": os.cpu_count(),
        },
        "results": results,
        "added": added_latency(results),
    }


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of this run, as they would be typed."""
    argv = [
        "--concurrency",
        ",".join(map(str, args.concurrency)),
        "--requests-per-stream",
        str(args.requests_per_stream),
    ]
    if args.tokens_per_second:
        argv += ["--tokens-per-second", f"{args.tokens_per_second:g}"]
    for option, value in (("--config", args.config), ("--data", args.data)):
        if value is not None:
            argv += [option, str(value)]
    if args.holdback:
        argv += ["--holdback", str(args.holdback)]
    return argv


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write it and the JSON to `--out`.

    Returns 2 for bad options, 1 when the benchmark cannot run (the error says why), else 0.
    """
    if args.requests_per_stream < 1 or args.holdback < 0:
        print(
            "backtrack bench proxy: error: --requests-per-stream must be >= 1, --holdback >= 0",
            file=sys.stderr,
        )
        return 2
    report = run_in_workdir("proxy", lambda workdir: run(args, workdir), prefix="backtrack-bench-")
    if report is None:
        return 1
    publish(report, markdown_table(report), args.out, "bench-proxy")
    return 0


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table with a short key."""
    added = {(a["path"], a["concurrency"]): a for a in report["added"]}
    lines = [
        "| path | streams | requests | errors | chunks | TTFB p50 / p99 | TTFT p50 / p99 | gap p50 / p99 "
        "| lag p50 / p99 | chunks/s | server CPU s / 1k chunks | added TTFT | added lag |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["results"]:
        extra = added.get((row["path"], row["concurrency"]))
        lines.append(
            f"| {row['path']} | {row['concurrency']} | {row['requests']} | {row['errors']} | {row['chunks']} "
            f"| {format_pair(row['ttfb_ms'])} | {format_pair(row['ttft_ms'])} "
            f"| {format_pair(row['gap_ms'])} | {format_pair(row['lag_ms'])} "
            f"| {format_number(row['chunks_per_s'], '.0f')} "
            f"| {format_number(row['cpu_s_per_1k_chunks'], '.3f')} "
            f"| {format_pair(extra['ttft_ms'], signed=True) if extra else ''} "
            f"| {format_pair(extra['lag_ms'], signed=True) if extra else ''} |"
        )
    settings = report["settings"]
    rate = f"{settings['tokens_per_second']:g} tokens/s" if settings["tokens_per_second"] else "unthrottled"
    lines += [
        "",
        f"`{report['command']}`: {settings['requests_per_stream']} requests per stream, upstream {rate}; "
        f"proxy config {settings['config']}; hb = `holdback_tokens` of a marker-only policy.",
        "TTFB: first SSE event; TTFT: first content token (through the proxy it includes the hold-back); "
        "gap: between consecutive content chunks of one response; lag: when a chunk arrived minus when "
        "the upstream was due to send its last token. Added = proxy minus direct, p50 / p99. "
        "Server CPU: the proxy's (the replay server's for direct). Times in ms.",
    ]
    return "\n".join(lines)
