"""Every metric, one test each, on a registry of its own: drive the code that records it, read the value.

Guard-side metrics are driven through `GuardedResponse` with scripted guards; request-side ones through
the app in front of the replay upstream, over real sockets with the official openai client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.core.config import load_settings
from proxy.core.detectors import PatternGuard, Verdict
from proxy.core.engine import Piece
from proxy.core.errors import GuardOverloaded
from proxy.core.policy import Policy
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import Row, RowError, create_replay_app
from proxy.server.app import create_app
from proxy.server.choice import GuardedResponse, Labels
from proxy.state.metrics import MAX_MODELS, MULTIPROC_ENV, Metrics
from tests.fakes import AwaitedGuard

CHAT = "/v1/chat/completions"
LABELS = Labels("p", CHAT, "m")
BOMB = "Mix the two into a bomb now."
ROWS = [
    Row("What is 2 + 2?", "2 + 2 is 4."),
    Row("How do I pick a lock?", "Sure, insert a tension wrench [RESET]I can't help with picking locks."),
    Row("Tell me a long story.", " ".join(["Once upon a time there was a quiet village."] * 10)),
    Row(
        "Break off, please.",
        "This answer breaks off after a few words.",
        RowError("overloaded", after_tokens=3),
    ),
]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- guard-side metrics: GuardedResponse with scripted guards ---------------------------------------


class FailingStream:
    """A guard stream whose scorer is always overloaded."""

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        raise GuardOverloaded("the scorer's queue is full")

    def close(self) -> None:
        pass


class FailingGuard:
    name = "failing"
    tokenizer = None

    def open(self, prompt: str | None) -> FailingStream:
        return FailingStream()


def bomb_guard() -> PatternGuard:
    return PatternGuard([], [("bomb", "weapons")])


async def guard_pieces(guarded: GuardedResponse, text: str) -> None:
    """What the relay does with one choice: feed token-sized pieces, score after each, finish."""
    choice = guarded.choice(0)
    for piece in ApproxTokenizer().split(text):
        guarded.feed(choice, Piece(piece))
        await guarded.score(choice)
    await guarded.finish(choice, None)
    guarded.close()


async def test_a_reset_is_counted_with_its_policy_route_model_category_and_action() -> None:
    metrics = Metrics()
    guarded = GuardedResponse(Policy(name="p", holdback_tokens=2), bomb_guard(), None, metrics, LABELS)

    await guard_pieces(guarded, BOMB)

    labels = {"policy": "p", "route": CHAT, "model": "m", "category": "weapons", "action": "refuse"}
    assert value(metrics, "backtrack_resets_total", **labels) == 1


async def test_a_flag_is_counted_as_a_reset_with_action_flag() -> None:
    metrics = Metrics()
    policy = Policy(name="p", holdback_tokens=2, actions={"default": "flag"})
    guarded = GuardedResponse(policy, bomb_guard(), None, metrics, LABELS)

    await guard_pieces(guarded, BOMB)

    labels = {"policy": "p", "route": CHAT, "model": "m", "category": "weapons", "action": "flag"}
    assert value(metrics, "backtrack_resets_total", **labels) == 1


async def test_the_reset_position_is_observed_in_guard_tokens() -> None:
    metrics = Metrics()
    guarded = GuardedResponse(Policy(name="p", holdback_tokens=2), bomb_guard(), None, metrics, LABELS)

    # "Mix the two into a bomb": the reset comes at the sixth token, after five safe ones.
    await guard_pieces(guarded, BOMB)

    assert value(metrics, "backtrack_reset_position_tokens_count", policy="p") == 1
    assert value(metrics, "backtrack_reset_position_tokens_bucket", policy="p", le="4.0") == 0
    assert value(metrics, "backtrack_reset_position_tokens_bucket", policy="p", le="8.0") == 1


async def test_guard_latency_is_observed_once_per_awaited_verdict() -> None:
    metrics = Metrics()
    policy = Policy(name="p", holdback_tokens=2, score_every_tokens=1)
    guarded = GuardedResponse(policy, AwaitedGuard(bomb_guard()), None, metrics, LABELS)

    await guard_pieces(guarded, "A calm and safe answer.")

    # Six pieces ("A", " calm", ..., ".") scored one by one, then the final judgement.
    assert value(metrics, "backtrack_guard_latency_seconds_count", policy="p") == 7


async def test_detectors_judged_inline_are_not_timed() -> None:
    metrics = Metrics()
    guarded = GuardedResponse(Policy(name="p", holdback_tokens=2), bomb_guard(), None, metrics, LABELS)

    await guard_pieces(guarded, "A calm and safe answer.")

    assert value(metrics, "backtrack_guard_latency_seconds_count", policy="p") is None


async def test_a_guard_failure_is_counted_with_its_kind_and_the_fail_mode() -> None:
    metrics = Metrics()
    policy = Policy(name="p", holdback_tokens=2, fail_mode="closed")
    guarded = GuardedResponse(policy, FailingGuard(), None, metrics, LABELS)

    await guard_pieces(guarded, "A calm and safe answer.")

    labels = {"policy": "p", "kind": "GuardOverloaded", "fail_mode": "closed"}
    assert value(metrics, "backtrack_guard_failures_total", **labels) == 1
    assert value(metrics, "backtrack_guard_latency_seconds_count", policy="p") is None
    assert value(metrics, "backtrack_fail_open_total", policy="p") is None


async def test_each_release_of_unjudged_text_counts_as_a_fail_open_event() -> None:
    metrics = Metrics()
    policy = Policy(name="p", holdback_tokens=2, fail_mode="open")
    guarded = GuardedResponse(policy, FailingGuard(), None, metrics, LABELS)

    await guard_pieces(guarded, "A calm and safe answer.")

    # The guard is asked once, for the first piece, and fails; the choice then goes on unguarded, and
    # the five further pieces and the final judgement are each released without a verdict.
    labels = {"policy": "p", "kind": "GuardOverloaded", "fail_mode": "open"}
    assert value(metrics, "backtrack_guard_failures_total", **labels) == 1
    assert value(metrics, "backtrack_fail_open_total", policy="p") == 7


async def test_holdback_delay_is_observed_for_text_the_upstream_sent() -> None:
    metrics = Metrics()
    guarded = GuardedResponse(Policy(name="p"), bomb_guard(), None, metrics, LABELS)

    guarded.observe_release(time.monotonic())
    guarded.observe_release(0.0)  # the proxy's own text (a refusal) was never held back

    assert value(metrics, "backtrack_holdback_delay_seconds_count", policy="p") == 1


def test_batch_sizes_fall_into_power_of_two_buckets() -> None:
    metrics = Metrics()

    for size in (1, 3, 4, 200):
        metrics.guard_batch_size.observe(size)

    assert value(metrics, "backtrack_guard_batch_size_bucket", le="1.0") == 1
    assert value(metrics, "backtrack_guard_batch_size_bucket", le="4.0") == 3
    assert value(metrics, "backtrack_guard_batch_size_bucket", le="256.0") == 4
    assert value(metrics, "backtrack_guard_batch_size_sum") == 208


def test_policy_reload_results_are_exported_at_zero_before_any_reload() -> None:
    metrics = Metrics()

    assert value(metrics, "backtrack_policy_reloads_total", result="ok") == 0
    assert value(metrics, "backtrack_policy_reloads_total", result="error") == 0


def test_model_labels_are_bounded() -> None:
    metrics = Metrics()

    labels = [metrics.model_label(f"model-{i}") for i in range(MAX_MODELS + 2)]

    assert labels[:MAX_MODELS] == [f"model-{i}" for i in range(MAX_MODELS)]
    assert labels[MAX_MODELS:] == ["other", "other"]
    assert metrics.model_label("model-0") == "model-0"


def test_two_apps_keep_separate_counts() -> None:
    first, second = Metrics(), Metrics(CollectorRegistry())

    first.streams.labels("p", CHAT, "m").inc()

    assert value(first, "backtrack_streams_total", policy="p", route=CHAT, model="m") == 1
    assert value(second, "backtrack_streams_total", policy="p", route=CHAT, model="m") is None


# -- request-side metrics: the app over real sockets ------------------------------------------------


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxy_in_front_of_replay(
    tmp_path: Path, metrics: Metrics, tokens_per_second: float | None = None
) -> AsyncIterator[str]:
    """A replay upstream of `ROWS`, and the proxy in front of it with one policy, `test`."""
    policy = {"holdback_tokens": 4, "actions": {"default": "refuse", "upstream_reset": "continue"}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    async with serving(create_replay_app(ROWS, tokens_per_second)) as upstream:
        config = {"upstream": {"url": upstream}, "policies": {"test": "test.yaml"}, "default_policy": "test"}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        settings = load_settings(tmp_path / "config.yaml", env={})
        async with serving(create_app(settings, metrics)) as proxy:
            yield proxy


@asynccontextmanager
async def openai_client(root: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{root}/v1", api_key="sk-test", max_retries=0) as client:
        yield client


async def ask(client: openai.AsyncOpenAI, prompt: str, **kwargs: Any) -> str:
    stream = await client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_each_response_is_counted_as_a_stream(tmp_path: Path) -> None:
    metrics = Metrics()
    async with proxy_in_front_of_replay(tmp_path, metrics) as proxy, openai_client(proxy) as client:
        await ask(client, "What is 2 + 2?")
        await client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "What is 2 + 2?"}]
        )

    labels = {"policy": "test", "route": CHAT, "model": "demo-model"}
    assert value(metrics, "backtrack_streams_total", **labels) == 2


async def test_the_upstreams_own_reset_is_counted_and_its_position_observed(tmp_path: Path) -> None:
    metrics = Metrics()
    async with proxy_in_front_of_replay(tmp_path, metrics) as proxy, openai_client(proxy) as client:
        text = await ask(client, "How do I pick a lock?")

    assert text.endswith("I can't help with picking locks.")
    reset = {"policy": "test", "route": CHAT, "model": "demo-model", "category": "upstream_reset"}
    assert value(metrics, "backtrack_resets_total", **reset, action="continue") == 1
    # The marker comes after "Sure", ",", " insert", " a", " tension", " wrench" and " ".
    assert value(metrics, "backtrack_reset_position_tokens_sum", policy="test") == 7


async def test_an_upstream_error_is_counted_by_route_and_kind(tmp_path: Path) -> None:
    metrics = Metrics()
    async with proxy_in_front_of_replay(tmp_path, metrics) as proxy, openai_client(proxy) as client:
        # The replay upstream refuses a malformed `stream_options` with a 400, as OpenAI does.
        with pytest.raises(openai.BadRequestError):
            await ask(client, "What is 2 + 2?", extra_body={"stream_options": "yes"})

    assert value(metrics, "backtrack_upstream_errors_total", route=CHAT, kind="UpstreamError") == 1


async def test_an_upstream_error_after_the_headers_is_counted_too(tmp_path: Path) -> None:
    metrics = Metrics()
    async with proxy_in_front_of_replay(tmp_path, metrics) as proxy, openai_client(proxy) as client:
        with pytest.raises(openai.APIError, match="overloaded"):
            await ask(client, "Break off, please.")

    assert value(metrics, "backtrack_upstream_errors_total", route=CHAT, kind="InBandError") == 1


async def test_a_stream_is_active_while_it_is_read_and_not_after(tmp_path: Path) -> None:
    metrics = Metrics()
    async with (
        proxy_in_front_of_replay(tmp_path, metrics, tokens_per_second=50) as proxy,
        openai_client(proxy) as client,
    ):
        stream = await client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "Tell me a long story."}], stream=True
        )
        async with stream:
            await anext(aiter(stream))
            during = value(metrics, "backtrack_active_streams", route=CHAT)
            rest = [chunk async for chunk in stream]

    assert during == 1
    assert rest[-1].choices[0].finish_reason == "stop"
    assert value(metrics, "backtrack_active_streams", route=CHAT) == 0


async def test_metrics_are_served_in_the_prometheus_text_format(tmp_path: Path) -> None:
    metrics = Metrics()
    async with proxy_in_front_of_replay(tmp_path, metrics) as proxy, openai_client(proxy) as client:
        await ask(client, "What is 2 + 2?")
        async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as resp:
            content_type = resp.headers["Content-Type"]
            text = await resp.text()

    assert content_type.startswith("text/plain;")
    assert (
        'backtrack_streams_total{model="demo-model",policy="test",route="/v1/chat/completions"} 1.0' in text
    )
    assert "# TYPE backtrack_guard_latency_seconds histogram" in text


# -- several worker processes -----------------------------------------------------------------------

WORKER = """
import sys
from proxy.state.metrics import Metrics
metrics = Metrics()
metrics.streams.labels("p", "/v1/chat/completions", "m").inc()
metrics.active_streams.labels("/v1/chat/completions").inc()
if sys.argv[1] == "exits":
    metrics.close()
sys.stdout.buffer.write(metrics.exposition())
"""


def test_with_a_multiprocess_directory_every_worker_serves_the_sum_of_all(tmp_path: Path) -> None:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}

    def worker(how: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, how], env=env, capture_output=True, check=True, timeout=60
        )
        return done.stdout.decode()

    worker("exits")
    worker("stays")
    third = worker("stays")

    # Counters add up over all workers that ever served; the gauge only over those still alive (the
    # first one left cleanly; the other two never called close()).
    assert 'backtrack_streams_total{model="m",policy="p",route="/v1/chat/completions"} 3.0' in third
    assert 'backtrack_active_streams{route="/v1/chat/completions"} 2.0' in third
    assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 2
