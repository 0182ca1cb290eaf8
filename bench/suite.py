"""`backtrack bench all`: direct, Backtrack and LiteLLM side by side, and the guard against its roofline.

One run starts these as subprocesses, then sends the same workload (N concurrent streams asking one
200-token answer after another, `bench.proxy`'s load client) down every path:

    direct           client -> replay-upstream
    backtrack        client -> backtrack serve (the marker detector only, `holdback_tokens: 0`: the
                     proxy's own cost, with nothing held back) -> replay-upstream
    backtrack+guard  the same with the repository's default policy and the guard model on (its default
                     hold-back of 24 tokens); the bundled checkpoint, `--checkpoint`, or, when neither
                     exists, an untrained stand-in of the same shape (same compute, a head that never fires)
    litellm          LiteLLM's proxy in pass-through (one worker, no database, a master key of its own),
                     installed on first use into its own virtualenv (`--litellm-venv`)
    litellm+guard    the same with a streaming guardrail hook (`bench/litellm_guard.py`) that runs
                     the same guard checkpoint in LiteLLM's process through Backtrack's own scorer; the
                     guard's pinned packages (torch, tokenizers, safetensors) go into LiteLLM's virtualenv

There is one replay-upstream per `--rates` value (0: unthrottled) and one Backtrack pair in front of each;
LiteLLM serves all of them as one model name per rate. At each rate and concurrency the paths take turns,
so drift in the machine's load touches them alike. Each stream starts new requests for `--seconds`, and
streams still open after `--max-seconds` are cancelled and counted as `cut` (a path that cannot keep up
would otherwise hold the run for minutes).

Per path, rate and concurrency (times from sending the request, in ms): TTFT and inter-chunk gap p50/p99;
added = path minus direct at the same rate and concurrency, quantile by quantile; the server's CPU seconds
per 1,000 content chunks received (the upstream's for direct; the process and its children); the load
client's own CPU, the share of the machine busy meanwhile and how much of that was no process of this
run (others' work: noise); and for the guard, how often it answered too late and text went out
unjudged (`backtrack_fail_open_total`). Per path and rate: peak RSS (VmHWM).
At a paced rate a concurrency is *sustained* when no request failed or was cut, no text went out
unjudged, and the slowest 1% of answers ended at most 10% later than the upstream's own schedule.

Last, with the servers stopped, the guard scores `proxy`-free: `backtrack bench guard`'s workload at
`--guard-streams` concurrent streams, tokens/s against its roofline (this CPU's measured matmul FLOP/s x
the model's FLOPs per token); and the floor under the CPU target (`bench.floor`): the CPU of an idle event
loop woken once per chunk period of each paced rate, which a proxy at one stream spends per chunk before
doing anything.

A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.command import PACKAGE_ROOT, add_command, number_list, publish, run_in_workdir
from bench.floor import wakeup_floor
from bench.litellm_peer import DEFAULT_LITELLM_VENV, LITELLM_SPEC, ensure_litellm, start_litellm
from bench.load import BENCH_PROMPT, Load, Target, Workload, bench_row, expected_answers, run_path
from bench.measure import added_latency
from bench.servers import (
    STARTUP_SECONDS,
    Server,
    free_port,
    proxy_command,
    replay_command,
    servers,
    settle,
    wait_until_up,
    write_proxy_config,
)
from bench.suite_guard import fail_open_count, guard_checkpoint, policies
from bench.suite_report import markdown, plot
from bench.suite_summary import PATHS, model_name, rate_label, summarize
from proxy.core.config import ScorerConfig
from proxy.replay.app import Row

# A one-token answer: warming up 256 connections through a slow path must not cost a full answer each.
WARMUP_PROMPT = "Say ready."
WARMUP_ROW = Row(prompt=WARMUP_PROMPT, response="Ready")
# Wakeups of the idle-loop floor per paced rate (`bench.floor`): 3 s at 50 tokens/s.
FLOOR_WAKEUPS = 150


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start every server, drive every path at every rate and concurrency, then bench the guard."""
    row = bench_row()
    data = workdir / "bench-data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in (row, WARMUP_ROW)),
        encoding="utf-8",
    )
    expected = expected_answers([row])
    marker_policy, guard_policy = policies()
    checkpoint, checkpoint_label = (
        (None, None) if args.skip_guard else guard_checkpoint(args.checkpoint, workdir)
    )
    with_hook = checkpoint is not None and not args.skip_litellm_guard
    litellm = None if args.skip_litellm else ensure_litellm(args.litellm_venv, guard=with_hook)
    master_key = "sk-bench-" + secrets.token_hex(16)
    results: list[dict[str, Any]] = []
    peaks: list[dict[str, Any]] = []
    started_at = time.time()
    load = Load(seconds=args.seconds, cut_after=args.max_seconds, warmup_prompt=WARMUP_PROMPT)

    with servers() as started:
        by_rate: dict[float | None, dict[str, Server]] = {}
        for rate in args.rates:
            port = free_port()
            command = replay_command(data, port, rate)
            upstream = Server(
                f"replay-upstream ({rate_label(rate)})", command, port, workdir / f"replay-{port}.log"
            )
            started.append(upstream)
            paths = {"direct": upstream}
            configs = [("backtrack", write_proxy_config(workdir, f"marker-{port}", marker_policy))]
            if checkpoint is not None:
                guard = {"checkpoint": str(checkpoint.resolve())}
                configs.append(
                    ("backtrack+guard", write_proxy_config(workdir, f"guard-{port}", guard_policy, guard))
                )
            for name, config in configs:
                proxy_port = free_port()
                command = proxy_command(config, upstream.url, proxy_port)
                log = workdir / f"{name}-{proxy_port}.log"
                server = Server(f"{name} ({rate_label(rate)})", command, proxy_port, log)
                started.append(server)
                paths[name] = server
            by_rate[rate] = paths
        litellms: dict[str, Server] = {}
        if litellm is not None:
            models = {model_name(rate): paths["direct"].url for rate, paths in by_rate.items()}
            hook = None
            if with_hook and checkpoint is not None:
                shipped = ScorerConfig()  # LiteLLM's hook runs the guard as Backtrack's proxy does
                hook = {
                    "checkpoint": str(checkpoint.resolve()),
                    "logit_bias": guard_policy.get("logit_bias", 0.0),
                    "threshold": guard_policy.get("threshold", 0.5),
                    "precision": shipped.precision,
                    "threads": shipped.threads or 1,
                }
            litellms = start_litellm(litellm, workdir, models, master_key, hook, started)

        async with aiohttp.ClientSession() as session:
            for server in started:
                if server.name.startswith("replay"):
                    health = "/v1/models"
                else:
                    health = "/health/liveliness" if server.name in litellms else "/healthz"
                await wait_until_up(session, server, health)
            # One answer down every path first, so that a lazy start (LiteLLM's hook loads the guard with
            # its first request) is not measured.
            warm = Workload([WARMUP_PROMPT], {}, None)
            for rate, paths in by_rate.items():
                for name, server in [*paths.items(), *litellms.items()]:
                    target = _target(server, name in litellms, rate, master_key)
                    await run_path(server, name, 1, Load(requests=1, cut_after=STARTUP_SECONDS), warm, target)
            print(f"servers up and primed after {time.time() - started_at:.0f} s", file=sys.stderr)

            for rate, paths in by_rate.items():
                workload = Workload([BENCH_PROMPT], expected, rate)
                for concurrency in args.concurrency:
                    for name in PATHS:
                        measured = litellms.get(name) or paths.get(name)
                        if measured is None:
                            continue
                        target = _target(measured, name in litellms, rate, master_key)
                        guarded = name == "backtrack+guard"
                        fail_open = await fail_open_count(session, measured) if guarded else None
                        feeder = None if name == "direct" else paths["direct"]
                        path_run = await run_path(measured, name, concurrency, load, workload, target, feeder)
                        summary = {"rate": rate, **path_run.summary()}
                        if fail_open is not None:
                            summary["unjudged"] = await fail_open_count(session, measured) - fail_open
                        results.append(summary)
                        await settle(measured)
                        print(
                            f"  {rate_label(rate):>14} {name:>16} {concurrency:>4} streams: "
                            f"{summary['requests']} requests, {summary['chunks']} chunks, "
                            f"{summary['errors']} errors, {summary['cut']} cut, {summary['seconds']:.1f} s",
                            file=sys.stderr,
                        )
                for name, server in paths.items():
                    peaks.append({"rate": rate, "path": name, "peak_rss_bytes": server.peak_rss_bytes()})
            for name, server in litellms.items():
                peaks.append({"rate": None, "path": name, "peak_rss_bytes": server.peak_rss_bytes()})
    http_seconds = time.time() - started_at

    roofline = None
    if checkpoint is not None and args.guard_streams:
        from bench.guard import guard_roofline  # torch: only when the guard runs

        roofline = await guard_roofline(checkpoint, args.guard_streams, args.threads)
    # Its own loop, in a thread: this one is the load client's.
    floors = [
        {"rate": rate, **await asyncio.to_thread(wakeup_floor, 1 / rate, FLOOR_WAKEUPS)}
        for rate in args.rates
        if rate
    ]

    report: dict[str, Any] = {
        "command": "backtrack bench all " + " ".join(_argv(args)),
        "machine": machine(),
        "settings": {
            "rates": args.rates,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "max_seconds": args.max_seconds,
            "response_tokens": len(expected[BENCH_PROMPT].token_ends),
            "checkpoint": checkpoint_label,
            "litellm": LITELLM_SPEC if litellm is not None else None,
            "http_seconds": http_seconds,
        },
        "results": results,
        "peaks": peaks,
        "guard_roofline": roofline,
        "wakeup_floor": floors,
    }
    report["added"] = [
        {"rate": rate, **entry}
        for rate in args.rates
        for entry in added_latency([r for r in results if r["rate"] == rate])
    ]
    report["summary"] = summarize(report)
    return report


def _target(server: Server, litellm: bool, rate: float | None, master_key: str) -> Target | None:
    """Where a path's requests go: LiteLLM needs its model name per rate and its master key."""
    if not litellm:
        return None
    return Target(server.url + "/v1/chat/completions", model=model_name(rate), token=master_key)


def machine() -> dict[str, Any]:
    """What the numbers ran on: CPUs, their model, the load average, the code's commit."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """`git describe` of the code measured; `-dirty` when the working tree differs from it."""
    done = subprocess.run(
        ["git", "-C", str(PACKAGE_ROOT), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return (done.stdout.strip() or None) if done.returncode == 0 else None


# --- command ------------------------------------------------------------------------------------------


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `all` to `backtrack bench`."""
    parser = add_command(
        subparsers,
        "all",
        "direct, Backtrack (marker, guard) and LiteLLM side by side; the guard against its roofline",
        __doc__,
    )
    numbers = {
        kind: number_list(kind, 0, "numbers", "give one or more numbers, none negative")
        for kind in (int, float)
    }
    parser.add_argument("--concurrency", type=numbers[int], default=[1, 16, 32, 64, 256],
                        help="stream counts (default: 1,16,32,64,256)")  # fmt: skip
    parser.add_argument("--rates", type=numbers[float], default=[0.0, 50.0],
                        help="upstream tokens/s per stream, 0 for unthrottled (default: 0,50)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="each stream starts new requests for this long (default: 6)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=15.0,
                        help="streams still open after this long are cut (default: 15)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="guard checkpoint (default: bundled, else an untrained stand-in)")  # fmt: skip
    parser.add_argument("--guard-streams", type=numbers[int], default=[1, 8, 32, 64],
                        help="streams for the in-process guard roofline (default: 1,8,32,64)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the roofline"
    )
    parser.add_argument("--skip-guard", action="store_true", help="leave out the guard path and the roofline")
    parser.add_argument(
        "--skip-litellm", action="store_true", help="leave out LiteLLM (nothing is installed)"
    )
    parser.add_argument(
        "--skip-litellm-guard", action="store_true", help="leave out LiteLLM with the guard hook"
    )
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_LITELLM_VENV,
                        help=f"LiteLLM's virtualenv, created with {LITELLM_SPEC} if missing")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="write bench-all.json, bench-all.md and the PNG plots here")  # fmt: skip
    parser.set_defaults(func=main)


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of this run, as they would be typed."""
    argv = [
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--rates", ",".join(f"{r or 0:g}" for r in args.rates),
        "--seconds", f"{args.seconds:g}",
        "--max-seconds", f"{args.max_seconds:g}",
    ]  # fmt: skip
    if args.checkpoint is not None:
        argv += ["--checkpoint", str(args.checkpoint)]
    if not args.skip_guard:
        argv += ["--guard-streams", ",".join(map(str, args.guard_streams))]
    for flag in ("skip_guard", "skip_litellm", "skip_litellm_guard"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv


def _unwind(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print its tables, write them, the JSON and the plots to `--out`.

    Returns 2 for bad options, 1 when the benchmark cannot run (the error says why), else 0.
    """
    if args.seconds <= 0 or args.max_seconds < args.seconds or not all(args.concurrency):
        print(
            "backtrack bench all: error: --seconds must be > 0, --max-seconds >= --seconds, streams >= 1",
            file=sys.stderr,
        )
        return 2
    args.rates = [rate or None for rate in args.rates]
    # A run minutes long gets stopped: SIGTERM, or SIGINT in a background job (which starts out ignoring
    # it), must unwind through `servers()` so that no server is left running.
    previous = {sig: signal.signal(sig, _unwind) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = run_in_workdir("all", lambda workdir: run(args, workdir), prefix="backtrack-bench-all-")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if report is None:
        return 1
    publish(report, markdown(report), args.out, "bench-all")
    if args.out is not None:
        for png in plot(report, args.out):
            print(f"wrote {png}", file=sys.stderr)
    return 0
