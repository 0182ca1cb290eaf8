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
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

import proxy
from proxy.core.errors import BacktrackError
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import Row, load_rows

PACKAGE_ROOT = Path(proxy.__file__).resolve().parent.parent
DEFAULT_CONFIG = PACKAGE_ROOT / "config.yaml"
BENCH_PROMPT = "Describe the benchmark garden."
# Long enough that per-chunk costs dominate the per-request ones; numbered so no two chunks are equal.
BENCH_RESPONSE_TOKENS = 200
STARTUP_SECONDS = 120.0


class BenchError(BacktrackError):
    """The benchmark could not run: a server did not start, or the options are wrong."""


@dataclass
class Sample:
    """One streamed request as the client saw it; times in seconds from sending the request."""

    ttfb: float | None = None
    ttft: float | None = None
    last: float | None = None  # the last content chunk
    gaps: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    chunks: int = 0
    ok: bool = False
    done: bool = False  # False: still streaming when the run was cut
    # The upstream's own time for the answer (its schedule for the last token); None when unpaced.
    scheduled: float | None = None


@dataclass
class PathRun:
    """All requests of one path at one concurrency, and the CPU time spent while they ran."""

    path: str
    concurrency: int
    seconds: float
    cpu_seconds: float  # the server's
    samples: list[Sample]
    client_cpu_seconds: float = 0.0  # the load client's (this process)
    busy: float | None = None  # share of all CPUs of the machine busy meanwhile, from /proc/stat
    upstream_cpu_seconds: float | None = None  # the upstream's, when it is not the server measured

    def summary(self) -> dict[str, Any]:
        chunks = sum(s.chunks for s in self.samples)
        ms = 1000.0
        ttfb = [s.ttfb * ms for s in self.samples if s.ttfb is not None]
        ttft = [s.ttft * ms for s in self.samples if s.ttft is not None]
        gaps = [g * ms for s in self.samples for g in s.gaps]
        lags = [g * ms for s in self.samples for g in s.lags]
        slowdowns = [
            s.last / s.scheduled for s in self.samples if s.ok and s.last is not None and s.scheduled
        ]
        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "errors": sum(s.done and not s.ok for s in self.samples),
            "cut": sum(not s.done for s in self.samples),
            "chunks": chunks,
            "ttfb_ms": _quantiles(ttfb),
            "ttft_ms": _quantiles(ttft),
            "gap_ms": _quantiles(gaps),
            "lag_ms": _quantiles(lags),
            "slowdown": _quantiles(slowdowns),
            "seconds": self.seconds,
            "chunks_per_s": chunks / self.seconds if self.seconds else None,
            "cpu_s_per_1k_chunks": self.cpu_seconds / chunks * 1000 if chunks else None,
            "client_cpu_s": self.client_cpu_seconds,
            "upstream_cpu_s": self.upstream_cpu_seconds,
            "machine_busy": self.busy,
            "other_load": self._other_load(),
        }

    def _other_load(self) -> float | None:
        """Share of the machine busy with something other than this run: other people's work (noise)."""
        if self.busy is None or not self.seconds:
            return None
        ours = self.cpu_seconds + self.client_cpu_seconds + (self.upstream_cpu_seconds or 0.0)
        capacity = (os.cpu_count() or 1) * self.seconds
        return max(0.0, self.busy - ours / capacity)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values`, linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}


def bench_row() -> Row:
    """A benign response of exactly `BENCH_RESPONSE_TOKENS` approximate tokens, no two neighbours alike."""
    flowers = ["red tulips", "white roses", "blue irises", "yellow daffodils", "purple asters"]
    text = " ".join(
        f"Bed {i} holds {3 * i + 4} {flowers[i % len(flowers)]}." for i in range(BENCH_RESPONSE_TOKENS)
    )
    pieces = ApproxTokenizer().split(text)[:BENCH_RESPONSE_TOKENS]
    return Row(prompt=BENCH_PROMPT, response="".join(pieces))


@dataclass(frozen=True)
class Expected:
    """The answer a prompt must get, and where each delta the upstream sends for it ends."""

    text: str
    token_ends: list[int]

    def due(self, received_chars: int, tokens_per_second: float | None) -> float:
        """When the upstream is scheduled to send the delta that completes `received_chars` characters,
        in seconds after it starts streaming (0 for an unthrottled upstream).
        """
        if not tokens_per_second:
            return 0.0
        # Step 0 of a replayed stream is the role chunk; content delta j goes out at step j + 1.
        return (bisect_left(self.token_ends, received_chars) + 1) / tokens_per_second


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    expected: dict[str, Expected]
    tokens_per_second: float | None


def expected_answers(rows: list[Row]) -> dict[str, Expected]:
    """Prompts whose answer is fixed and passes a marker-only proxy unchanged, with that answer."""
    by_prompt: dict[str, list[str]] = {}
    for row in rows:
        if row.prompt is not None:
            by_prompt.setdefault(row.prompt, []).append(row.response)
    tokenizer = ApproxTokenizer()
    return {
        prompt: Expected(text, list(accumulate(len(piece) for piece in tokenizer.split(text))))
        for prompt, (text, *others) in by_prompt.items()
        if not others and "[RESET]" not in text
    }


# --- subprocesses -------------------------------------------------------------------------------------


class Server:
    """A child process serving HTTP on `port`, its output in `log`.

    `env` replaces the environment (default: this one, with this package importable).
    """

    def __init__(
        self, name: str, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log: TextIO = log_path.open("w", encoding="utf-8")
        if env is None:
            path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """utime + stime so far of the process and its live descendants (a server may fork workers)."""
        total = 0.0
        for pid in _process_tree(self.process.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited since the tree was read
                continue
            # The command name (field 2) may contain spaces; the numeric fields start after its ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def peak_rss_bytes(self) -> int:
        """Peak resident memory (VmHWM) of the process and its live descendants, added up."""
        total = 0
        for pid in _process_tree(self.process.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024  # reported in kB
        return total

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        # Descendants first: a worker left behind by its parent's exit would outlive the benchmark.
        children = _process_tree(self.process.pid)[1:]
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants, parents first."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            with suppress(OSError):
                tree += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return tree


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def servers() -> Iterator[list[Server]]:
    """Children started into the yielded list are stopped on the way out, error or not."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


async def wait_until_up(session: aiohttp.ClientSession, server: Server, path: str) -> None:
    """Poll `path` until it answers 200; `BenchError` with the log's tail if the server exits or is slow."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            async with session.get(server.url + path) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass  # not listening yet
        await asyncio.sleep(0.1)
    raise BenchError(
        f"{server.name} did not answer {path} within {STARTUP_SECONDS:.0f} s:\n{server.log_tail()}"
    )


# --- load ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a path's requests go: the chat completions URL, the model to name, the bearer token."""

    url: str
    model: str = "bench"
    token: str = "bench"


@dataclass(frozen=True)
class Load:
    """How long each of the concurrent streams keeps asking, one request after another."""

    requests: int | None = None  # this many requests per stream
    seconds: float | None = None  # or: new requests until this long after the start (at least one)
    cut_after: float | None = None  # streams still open then are cancelled and counted as cut
    warmup_prompt: str | None = None  # default: the workload's first prompt

    def more(self, done: int, elapsed: float) -> bool:
        if self.requests is not None:
            return done < self.requests
        return done == 0 or elapsed < (self.seconds or 0.0)


async def _one_request(
    session: aiohttp.ClientSession,
    target: Target,
    prompt: str,
    expected: Expected | None,
    tokens_per_second: float | None,
    sample: Sample,
) -> None:
    """Stream one answer into `sample`; a request cancelled half-way leaves what it saw there."""
    received = 0
    body = {"model": target.model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    loop = asyncio.get_running_loop()
    started = loop.time()
    text: list[str] = []
    done = False
    if expected is not None and tokens_per_second:
        sample.scheduled = expected.due(len(expected.text), tokens_per_second)
    headers = {"Authorization": f"Bearer {target.token}"}
    try:
        async with session.post(target.url, json=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                sample.done = True
                return
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                now = loop.time() - started
                if sample.ttfb is None:
                    sample.ttfb = now
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    sample.done = True
                    return
                content = "".join(
                    (c.get("delta") or {}).get("content") or "" for c in event.get("choices", [])
                )
                if not content:
                    continue
                text.append(content)
                sample.chunks += 1
                received += len(content)
                if expected is not None:
                    sample.lags.append(now - expected.due(received, tokens_per_second))
                if sample.last is None:
                    sample.ttft = now
                else:
                    sample.gaps.append(now - sample.last)
                sample.last = now
    except (aiohttp.ClientError, json.JSONDecodeError):
        sample.done = True
        return
    sample.done = True
    sample.ok = done and (expected is None or "".join(text) == expected.text)


async def run_path(
    server: Server,
    name: str,
    concurrency: int,
    load: Load,
    workload: Workload,
    target: Target | None = None,
    upstream: Server | None = None,
) -> PathRun:
    """Warm up, then drive `concurrency` streams at `target` (default: the server's chat completions).

    CPU is the server's (and `upstream`'s, apart) over the measured part only; a cut run counts up to the cut.
    """
    target = target or Target(server.url + "/v1/chat/completions")
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up: open connections and let both servers reach steady state before measuring; bounded
        # like the run, since a path that cannot keep up is slow to warm up too.
        warmup = load.warmup_prompt or workload.prompts[0]
        await _bounded(
            [_one_request(session, target, warmup, None, None, Sample()) for _ in range(concurrency)],
            load.cut_after,
        )
        samples: list[Sample] = []

        async def stream(index: int) -> None:
            k = 0
            while load.more(k, time.perf_counter() - clock):
                prompt = workload.prompts[(index + k) % len(workload.prompts)]
                samples.append(sample := Sample())
                await _one_request(
                    session, target, prompt, workload.expected.get(prompt), workload.tokens_per_second, sample
                )
                k += 1

        upstream_before = upstream.cpu_seconds() if upstream else 0.0
        cpu_before, client_before, busy_before = server.cpu_seconds(), time.process_time(), _cpu_ticks()
        clock = time.perf_counter()
        await _bounded([stream(i) for i in range(concurrency)], load.cut_after)
        seconds = time.perf_counter() - clock
        cpu = server.cpu_seconds() - cpu_before
        client = time.process_time() - client_before
        busy_after = _cpu_ticks()
        upstream_cpu = upstream.cpu_seconds() - upstream_before if upstream else None
    busy = _busy_share(busy_before, busy_after)
    return PathRun(name, concurrency, seconds, cpu, samples, client, busy, upstream_cpu)


async def _bounded(coroutines: list[Coroutine[Any, Any, None]], timeout: float | None) -> None:
    """Run the coroutines together; those still running after `timeout` seconds are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else None


# --- report -------------------------------------------------------------------------------------------


def added_latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Proxy minus direct at the same concurrency, for TTFB, TTFT, inter-chunk gap and lag (ms)."""
    direct = {r["concurrency"]: r for r in rows if r["path"] == "direct"}
    added = []
    for row in rows:
        base = direct.get(row["concurrency"])
        if row["path"] == "direct" or base is None:
            continue
        entry: dict[str, Any] = {"path": row["path"], "concurrency": row["concurrency"]}
        for metric in ("ttfb_ms", "ttft_ms", "gap_ms", "lag_ms"):
            entry[metric] = {q: _minus(row[metric][q], base[metric][q]) for q in ("p50", "p99")}
        added.append(entry)
    return added


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def format_pair(values: dict[str, float | None], signed: bool = False) -> str:
    """`p50 / p99` of a quantile pair, – for a missing one."""
    spec = "+.2f" if signed else ".2f"
    return " / ".join("–" if values[q] is None else format(values[q], spec) for q in ("p50", "p99"))


def format_number(value: float | None, spec: str) -> str:
    """`value` in `spec`, – for None."""
    return "–" if value is None else format(value, spec)


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


# --- command ------------------------------------------------------------------------------------------


def _concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more stream counts, each at least 1")
    return levels


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `proxy` to `backtrack bench`."""
    parser = subparsers.add_parser(
        "proxy",
        help="latency and CPU the proxy adds to streams, against replay-upstream alone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--concurrency", type=_concurrency, default=[1, 16, 64], help="stream counts, e.g. 1,16,64"
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
    (directory / f"{name}-policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config = {"policies": {"bench": f"{name}-policy.yaml"}, "default_policy": "bench"}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def replay_command(data: Path, port: int, tokens_per_second: float | None) -> list[str]:
    """`backtrack replay-upstream` for `data` on `port`, paced at `tokens_per_second` (None: unpaced)."""
    command = [
        sys.executable,
        "-m",
        "proxy.cli.main",
        "replay-upstream",
        "--data",
        str(data),
        "--port",
        str(port),
    ]
    return command + (["--tokens-per-second", str(tokens_per_second)] if tokens_per_second else [])


def proxy_command(config: Path, upstream: str, port: int) -> list[str]:
    """`backtrack serve` with `config` in front of `upstream`, on 127.0.0.1:`port`."""
    serve = [
        "serve",
        "--config",
        str(config),
        "--upstream",
        upstream,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return [sys.executable, "-m", "proxy.cli.main", *serve]


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
    with tempfile.TemporaryDirectory(prefix="backtrack-bench-") as workdir:
        try:
            report = asyncio.run(run(args, Path(workdir)))
        except BacktrackError as exc:
            print(f"backtrack bench proxy: error: {exc.message}", file=sys.stderr)
            return 1
    table = markdown_table(report)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench-proxy.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out / "bench-proxy.md").write_text(table + "\n", encoding="utf-8")
    return 0
