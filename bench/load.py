"""The load client: what the streams ask and expect back, and `run_path`, which drives N concurrent
streams at one server, each making requests one after another, and measures them (`bench.measure`).
"""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_left
from collections.abc import Coroutine
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import aiohttp

from bench.measure import PathRun, Sample
from bench.servers import Server
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import Row

BENCH_PROMPT = "Describe the benchmark garden."
# Long enough that per-chunk costs dominate the per-request ones; numbered so no two chunks are equal.
BENCH_RESPONSE_TOKENS = 200


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


@dataclass(frozen=True)
class Target:
    """Where a path's requests go: the chat completions URL, the model to name, the bearer token."""

    url: str
    model: str = "bench"
    token: str = "bench"
    body: dict[str, Any] = field(default_factory=dict)  # more of the request: max_tokens, temperature


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
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        **target.body,
    }
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
                # transformers serve sends no [DONE]: a stream whose choice finished and then ends is whole.
                done = done or any(c.get("finish_reason") for c in event.get("choices", []))
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
    read_timeout: float = 60.0,
) -> PathRun:
    """Warm up, then drive `concurrency` streams at `target` (default: the server's chat completions).

    CPU is the server's (and `upstream`'s, apart) over the measured part only; a cut run counts up to the cut.
    A stream silent for `read_timeout` seconds counts as an error.
    """
    target = target or Target(server.url + "/v1/chat/completions")
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout)
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
