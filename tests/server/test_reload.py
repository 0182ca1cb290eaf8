"""Hot reload through real sockets: streams in flight keep their policy, new requests get the new one,
a broken edit changes nothing but a counter and a log line, and the admin endpoint wants its token."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.config import load_settings
from proxy.server.app import create_app
from proxy.server.keys import POLICIES
from tests.harness import POLICY, Harness, metric, policy, put, serving, write_policies
from tests.support import eventually

TOKEN = "admin-t0ken"
ENV = {"BACKTRACK_ADMIN_TOKEN": TOKEN}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

# Long enough at 10 tokens/s that a reload lands while they stream: "bomb" comes after ~40 tokens.
COUNTING = " ".join(["one", "two", "three", "four", "five", "six", "seven", "eight"] * 5)
SLOW_SAFE = {"prompt": "Count for me.", "response": f"Sure: {COUNTING}. Done."}
SLOW_UNSAFE = {
    "prompt": "Count, then tell me about explosives.",
    "response": f"{COUNTING}. Now a bomb is made by",
}
ROWS = [SLOW_SAFE, SLOW_UNSAFE]


def write_config(harness: Harness, upstream: str, **config: Any) -> Path:
    path = harness.tmp_path / "config.yaml"
    put(path, {"upstream": {"url": upstream}, **config})
    return path


async def proxy_for(harness: Harness, config: Path, env: dict[str, str] | None = None) -> str:
    return await harness.serve(create_app(load_settings(config, env=ENV if env is None else env)))


def chat(prompt: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}


async def read_stream(resp: aiohttp.ClientResponse) -> str:
    """The rest of a chat completion stream's text (content deltas joined), to its [DONE]."""
    text = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return "".join(text)
        if line.startswith("data: "):
            chunk = json.loads(line.removeprefix("data: "))
            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    raise AssertionError("the stream ended without [DONE]")


async def first_text(resp: aiohttp.ClientResponse) -> str:
    """Read up to the first content delta; returns it."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            chunk = json.loads(line.removeprefix("data: "))
            content = "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            if content:
                return content
    raise AssertionError("the stream ended before any text")


async def answer(session: aiohttp.ClientSession, root: str, prompt: str, **headers: str) -> tuple[str, str]:
    """A whole streamed answer: (X-Backtrack-Policy, text)."""
    async with session.post(f"{root}/v1/chat/completions", json=chat(prompt), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Backtrack-Policy"], await read_stream(resp)


async def refusal(session: aiohttp.ClientSession, root: str, **headers: str) -> tuple[str, str]:
    """Ask SLOW_UNSAFE: (X-Backtrack-Policy, the refusal that replaced its unsafe end)."""
    policy, text = await answer(session, root, SLOW_UNSAFE["prompt"], **headers)
    assert "bomb" not in text
    # How much of the safe start is released depends on how the upstream's pieces fell; the refusal
    # follows it, whatever it is.
    response = SLOW_UNSAFE["response"]
    released = next((i for i, (a, b) in enumerate(zip(text, response, strict=False)) if a != b), len(text))
    assert released >= len(COUNTING)
    return policy, text[released:]


RELOAD_OK = 'backtrack_policy_reloads_total{result="ok"}'
RELOAD_ERROR = 'backtrack_policy_reloads_total{result="error"}'
ACTIVE = 'backtrack_active_streams{route="/v1/chat/completions"}'


async def test_a_reload_mid_stream_leaves_streams_in_flight_on_their_policy_and_new_ones_on_the_new(
    harness: Harness,
) -> None:
    upstream = await harness.replay(ROWS, tokens_per_second=10)
    files = write_policies(
        harness.tmp_path,
        test=policy(refusal_message="OLD refusal."),
        other=policy(refusal_message="OTHER refusal."),
    )
    config = write_config(
        harness, upstream, policies=files, default_policy="test", anonymous_allowed_policies=["test"]
    )
    root = await proxy_for(harness, config)
    session = await harness.session()

    prompts = [SLOW_UNSAFE["prompt"]] * 3 + [SLOW_SAFE["prompt"]] * 3
    responses = [
        await harness.stack.enter_async_context(session.post(f"{root}/v1/chat/completions", json=chat(p)))
        for p in prompts
    ]
    starts = await asyncio.gather(*(first_text(r) for r in responses))
    assert all(r.headers["X-Backtrack-Policy"] == "test" for r in responses)

    # The edit: `test` refuses differently, and the default is now `other`.
    write_policies(harness.tmp_path, test=policy(refusal_message="NEW refusal."))
    write_config(
        harness, upstream, policies=files, default_policy="other", anonymous_allowed_policies=["test"]
    )
    async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
        assert (resp.status, await resp.json()) == (
            200,
            {"result": "ok", "generation": 2, "policies": ["other", "test"]},
        )
    assert await metric(session, root, ACTIVE) == len(prompts)  # all six were still streaming

    rests = await asyncio.gather(*(read_stream(r) for r in responses))
    texts = [start + rest for start, rest in zip(starts, rests, strict=True)]
    for text in texts[:3]:  # each finished on the policy it started with: no drop, no switch
        assert text.endswith("OLD refusal.")
        assert "bomb" not in text
    for text in texts[3:]:
        assert text == SLOW_SAFE["response"]

    assert await refusal(session, root) == ("other", "OTHER refusal.")
    header = {"X-Backtrack-Policy": "test"}
    assert await refusal(session, root, **header) == ("test", "NEW refusal.")
    assert await metric(session, root, RELOAD_OK) == 1


async def test_a_broken_edit_is_refused_logged_and_counted_and_the_old_policy_keeps_serving(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await harness.replay(ROWS)
    files = write_policies(harness.tmp_path, test=policy(refusal_message="OLD refusal."))
    config = write_config(harness, upstream, policies=files, default_policy="test")
    root = await proxy_for(harness, config)
    session = await harness.session()
    policy_file = harness.tmp_path / "policies" / "test.yaml"

    write_policies(harness.tmp_path, test=policy(refusal_message="NEW refusal.", threshold=2))
    with caplog.at_level(logging.ERROR, logger="backtrack"):
        async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
            status, body = resp.status, await resp.json()

    expected = f"{policy_file}: 'threshold' has value 2. Input should be less than 1"
    assert status == 422
    assert body["error"]["message"].startswith(expected)
    assert "policy reload (POST /admin/reload) refused; generation 1 keeps serving" in caplog.text
    assert expected in caplog.text
    assert await metric(session, root, RELOAD_ERROR) == 1
    assert await metric(session, root, RELOAD_OK) == 0
    assert await refusal(session, root) == ("test", "OLD refusal.")

    write_policies(harness.tmp_path, test=policy(refusal_message="NEW refusal."))
    async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
        assert (await resp.json())["generation"] == 2
    assert await refusal(session, root) == ("test", "NEW refusal.")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("config.yaml", "'default_policy' has value 'gone'. Not one of the policies: test"),
        ("policies/test.yaml", "not valid YAML"),
        ("model", "policy test enables the guard model, which was not loaded at start"),
    ],
)
async def test_a_reload_is_refused_for_each_kind_of_broken_edit(
    harness: Harness, edit: str, expected: str
) -> None:
    upstream = await harness.replay(ROWS)
    files = write_policies(harness.tmp_path, test=POLICY)
    config = write_config(harness, upstream, policies=files, default_policy="test")
    root = await proxy_for(harness, config)
    session = await harness.session()

    if edit == "config.yaml":
        write_config(harness, upstream, policies=files, default_policy="gone")
    elif edit == "model":
        write_policies(harness.tmp_path, test=policy(detectors={"model": {"enabled": True}}))
    else:
        put(harness.tmp_path / edit, "actions: {default: refuse\n")
    async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 422
        assert expected in (await resp.json())["error"]["message"]
    assert (await answer(session, root, SLOW_SAFE["prompt"]))[0] == "test"


async def test_an_edited_file_is_picked_up_by_polling_and_a_broken_one_reported_once(
    harness: Harness,
) -> None:
    upstream = await harness.replay(ROWS)
    files = write_policies(harness.tmp_path, test=policy(refusal_message="OLD refusal."))
    polled = {"poll_seconds": 0.02}
    config = write_config(harness, upstream, policies=files, default_policy="test", reload=polled)
    app = create_app(load_settings(config, env={}))
    root = await harness.serve(app)
    session = await harness.session()

    def reloads(result: str, n: int) -> Callable[[], Awaitable[bool]]:
        async def counted() -> bool:
            return await metric(session, root, f'backtrack_policy_reloads_total{{result="{result}"}}') == n

        return counted

    write_policies(harness.tmp_path, test=policy(refusal_message="NEW refusal."))
    await eventually(reloads("ok", 1), "the reload")
    assert await refusal(session, root) == ("test", "NEW refusal.")

    write_policies(harness.tmp_path, test={"holdback_tokens": "many"})
    await eventually(reloads("error", 1), "the refusal")
    for _ in range(5):  # more polls see the same broken file: it is not reported again
        await asyncio.sleep(0.02)
    assert await reloads("error", 1)()
    assert app[POLICIES].live.generation == 2

    # The config now names a policy file that is not there yet; creating it is the edit that counts.
    write_config(
        harness, upstream, policies={"test": "policies/calm.yaml"}, default_policy="test", reload=polled
    )
    await eventually(reloads("error", 2), "the refusal of a missing file")
    write_policies(harness.tmp_path, calm=policy(refusal_message="CALM refusal."))
    await eventually(reloads("ok", 2), "the reload once the file exists")
    assert await refusal(session, root) == ("test", "CALM refusal.")


async def test_the_admin_endpoint_wants_the_token_from_its_environment_variable(harness: Harness) -> None:
    upstream = await harness.replay(ROWS)
    config = write_config(
        harness, upstream, policies=write_policies(harness.tmp_path, test=POLICY), default_policy="test"
    )
    with_token = await proxy_for(harness, config)
    without_token = await proxy_for(harness, config, env={})
    session = await harness.session()

    async def reload(root: str, headers: dict[str, str]) -> tuple[int, str]:
        async with session.post(f"{root}/admin/reload", headers=headers) as resp:
            body = await resp.json()
            return resp.status, body.get("error", {}).get("message", body.get("result"))

    assert await reload(with_token, {}) == (401, "The admin endpoints need 'Authorization: Bearer TOKEN'.")
    assert (await reload(with_token, {"Authorization": f"Basic {TOKEN}"}))[0] == 401
    assert await reload(with_token, {"Authorization": "Bearer admin-t0kem"}) == (
        403,
        "The admin token is wrong.",
    )
    assert (await reload(with_token, {"Authorization": f"Bearer {TOKEN}x"}))[0] == 403
    assert await reload(with_token, ADMIN) == (200, "ok")
    assert await reload(without_token, ADMIN) == (
        403,
        "The admin endpoints are off: set BACKTRACK_ADMIN_TOKEN to turn them on.",
    )
    async with session.get(f"{with_token}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 405  # a reload changes state: POST only


# -- SIGHUP, to `backtrack serve` --------------------------------------------------------------------


async def log_line(proc: asyncio.subprocess.Process, pattern: str) -> str:
    """The next line of the process's output that matches `pattern` (within 200 lines and 10 s each)."""
    assert proc.stdout is not None
    for _ in range(200):
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        assert line, "the process closed its output"
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}")


async def test_sighup_with_a_broken_policy_keeps_serving_and_logs_why(harness: Harness) -> None:
    upstream = await harness.replay(ROWS)
    files = write_policies(harness.tmp_path, test=policy(refusal_message="OLD refusal."))
    config = write_config(
        harness, upstream, policies=files, default_policy="test", reload={"poll_seconds": 0}
    )
    session = await harness.session()

    async with serving("--config", config) as (root, proc):
        write_policies(harness.tmp_path, test={**POLICY, "fail_mode": "sideways"})
        proc.send_signal(1)  # SIGHUP
        line = await log_line(proc, r"policy reload \(SIGHUP\) refused")
        assert "generation 1 keeps serving" in line
        detail = await log_line(proc, "fail_mode")
        assert "'fail_mode' has value 'sideways'. Input should be 'open' or 'closed'" in detail
        assert proc.returncode is None
        assert await refusal(session, root) == ("test", "OLD refusal.")
        assert await metric(session, root, RELOAD_ERROR) == 1

        write_policies(harness.tmp_path, test=policy(refusal_message="NEW refusal."))
        proc.send_signal(1)
        await log_line(proc, r"policies reloaded \(SIGHUP\): generation 2")
        assert await refusal(session, root) == ("test", "NEW refusal.")
