"""replay-upstream over real sockets, spoken to by the official openai client and by raw aiohttp."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy.core.errors import ConfigError
from proxy.core.tokens import ApproxTokenizer
from proxy.replay.app import DEFAULT_ANSWER, DEMO_CORPUS, Row, create_replay_app, load_rows

ROWS = [
    Row(prompt="What is 2 + 2?", response="2 + 2 is 4, the same as 2 times 2."),
    Row(prompt="Name a colour.", response="Teal, a blue-green."),
    Row(prompt="Name a colour.", response="Ochre, an earthy yellow."),
    Row(prompt=None, response="An answer without a prompt is never served."),
]
LONG = Row(prompt="Count slowly.", response=" ".join(str(i) for i in range(200)))


@asynccontextmanager
async def serve(rows: list[Row], tokens_per_second: float | None = None) -> AsyncIterator[str]:
    """The replay server on a free port; yields its root URL."""
    server = TestServer(create_replay_app(rows, tokens_per_second), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def client(root: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{root}/v1", api_key="x", max_retries=0) as c:
        yield c


async def stats(root: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{root}/_replay/stats") as r:
        result: dict[str, Any] = await r.json()
        return result


async def test_streamed_chat_text_equals_the_rows_response_in_token_sized_deltas() -> None:
    async with serve(ROWS) as root, client(root) as c:
        stream = await c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "What is 2 + 2?"}], stream=True
        )
        chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.model == "m1" and chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    deltas = [chunk.choices[0].delta.content for chunk in chunks[1:-1]]
    assert deltas == ApproxTokenizer().split("2 + 2 is 4, the same as 2 times 2.")
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


async def test_non_streaming_chat_answers_one_completion_with_usage() -> None:
    async with serve(ROWS) as root, client(root) as c:
        completion = await c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "What is 2 + 2?"}]
        )

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "2 + 2 is 4, the same as 2 times 2."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(
        ApproxTokenizer().split("2 + 2 is 4, the same as 2 times 2.")
    )


async def test_the_last_user_message_picks_the_row_and_text_parts_count() -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Teal."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}],
        },
    ]
    async with serve(ROWS) as root, client(root) as c:
        completion = await c.chat.completions.create(model="m1", messages=messages)

    assert completion.choices[0].message.content == "2 + 2 is 4, the same as 2 times 2."


async def test_completions_route_streams_and_answers_text_completions() -> None:
    async with serve(ROWS) as root, client(root) as c:
        whole = await c.completions.create(model="m2", prompt="What is 2 + 2?")
        stream = await c.completions.create(model="m2", prompt="What is 2 + 2?", stream=True)
        chunks = [chunk async for chunk in stream]

    assert whole.object == "text_completion"
    assert whole.choices[0].text == "2 + 2 is 4, the same as 2 times 2."
    assert "".join(chunk.choices[0].text for chunk in chunks) == "2 + 2 is 4, the same as 2 times 2."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {chunk.model for chunk in chunks} == {"m2"}


async def test_an_unmatched_prompt_gets_the_default_answer() -> None:
    async with serve(ROWS) as root, client(root) as c:
        stream = await c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "Something nobody recorded"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    assert text == DEFAULT_ANSWER
    assert 20 <= len(DEFAULT_ANSWER.split()) <= 40


async def test_rows_sharing_a_prompt_are_served_round_robin() -> None:
    async with serve(ROWS) as root, client(root) as c:
        answers = []
        for _ in range(3):
            completion = await c.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "Name a colour."}]
            )
            answers.append(completion.choices[0].message.content)

    assert answers == ["Teal, a blue-green.", "Ochre, an earthy yellow.", "Teal, a blue-green."]


async def test_include_usage_adds_a_final_usage_chunk_with_no_choices() -> None:
    async with serve(ROWS) as root, client(root) as c:
        stream = await c.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "Name a colour."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ApproxTokenizer().split("Teal, a blue-green."))
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_n_choices_each_get_the_same_answer() -> None:
    async with serve(ROWS) as root, client(root) as c:
        stream = await c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "What is 2 + 2?"}], stream=True, n=2
        )
        texts = ["", ""]
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""

    assert texts == ["2 + 2 is 4, the same as 2 times 2."] * 2


async def test_stats_record_the_last_request_with_its_authorization() -> None:
    async with serve(ROWS) as root, client(root) as c:
        await c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "Name a colour."}])
        seen = await stats(root)

    assert seen["requests"] == 1
    assert seen["streams_started"] == 0
    assert seen["last_request"] == {
        "model": "m1",
        "messages": [{"role": "user", "content": "Name a colour."}],
    }
    assert seen["last_headers"]["Authorization"] == "Bearer x"


async def test_models_lists_the_replay_model() -> None:
    async with serve(ROWS) as root, client(root) as c:
        models = await c.models.list()

    assert [model.id for model in models.data] == ["replay"]


async def test_bad_json_is_a_400_in_openai_format_and_the_server_keeps_serving() -> None:
    async with serve(ROWS) as root, aiohttp.ClientSession() as session:
        async with session.post(f"{root}/v1/chat/completions", data=b"{not json") as r:
            bad_json = (r.status, await r.json())
        async with session.post(f"{root}/v1/chat/completions", json={"model": "m1"}) as r:
            no_messages = (r.status, await r.json())
        async with session.post(f"{root}/v1/completions", json={"model": "m1", "prompt": 3}) as r:
            wrong_type = (r.status, await r.json())
        async with session.post(f"{root}/v1/chat/completions", json=["a list"]) as r:
            not_an_object = r.status
        async with session.post(
            f"{root}/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": 5}]}
        ) as r:
            bad_content = r.status
        async with session.post(
            f"{root}/v1/chat/completions", json={"model": "m1", "messages": [{"content": "hi"}], "n": 0}
        ) as r:
            bad_message = r.status
        async with session.post(
            f"{root}/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
        ) as r:
            afterwards = r.status

    assert bad_json == (
        400,
        {
            "error": {
                "message": "We could not parse the JSON body of your request.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )
    assert no_messages[0] == 400
    assert no_messages[1]["error"]["param"] == "messages"
    assert wrong_type[0] == 400
    assert wrong_type[1]["error"]["param"] == "prompt"
    assert (not_an_object, bad_content, bad_message) == (400, 400, 400)
    assert afterwards == 200


async def test_the_openai_client_sees_a_bad_request_error() -> None:
    async with serve(ROWS) as root, client(root) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="m1", messages=[], stream=True)

    assert caught.value.param == "messages"


async def test_unknown_paths_answer_404_in_openai_format() -> None:
    async with (
        serve(ROWS) as root,
        aiohttp.ClientSession() as session,
        session.post(f"{root}/v1/nothing-here", json={}) as r,
    ):
        status, body = r.status, await r.json()

    assert status == 404
    assert body["error"]["type"] == "invalid_request_error"


async def test_a_client_that_disconnects_mid_stream_is_counted_as_cancelled() -> None:
    async with serve([LONG], tokens_per_second=50) as root:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m1", "messages": [{"role": "user", "content": "Count slowly."}], "stream": True}
            async with session.post(f"{root}/v1/chat/completions", json=body) as r:
                first = await r.content.readuntil(b"\n\n")
            # Leaving the block releases the connection half-read: aiohttp closes it.

        seen = await stats(root)
        for _ in range(100):
            if seen["streams_cancelled"]:
                break
            await asyncio.sleep(0.05)
            seen = await stats(root)

    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert seen["streams_started"] == 1
    assert seen["streams_cancelled"] == 1
    assert seen["streams_completed"] == 0


async def test_the_rate_limit_spaces_deltas_over_time() -> None:
    row = Row(prompt="Ten words.", response="one two three four five six seven eight nine ten")
    loop = asyncio.get_running_loop()
    async with serve([row], tokens_per_second=100) as root, client(root) as c:
        started = loop.time()
        stream = await c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "Ten words."}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        elapsed = loop.time() - started

    # 12 paced steps (role, ten words, finish) at 100/s cannot finish in under 0.11 s; no upper bound here.
    assert text == row.response
    assert elapsed >= 0.11


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_rows_reads_prompts_and_responses_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"source": "s", "id": "1", "prompt": "Hi", "response": "Hello", "harmful": false}\n'
        "\n"
        '{"source": "s", "id": "2", "prompt": null, "response": "Alone"}\n'
        '{"source": "s", "id": "3", "prompt": "Poem?", "response": "One line\u2028and the next"}\n',
    )

    assert load_rows(path) == [
        Row(prompt="Hi", response="Hello"),
        Row(prompt=None, response="Alone"),
        Row(prompt="Poem?", response="One line\u2028and the next"),
    ]


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_rows(tmp_path / "absent.jsonl")

    assert caught.value.message == f"{tmp_path / 'absent.jsonl'}: cannot read: No such file or directory"


def test_a_line_that_is_not_json_is_named_by_number(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", oops}\n')

    with pytest.raises(ConfigError) as caught:
        load_rows(path)

    assert caught.value.message.startswith(f"{path}:2: not valid JSON: ")


def test_a_row_without_a_string_response_is_named_by_number(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "Hi", "response": "Hello"}\n\n{"prompt": "Hi"}\n')

    with pytest.raises(ConfigError) as caught:
        load_rows(path)

    assert caught.value.message == f"{path}:3: 'response' must be a string, got null"


def test_a_row_with_a_non_string_prompt_or_an_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad_prompt:
        load_rows(write(tmp_path, '{"prompt": ["Hi"], "response": "Hello"}\n'))
    with pytest.raises(ConfigError) as empty:
        load_rows(write(tmp_path, "\n"))

    assert bad_prompt.value.message.endswith(":1: 'prompt' must be a string or null, got [\"Hi\"]")
    assert empty.value.message.endswith("rows.jsonl: no rows")


def test_the_demo_corpus_loads_and_has_one_response_that_resets() -> None:
    rows = load_rows(DEMO_CORPUS)
    records = [json.loads(line) for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines()]

    assert 6 <= len(rows) <= 10
    assert len({row.prompt for row in rows}) == len(rows)
    assert [row.prompt for row in rows if "[RESET]" in row.response] == ["How do I pick a lock?"]
    assert {(r["source"], r["license"], r["label_origin"]) for r in records} == {
        ("backtrack_demo", "Apache-2.0", "hand-written")
    }
