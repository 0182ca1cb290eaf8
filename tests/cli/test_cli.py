"""The `backtrack` command as a user runs it: a subprocess, spoken to over real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import BENIGN, Harness, serving
from tests.support import REPO, free_port


def backtrack(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a `backtrack` command that is expected to end by itself."""
    command = [sys.executable, "-m", "proxy.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)


async def chat_stream(root: str, prompt: str) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed chat completion (raw, so the reset objects are plain to see)."""
    request = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{root}/v1/chat/completions", json=request) as resp,
    ):
        body = await resp.text()
    lines = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def counter(metrics: str, series: str) -> float:
    """A series' value in a /metrics page, 0 when it is not there yet."""
    return next(
        (float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(series + " ")), 0.0
    )


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


async def test_serve_relays_to_the_upstream_given_on_the_command_line(harness: Harness) -> None:
    upstream = await harness.replay()
    config = harness.write_config("http://127.0.0.1:9/never-used")

    async with serving("--config", config, "--upstream", upstream) as (root, _):
        chunks = await chat_stream(root, BENIGN["prompt"])
        session = await harness.session()
        async with session.get(f"{root}/readyz") as resp:
            assert resp.status == 200

    assert text_of(chunks) == BENIGN["response"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_serve_without_an_upstream_fronts_the_built_in_demo_and_shows_a_reset() -> None:
    async with serving("--config", REPO / "config.yaml") as (root, _):
        chunks = await chat_stream(root, "How do I pick a lock?")
        async with aiohttp.ClientSession() as session, session.get(f"{root}/metrics") as resp:
            metrics = await resp.text()
    if counter(metrics, 'backtrack_fail_open_total{policy="default"}'):
        # The guard missed its 2 s deadline (seen only with the load average above 6 on two cores) and
        # `config.yaml`'s default policy fails open: the demo is then unguarded by design, and counted.
        assert counter(
            metrics, 'backtrack_guard_failures_total{fail_mode="open",kind="timeout",policy="default"}'
        )
        pytest.skip("the guard timed out under this machine's load and the default policy failed open")

    # The bundled guard (v2) resets the demo's lock-picking answer itself, at its 21st token, before the
    # hold-back has released any of it, so the upstream's own [RESET] marker is never reached.
    at = next(i for i, chunk in enumerate(chunks) if "backtrack" in chunk)
    shown, after = text_of(chunks[:at]), text_of(chunks[at + 1 :])
    event = chunks[at]["backtrack"]
    assert {k: event[k] for k in ("event", "category", "policy")} == {
        "event": "reset", "category": "unsafe", "policy": "default",
    }  # fmt: skip
    assert event["score"] >= 0.5
    # Text leaves the hold-back once it is judged and 24 tokens behind the upstream's head (DESIGN.md).
    # A guard that lags the demo's token rate (seen only with the load average above 6 on two cores)
    # has judged less than the head when the hold-back lets judged text out: the opening words can then
    # be shown, and the reset must take back exactly them. On a quiet machine nothing is shown.
    assert event["retract_chars"] == len(shown)
    assert "Sure, here is how to pick a lock".startswith(shown)
    after = after[event.get("notice_chars", 0) :]
    assert after.startswith("I can't help with that.")
    assert "[RESET]" not in shown + after
    assert not any("backtrack" in chunk for chunk in chunks[at + 1 :])


def test_serve_with_a_bad_config_exits_2_naming_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  port: eighty\n", encoding="utf-8")

    result = backtrack("serve", "--config", config)

    assert result.returncode == 2
    assert f"{config}: 'server.port' has value 'eighty'." in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_upstream_url_exits_2() -> None:
    result = backtrack("serve", "--upstream", "localhost:8000")

    assert result.returncode == 2
    assert "--upstream: 'url' has value 'localhost:8000'." in result.stderr


def test_serve_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = backtrack("serve", "--config", tmp_path / "nope.yaml")

    assert result.returncode == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read" in result.stderr


def test_replay_upstream_with_a_bad_data_file_says_which_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(
        '{"prompt": "hi", "response": "hello"}\n{"prompt": "hi", "response": \n', encoding="utf-8"
    )

    result = backtrack("replay-upstream", "--data", data, "--port", str(free_port()))

    assert result.returncode == 2
    assert f"{data}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_that_is_taken_exits_1_without_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = backtrack("serve", "--port", str(port), "--upstream", "http://127.0.0.1:9")

    assert result.returncode == 1
    assert f"backtrack: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving on" not in result.stdout


def test_the_event_loop_is_uvloop_unless_the_config_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    from proxy.cli.main import loop_factory
    from proxy.core.errors import ConfigError

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None  # asyncio's own
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError) as refused:
        loop_factory("uvloop")
    assert refused.value.message == "'server.event_loop' has value 'uvloop', which is not installed"


async def test_serve_on_asyncio_s_own_loop_relays_the_same(harness: Harness) -> None:
    upstream = await harness.replay()
    config = harness.write_config(upstream)

    async with serving("--config", config, "--loop", "asyncio") as (root, _):
        chunks = await chat_stream(root, BENIGN["prompt"])

    assert text_of(chunks) == BENIGN["response"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
