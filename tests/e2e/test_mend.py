"""End to end: `proxy.client.mend` over the official clients' streams, through the proxy, for every
action and every `retraction`; and what a client that does not mend is shown.

The mended text must be what the client should see: the safe continuation, none of the retracted text.
The ollama client drops the `backtrack` key of each line, so its mending reads the NDJSON lines (the
way the README shows, with httpx); the official client shows what a plain client gets.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.client import View, amend, mend
from proxy.core.policy import Policy
from tests.harness import POLICY, WORDY, WORDY_SAFE, Harness, policy

REFUSAL = POLICY["refusal_message"]
NOTICE = Policy(name="x").retraction_notice
WORDY_SHOWN = "Explosives are chemicals."  # what a hold-back of 4 has let out when the guard reaches "bomb"
SAFE = WORDY_SAFE["response"]
# What a mending client should end with, per action, when the policy continues after a reset.
CONTINUED = {
    "refuse": REFUSAL,
    "regenerate": SAFE,
    "inject": SAFE,
    "truncate": WORDY_SHOWN,
    "flag": WORDY["response"],
}
ACTIONS = list(CONTINUED)
MODES = ["event", "notice", "cut"]
STOP = {"openai": "stop", "anthropic": "end_turn", "ollama": "stop"}
CONTENT_FILTER = {"openai": "content_filter", "anthropic": "refusal", "ollama": "content_filter"}


def guarded(action: str, mode: str) -> dict[str, Any]:
    return policy(actions={"default": action}, retraction=mode)


def expected(sdk: str, action: str, mode: str) -> tuple[str, str, str]:
    """(mended text, finish reason, what a client that ignores the reset shows)."""
    retracts = action not in ("truncate", "flag")
    if mode == "cut" and retracts:
        return "", CONTENT_FILTER[sdk], WORDY_SHOWN
    finish = CONTENT_FILTER[sdk] if action == "truncate" else STOP[sdk]
    if not retracts:
        return CONTINUED[action], finish, CONTINUED[action]
    notice = NOTICE if mode == "notice" else ""
    return CONTINUED[action], finish, WORDY_SHOWN + notice + CONTINUED[action]


def check(views: list[View], sdk: str, action: str, mode: str) -> None:
    text, finish, _ = expected(sdk, action, mode)
    assert views[-1].text == text
    if action != "flag":  # a flag lets the text through
        assert "bomb" not in "".join(v.text for v in views)
    assert next(v.finish_reason for v in views if v.finish_reason) == finish
    events = [v.event for v in views if v.event is not None]
    if action == "flag":
        assert events == []
        return
    (event,) = events
    assert event["retract_chars"] == (0 if action == "truncate" else len(WORDY_SHOWN))
    notice = mode == "notice" and action != "truncate"
    assert event.get("notice_chars") == (len(NOTICE) if notice else None)


def ask() -> list[dict[str, str]]:
    return [{"role": "user", "content": WORDY["prompt"]}]


# -- openai ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("action", ACTIONS)
async def test_openai_chat_is_mended(harness: Harness, action: str, mode: str) -> None:
    client, _, _ = await harness.proxy_client(harness.client, guarded(action, mode))

    stream = await client.chat.completions.create(model="m", messages=ask(), stream=True)  # type: ignore[arg-type]
    views = [view async for view in amend(stream)]

    check(views, "openai", action, mode)
    # The same chunks as a client that ignores the reset object shows them.
    shown = "".join(c.choices[0].delta.content or "" for c in (v.chunk for v in views) if c.choices)
    assert shown == expected("openai", action, mode)[2]


@pytest.mark.parametrize("mode", MODES)
async def test_openai_completions_and_the_sync_client_are_mended(harness: Harness, mode: str) -> None:
    # One row: both asks get the unsafe answer.
    _, proxy, _ = await harness.proxy_client(harness.client, guarded("refuse", mode), [WORDY])

    def run() -> tuple[list[View], list[View]]:
        with openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0, timeout=30) as client:
            chat = client.chat.completions.create(model="m", messages=ask(), stream=True)  # type: ignore[arg-type]
            completion = client.completions.create(model="m", prompt=WORDY["prompt"], stream=True)
            return list(mend(chat)), list(mend(completion))

    for views in await asyncio.to_thread(run):
        check(views, "openai", "refuse", mode)


# -- anthropic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("action", ACTIONS)
async def test_anthropic_is_mended(harness: Harness, action: str, mode: str) -> None:
    client, _, _ = await harness.proxy_client(harness.anthropic_client, guarded(action, mode))

    stream = await client.messages.create(model="claude", max_tokens=200, messages=ask(), stream=True)  # type: ignore[arg-type]
    views = [view async for view in amend(stream)]

    check(views, "anthropic", action, mode)
    events = [v.chunk for v in views]
    shown = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert shown == expected("anthropic", action, mode)[2]


async def test_the_sync_anthropic_client_is_mended(harness: Harness) -> None:
    _, proxy, _ = await harness.proxy_client(harness.anthropic_client, guarded("refuse", "notice"))

    def run() -> list[View]:
        with anthropic.Anthropic(base_url=proxy, api_key="sk-ant", max_retries=0, timeout=30) as client:
            stream = client.messages.create(model="claude", max_tokens=200, messages=ask(), stream=True)  # type: ignore[arg-type]
            return list(mend(stream))

    check(await asyncio.to_thread(run), "anthropic", "refuse", "notice")


# -- ollama ------------------------------------------------------------------------------------------


async def ollama_lines(proxy: str, path: str = "/api/chat") -> list[dict[str, Any]]:
    body: dict[str, Any] = (
        {"model": "m", "messages": ask()}
        if path == "/api/chat"
        else {"model": "m", "prompt": WORDY["prompt"]}
    )
    async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", proxy + path, json=body) as resp:
        return [json.loads(line) async for line in resp.aiter_lines() if line]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("action", ACTIONS)
async def test_ollama_chat_is_mended(harness: Harness, action: str, mode: str) -> None:
    _, proxy, _ = await harness.proxy_client(harness.ollama_client, guarded(action, mode))
    client, _, _ = await harness.proxy_client(harness.ollama_client, guarded(action, mode))

    views = list(mend(await ollama_lines(proxy)))
    parts = await client.chat(model="m", messages=ask(), stream=True)  # type: ignore[arg-type]
    shown = "".join([part.message.content or "" async for part in parts])

    check(views, "ollama", action, mode)
    assert shown == expected("ollama", action, mode)[2]  # the official client, which cannot mend


@pytest.mark.parametrize("mode", MODES)
async def test_ollama_generate_is_mended_sync_too(harness: Harness, mode: str) -> None:
    _, proxy, _ = await harness.proxy_client(harness.ollama_client, guarded("refuse", mode))

    def run() -> list[View]:
        body = {"model": "m", "prompt": WORDY["prompt"]}
        with httpx.stream("POST", f"{proxy}/api/generate", json=body, timeout=30) as resp:
            return list(mend(json.loads(line) for line in resp.iter_lines() if line))

    check(await asyncio.to_thread(run), "ollama", "refuse", mode)


# -- non-streamed answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_non_streamed_answer_never_carries_the_notice(harness: Harness, mode: str) -> None:
    client, _, _ = await harness.proxy_client(harness.client, guarded("refuse", mode))

    completion = await client.chat.completions.create(model="m", messages=ask())  # type: ignore[arg-type]

    backtrack = (completion.model_extra or {})["backtrack"]
    assert backtrack["retract_chars"] == 0 and "notice_chars" not in backtrack
    # The answer is what a mending client of the same stream ends with.
    text, finish, _ = expected("openai", "refuse", mode)
    assert (completion.choices[0].message.content or "", completion.choices[0].finish_reason) == (
        text,
        finish,
    )
