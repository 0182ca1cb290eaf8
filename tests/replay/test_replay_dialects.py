"""replay-upstream's Anthropic and Ollama routes, spoken to by the official anthropic and ollama clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anthropic
import ollama
import pytest
from aiohttp.test_utils import TestServer

from proxy.core.errors import ConfigError
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import Row, RowError, create_replay_app, load_rows

ANSWER = "2 + 2 is 4, the same as 2 times 2."
ROWS = [
    Row("What is 2 + 2?", ANSWER),
    Row("Break early.", "One two three four five.", RowError("the GPU fell over", 500, after_tokens=2)),
    Row("Break now.", "Never sent.", RowError("Overloaded", 529)),
]


@asynccontextmanager
async def serve() -> AsyncIterator[str]:
    server = TestServer(create_replay_app(ROWS), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def claude(root: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=root, api_key="k", max_retries=0) as c:
        yield c


@asynccontextmanager
async def llama(root: str) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=root)
    try:
        yield client
    finally:
        await client.close()


def ask(prompt: str, *prefill: str) -> list[anthropic.types.MessageParam]:
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": prompt}]
    return messages + [{"role": "assistant", "content": p} for p in prefill]


async def test_anthropic_streamed_and_whole_answers_are_the_rows_response() -> None:
    async with serve() as root, claude(root) as c:
        async with c.messages.stream(model="claude", max_tokens=100, messages=ask("What is 2 + 2?")) as s:
            deltas = [
                e.delta.text
                async for e in s
                if e.type == "content_block_delta" and e.delta.type == "text_delta"
            ]
            final = await s.get_final_message()
        whole = await c.messages.create(model="claude", max_tokens=100, messages=ask("What is 2 + 2?"))

    assert deltas == ApproxTokenizer().split(ANSWER)
    assert final.content[0].type == "text" and final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(deltas)
    assert whole.content[0].type == "text" and whole.content[0].text == ANSWER


async def test_anthropic_a_prefill_that_starts_the_response_is_continued() -> None:
    async with serve() as root, claude(root) as c:
        whole = await c.messages.create(
            model="claude", max_tokens=100, messages=ask("What is 2 + 2?", "2 + 2")
        )

    assert whole.content[0].type == "text" and whole.content[0].text == ANSWER.removeprefix("2 + 2")


async def test_anthropic_errors_before_and_after_the_headers_are_anthropics() -> None:
    async with serve() as root, claude(root) as c:
        with pytest.raises(anthropic.APIStatusError) as before:
            await c.messages.create(model="claude", max_tokens=100, messages=ask("Break now."))
        stream = await c.messages.create(
            model="claude", max_tokens=100, messages=ask("Break early."), stream=True
        )
        seen = []
        with pytest.raises(anthropic.APIStatusError) as after:
            async for event in stream:
                seen.append(event.type)

    assert before.value.status_code == 529
    assert before.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert seen == ["message_start", "content_block_start", "content_block_delta", "content_block_delta"]
    assert "the GPU fell over" in str(after.value)


async def test_ollama_chat_and_generate_stream_ndjson_ending_with_counters() -> None:
    async with serve() as root, llama(root) as c:
        parts = [p async for p in await c.chat(model="llama", messages=ask("What is 2 + 2?"), stream=True)]
        whole = await c.generate(model="llama", prompt="What is 2 + 2?")
        generated = [p async for p in await c.generate(model="llama", prompt="What is 2 + 2?", stream=True)]

    assert "".join(p.message.content or "" for p in parts) == ANSWER
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == len(parts) - 1
    assert whole.response == ANSWER and whole.done and whole.context
    assert "".join(p.response for p in generated) == ANSWER


async def test_ollama_streams_unless_told_not_to() -> None:
    body = {"model": "llama", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    async with (
        serve() as root,
        aiohttp.ClientSession() as session,
        session.post(f"{root}/api/chat", json=body) as r,
    ):
        content_type, lines = r.content_type, (await r.text()).splitlines()

    assert content_type == "application/x-ndjson"
    assert json.loads(lines[-1])["done"] is True and len(lines) > 2


async def test_ollama_errors_before_and_after_the_headers_are_ollamas() -> None:
    async with serve() as root, llama(root) as c:
        with pytest.raises(ollama.ResponseError) as before:
            await c.chat(model="llama", messages=ask("Break now."))
        seen = []
        with pytest.raises(ollama.ResponseError) as after:
            async for part in await c.chat(model="llama", messages=ask("Break early."), stream=True):
                seen.append(part.message.content)

    assert (before.value.status_code, before.value.error) == (529, "Overloaded")
    assert seen == ["One", " two"]
    assert after.value.error == "the GPU fell over"


async def test_openai_rows_fail_in_openais_format_too() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Break early."}], "stream": True}
    async with serve() as root, aiohttp.ClientSession() as session:
        async with session.post(f"{root}/v1/chat/completions", json=body) as r:
            lines = [x.removeprefix("data: ") for x in (await r.text()).splitlines() if x]
        async with session.post(
            f"{root}/v1/chat/completions", json={**body, "messages": ask("Break now.")}
        ) as r:
            before = (r.status, await r.json())

    assert json.loads(lines[-1]) == {
        "error": {"message": "the GPU fell over", "type": "server_error", "param": None, "code": None}
    }
    assert len(lines) == 4  # the role, two tokens, the error
    assert before == (
        529,
        {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": None}},
    )


def test_a_row_with_a_bad_error_is_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "error": {"message": "x", "status": 200}}\n')

    with pytest.raises(ConfigError) as caught:
        load_rows(path)

    assert caught.value.message.startswith(f"{path}:1: 'error' must be ")
