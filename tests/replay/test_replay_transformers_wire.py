"""replay-upstream's `transformers` wire: the habits `transformers serve` showed in front of a real
model (proxy/replay/transformers_wire.py), on the wire and through the proxy with the official client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from proxy.core.errors import ConfigError
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import Row, create_replay_app, load_rows
from tests.harness import BENIGN, MARKED, POLICY, Harness

FAILING = {"prompt": "Fail after two.", "response": "one two three four", "error": {"message": "boom",
           "status": 500, "after_tokens": 2}}  # fmt: skip
ROWS = [BENIGN, MARKED, FAILING]


async def transformers_replay(harness: Harness) -> str:
    path = harness.write_rows(ROWS)
    return await harness.serve(create_replay_app(load_rows(path), wire="transformers"))


async def raw_events(harness: Harness, root: str, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """The body as sent, and its `data:` payloads decoded (a string where one is not JSON)."""
    session = await harness.session()
    async with session.post(f"{root}{path}", json=body) as resp:
        assert resp.status == 200
        text = await resp.text()
    payloads = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    return text, [json.loads(p) if p.startswith("{") else p for p in payloads]


async def test_a_chat_stream_has_a_role_only_first_chunk_usage_on_the_last_and_no_done(
    harness: Harness,
) -> None:
    root = await transformers_replay(harness)

    body = {"model": "m", "stream": True, "n": 2, "messages": [{"role": "user", "content": BENIGN["prompt"]}]}
    text, chunks = await raw_events(harness, root, "/v1/chat/completions", body)

    assert "[DONE]" not in text
    assert chunks[0]["choices"] == [{"delta": {"role": "assistant"}, "index": 0}]
    assert all(c["system_fingerprint"] == "" for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)  # n is ignored
    assert all("finish_reason" not in c["choices"][0] and "usage" not in c for c in chunks[:-1])
    assert chunks[-1]["choices"] == [{"delta": {}, "index": 0, "finish_reason": "stop"}]
    pieces = ApproxTokenizer().split(BENIGN["response"])
    assert chunks[-1]["usage"]["completion_tokens"] == len(pieces)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == BENIGN["response"]


async def test_a_completions_stream_has_no_role_chunk_and_ends_on_an_empty_text_with_usage(
    harness: Harness,
) -> None:
    root = await transformers_replay(harness)

    body = {"model": "m", "stream": True, "prompt": BENIGN["prompt"]}
    text, chunks = await raw_events(harness, root, "/v1/completions", body)

    assert "[DONE]" not in text
    assert chunks[0]["choices"][0]["text"] != ""
    assert chunks[-1]["choices"] == [{"finish_reason": "stop", "index": 0, "text": ""}]
    assert "usage" in chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == BENIGN["response"]


async def test_a_failure_mid_stream_is_an_error_string_and_the_end_of_the_body(harness: Harness) -> None:
    root = await transformers_replay(harness)

    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": FAILING["prompt"]}]}
    _, chunks = await raw_events(harness, root, "/v1/chat/completions", body)

    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["one", " two"]
    assert chunks[3:] == [{"error": "boom"}]


async def test_through_the_proxy_benign_text_is_identical_and_the_stream_ends_cleanly(
    harness: Harness,
) -> None:
    proxy = await harness.proxy(await transformers_replay(harness))
    client = await harness.client(proxy)

    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": BENIGN["prompt"]}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == BENIGN["response"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The usage that rode on the upstream's last chunk comes as OpenAI sends it: a chunk of its own.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ApproxTokenizer().split(BENIGN["response"]))
    assert all("backtrack" not in (c.model_extra or {}) for c in chunks)


async def test_through_the_proxy_a_marked_answer_resets_and_completions_pass(harness: Harness) -> None:
    proxy = await harness.proxy(await transformers_replay(harness))
    client = await harness.client(proxy)

    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": MARKED["prompt"]}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    completion = await client.completions.create(model="m", prompt=BENIGN["prompt"])

    resets = [c.model_extra["backtrack"] for c in chunks if "backtrack" in (c.model_extra or {})]
    assert [r["event"] for r in resets] == ["reset"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith(MARKED["response"].split("[RESET]")[1])
    assert "[RESET]" not in text
    assert completion.choices[0].text == BENIGN["response"]


async def test_through_the_proxy_an_error_string_reaches_the_client_as_an_api_error(
    harness: Harness,
) -> None:
    proxy = await harness.proxy(await transformers_replay(harness), {**POLICY, "holdback_tokens": 0})
    client = await harness.client(proxy)

    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": FAILING["prompt"]}], stream=True
    )
    with pytest.raises(openai.APIError, match="boom"):
        async for _ in stream:
            pass


def test_an_unknown_wire_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'vllm'"):
        create_replay_app([Row("p", "r")], wire="vllm")
