"""`backtrack bench soak`: a bounded soak of the proxy with Redis, its outage in the middle included.

One run starts, as child processes in a temporary folder:

    redis-server        on a free port, no persistence of its own (`--save "" --appendonly no`)
    replay-upstream     a mixed corpus: benign answers, harmful ones (a pattern word the policy resets
                        on, so no model is loaded), rows failing before the headers, rows failing in-band
    backtrack serve     in front of it, `redis.url` set, a pattern-only policy with hold-back, audit kept

Then `--streams` client loops send requests for `--minutes` (a fixed seed picks each one's prompt kind,
route among the five guarded ones, and streamed or not). At a third of the run Redis is shut down for
`--redis-down-seconds` (with SHUTDOWN SAVE, so what it held survives the restart, as a persistent
production Redis would) and started again on the same port: the proxy spools audit events meanwhile and
must write them all afterwards. Every few seconds the proxy's RSS (VmRSS) and open fds are sampled.

At the end it waits for the spool to drain (`/readyz`), exports the audit log with `backtrack audit
export`, and compares the events found with the resets the clients saw (one event per reset).
Exit 0; 3 when audit events were lost; 1 when the soak could not run; 130 when interrupted.

A benchmark, not a test: nothing here asserts a timing. Every request has a timeout, the loops stop at
the deadline and every child is stopped on exit, on an error and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.command import PACKAGE_ROOT, BenchError, Report, add_command, publish, run_in_workdir
from bench.servers import Server, free_port, proxy_command, replay_command, servers, wait_until_up
from bench.soak_client import (
    PATTERN_CATEGORY,
    PATTERN_WORD,
    Result,
    corpus_rows,
    markdown,
    pick,
    send,
    summary,
)

DRAIN_SECONDS = 60.0  # the proxy pings Redis every second; a spool of thousands flushes in well under this
REDIS_START_SECONDS = 10.0
EXIT_LOST = 3


def register_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `soak` to `backtrack bench`."""
    parser = add_command(
        subparsers, "soak", "a bounded soak with a Redis outage: leaks, lost audit events", __doc__
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent client loops (default: 16)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the loops run (fractions ok)")
    parser.add_argument("--redis-down-seconds", type=float, default=15.0, help="outage at 1/3 of the run")
    parser.add_argument("--tokens-per-second", type=float, default=200.0, help="replay pacing per stream")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="RSS and fd sampling interval")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write soak.json and soak.md here")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the soak, print its tables, write them and the JSON to `--out`."""
    if args.streams < 1 or args.minutes <= 0 or args.redis_down_seconds < 0 or args.sample_seconds <= 0:
        print("backtrack bench soak: error: --streams >= 1, --minutes > 0, --redis-down-seconds >= 0, "
              "--sample-seconds > 0", file=sys.stderr)  # fmt: skip
        return 2
    if shutil.which("redis-server") is None:
        print("backtrack bench soak: error: redis-server is not installed", file=sys.stderr)
        return 1
    try:
        report = run_in_workdir("soak", lambda workdir: run(args, workdir), prefix="backtrack-soak-")
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("backtrack bench soak: interrupted; every child process was stopped", file=sys.stderr)
        return 130
    if report is None:
        return 1
    publish(report, markdown(report), args.out, "soak")
    return EXIT_LOST if report["audit"]["lost"] else 0


class Redis:
    """redis-server on one port, stopped and started again there (its RDB file carries the data over)."""

    def __init__(self, workdir: Path, started: list[Server]) -> None:
        self.workdir, self.started, self.port, self.starts = workdir, started, free_port(), 0
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.starts += 1
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        server = Server("redis-server", command, self.port, self.workdir / f"redis-{self.starts}.log")
        self.server = server
        self.started.append(server)  # before waiting: a start that fails is still stopped on the way out
        deadline = time.monotonic() + REDIS_START_SECONDS
        while not await self._ping():
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start on port {self.port}:\n{server.log_tail()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SHUTDOWN SAVE: without its own save points Redis would otherwise lose what it held."""
        server = self.server
        assert server is not None, "stop before start"
        with suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"SHUTDOWN SAVE\r\n")
            await writer.drain()
            writer.close()
        for _ in range(200):
            if server.process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        server.stop()

    async def _ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(64), 1.0)).startswith(b"+PONG")
        except (TimeoutError, OSError):
            return False
        finally:
            writer.close()


def write_config(workdir: Path, redis_url: str, upstream: str) -> Path:
    """The proxy's config: the replay upstream, Redis, one pattern-only policy that refuses."""
    policy = {
        "name": "soak",
        "description": "pattern detector only, for `backtrack bench soak`",
        "detectors": {
            "marker": {"enabled": True},
            "patterns": [{"category": PATTERN_CATEGORY, "words": [PATTERN_WORD]}],
            "model": {"enabled": False},
        },
        "holdback_tokens": 24,
        "actions": {"default": "refuse", "upstream_reset": "continue"},
        "audit": "kept",  # the bigger events: the spool holds the discarded text and the prompt too
    }
    (workdir / "soak-policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config = {
        "upstream": {"url": upstream},
        "policies": {"soak": "soak-policy.yaml"},
        "default_policy": "soak",
        "redis": {"url": redis_url, "prefix": "soak"},
    }
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def proc_sample(server: Server) -> tuple[float, int]:
    """(VmRSS in MiB, open fds) of `server`'s process; BenchError, with its log, once it has exited."""
    pid = server.process.pid
    alive(server)
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def alive(server: Server) -> None:
    """BenchError with the log's tail when `server` has exited: the soak found a crash."""
    if server.process.poll() is not None:
        raise BenchError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail(40)}")


async def readyz(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """`shared_state` of the proxy's /readyz ({} when it does not answer)."""
    try:
        async with session.get(base + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as response:
            state: dict[str, Any] = (await response.json()).get("shared_state", {})
            return state
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return {}


async def run(args: argparse.Namespace, workdir: Path) -> Report:
    """Start the servers, soak, drain, count; the report."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no handler
            loop.add_signal_handler(signum, task.cancel)
    try:
        return await _soak(args, workdir)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signum)


async def _soak(args: argparse.Namespace, workdir: Path) -> Report:
    data = workdir / "soak-data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in corpus_rows()), encoding="utf-8")
    duration = args.minutes * 60
    load_before = os.getloadavg()
    with servers() as started:
        redis = Redis(workdir, started)
        await redis.start()
        upstream_port, proxy_port = free_port(), free_port()
        upstream = Server(
            "replay-upstream", replay_command(data, upstream_port, args.tokens_per_second), upstream_port,
            workdir / "replay.log",
        )  # fmt: skip
        started.append(upstream)
        config = write_config(workdir, redis.url, upstream.url)
        proxy = Server(
            "proxy", proxy_command(config, upstream.url, proxy_port), proxy_port, workdir / "proxy.log"
        )
        started.append(proxy)
        connector = aiohttp.TCPConnector(limit=args.streams + 4)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_until_up(session, upstream, "/v1/models")
            await wait_until_up(session, proxy, "/readyz")
            report = await _load(args, session, proxy, redis, duration)
            report["audit"] = await _audit(session, proxy, config, report)
        if proxy.process.poll() is not None:
            raise BenchError(f"the proxy exited with {proxy.process.returncode}:\n{proxy.log_tail()}")
    report["command"] = "backtrack bench soak " + " ".join(_argv(args))
    report["settings"] = {
        "streams": args.streams, "minutes": args.minutes, "redis_down_seconds": args.redis_down_seconds,
        "tokens_per_second": args.tokens_per_second, "request_timeout_s": args.request_timeout,
        "sample_seconds": args.sample_seconds, "seed": args.seed, "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
    }  # fmt: skip
    return report


async def _load(
    args: argparse.Namespace, session: aiohttp.ClientSession, proxy: Server, redis: Redis, duration: float
) -> Report:
    """The client loops, the outage and the sampler, run together until the deadline."""
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    results: list[Result] = []
    samples: list[dict[str, Any]] = []
    outage: dict[str, float] = {}

    async def client(index: int) -> None:
        rng = random.Random(args.seed * 100_003 + index)
        while clock() < duration:  # a request under way at the deadline is read to its end
            kind, prompt, route, stream = pick(rng)
            results.append(
                await send(session, proxy.url, kind, prompt, route, stream, args.request_timeout, clock)
            )

    async def redis_outage() -> None:
        await asyncio.sleep(max(0.0, duration / 3 - clock()))
        await redis.stop()
        outage["stopped_at_s"] = clock()
        await asyncio.sleep(args.redis_down_seconds)
        await redis.start()
        outage["restarted_at_s"] = clock()

    async def sample() -> dict[str, Any]:
        rss, fds = proc_sample(proxy)
        state = await readyz(session, proxy.url)
        return {
            "t_s": round(clock(), 1), "rss_mib": round(rss, 1), "fds": fds, "requests": len(results),
            "resets_seen": sum(r.resets for r in results), "redis_up": state.get("up"),
            "spooled": state.get("spooled_events"),
        }  # fmt: skip

    async def sampler() -> None:
        while True:
            samples.append(await sample())
            await asyncio.sleep(args.sample_seconds)

    sampling = asyncio.create_task(sampler())
    down = asyncio.create_task(redis_outage()) if args.redis_down_seconds > 0 else None
    clients = asyncio.gather(*(client(i) for i in range(args.streams)))
    try:
        # The sampler ends only when it finds the proxy gone: stop the loops then, not at the deadline.
        watched: list[asyncio.Future[Any]] = [clients, sampling]
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if sampling.done():
            sampling.result()
        await clients
        loops_ended = clock()
        if down is not None:
            await down  # an outage longer than the rest of the run still ends before the count
        drained = await _drain(session, proxy)
        samples.append(await sample())  # the end: after the drain, before anything is stopped
    finally:
        # On an error or a signal too: an outage task left running could start Redis after the teardown.
        for background in (clients, sampling, down):
            if background is not None and not background.done():
                background.cancel()
                with suppress(asyncio.CancelledError):
                    await background
    return summary(results, samples, outage, duration, loops_ended, drained)


async def _drain(session: aiohttp.ClientSession, proxy: Server) -> float:
    """Seconds until Redis is up again and the spool is empty; BenchError past DRAIN_SECONDS."""
    start, state = time.monotonic(), {}
    while time.monotonic() - start < DRAIN_SECONDS:
        alive(proxy)
        state = await readyz(session, proxy.url)
        if state.get("up") and state.get("spooled_events") == 0:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise BenchError(f"the audit spool did not drain within {DRAIN_SECONDS:.0f} s: {state}")


async def _audit(session: aiohttp.ClientSession, proxy: Server, config: Path, report: Report) -> Report:
    """The audit events in Redis (via `backtrack audit export`) against the resets the clients saw."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
    }
    export = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli.main", "audit", "export", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(export.communicate(), 120)
    finally:
        if export.returncode is None:  # timed out or cancelled: it must not outlive the soak
            export.kill()
            await export.wait()
    if export.returncode != 0:
        raise BenchError(f"backtrack audit export exited with {export.returncode}: {err.decode()[-2000:]}")
    events = [json.loads(line) for line in out.decode().split("\n") if line.strip()]
    ids = {e.get("id") for e in events}
    expected = report["resets_seen"]
    return {
        "expected": expected,
        "found": len(events),
        "unique_ids": len(ids),
        "lost": max(0, expected - len(events)),
        "extra": max(0, len(events) - expected),
        "proxy_counter": await _audit_counter(session, proxy.url),
    }


async def _audit_counter(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """`backtrack_audit_events_total` by result, from the proxy's /metrics."""
    async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('backtrack_audit_events_total{result="'):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] = float(value)
    return counts


def _argv(args: argparse.Namespace) -> list[str]:
    argv = ["--streams", str(args.streams), "--minutes", f"{args.minutes:g}",
            "--redis-down-seconds", f"{args.redis_down_seconds:g}"]  # fmt: skip
    for option, value, default in (
        ("--tokens-per-second", args.tokens_per_second, 200.0),
        ("--sample-seconds", args.sample_seconds, 5.0),
        ("--request-timeout", args.request_timeout, 30.0), ("--seed", args.seed, 0),
    ):  # fmt: skip
        if value != default:
            argv += [option, f"{value:g}"]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv
