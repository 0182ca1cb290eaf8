"""The proxy under failure: clients that leave, upstreams that fail, requests that are wrong.

After every failure the same proxy must still answer a normal request.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.dialects.openai import OpenAIEncoder
from proxy.server.app import create_app
from tests.harness import BENIGN, MARKED, POLICY, Harness, policy, replay_stats
from tests.support import eventually

LONG = {"prompt": "Count slowly.", "response": " ".join(str(i) for i in range(300))}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_request(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], **fields}


def data_lines(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]


async def still_serves(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": BENIGN["prompt"]}]
    )
    assert completion.choices[0].message.content == BENIGN["response"]


# -- a client that leaves ----------------------------------------------------------------------------


async def read_two_chunks_then_leave(proxy: str, prompt: str, *, wait_for_data: bool) -> None:
    """Start a stream, read two chunks (or, without `wait_for_data`, just the headers), hang up."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy}{CHAT}", json=chat_request(prompt, stream=True)) as resp,
    ):
        assert resp.status == 200
        seen = 0
        while wait_for_data and seen < 2:
            line = await resp.content.readline()
            seen += line.startswith(b"data: ")
    # Leaving the block closes the connection without reading the rest.


@pytest.mark.parametrize("holdback", [2, 200], ids=["text-flowing", "all-held-back"])
async def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(
    harness: Harness, holdback: int
) -> None:
    upstream = await harness.replay([LONG, BENIGN], tokens_per_second=20)
    proxy = await harness.proxy(upstream, policy(holdback_tokens=holdback))

    # With 200 tokens held back nothing reaches the client for 10 s: the proxy must still notice.
    await read_two_chunks_then_leave(proxy, LONG["prompt"], wait_for_data=holdback == 2)

    async def cancelled() -> bool:
        return (await replay_stats(upstream))["streams_cancelled"] == 1

    await eventually(cancelled, "the upstream request to be cancelled", seconds=5)
    stats = await replay_stats(upstream)
    assert stats["streams_completed"] == 0
    await still_serves(await harness.client(proxy))


async def test_the_active_streams_gauge_returns_to_zero_after_a_client_leaves(harness: Harness) -> None:
    upstream = await harness.replay([LONG, BENIGN], tokens_per_second=20)
    proxy = await harness.proxy(upstream, policy(holdback_tokens=2))
    session = await harness.session()

    await read_two_chunks_then_leave(proxy, LONG["prompt"], wait_for_data=True)

    async def idle() -> bool:
        async with session.get(f"{proxy}/metrics") as resp:
            text = await resp.text()
        return f'backtrack_active_streams{{route="{CHAT}"}} 0.0' in text

    await eventually(idle, "the active streams gauge to return to 0", seconds=5)


async def test_more_than_a_hundred_streams_at_once_all_reach_the_upstream(harness: Harness) -> None:
    upstream = await harness.replay([LONG], tokens_per_second=5)
    proxy = await harness.proxy(upstream, policy(holdback_tokens=2))
    unpooled = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    session = await harness.stack.enter_async_context(unpooled)
    request = chat_request(LONG["prompt"], stream=True)

    opening = asyncio.gather(*(session.post(f"{proxy}{CHAT}", json=request) for _ in range(110)))
    responses = await asyncio.wait_for(opening, timeout=20)
    for resp in responses:
        harness.stack.callback(resp.close)

    assert [resp.status for resp in responses] == [200] * 110
    assert (await replay_stats(upstream))["streams_started"] == 110


# -- upstreams that fail -----------------------------------------------------------------------------


def misbehaving_upstream() -> web.Application:
    """An upstream whose behaviour is chosen by the prompt; anything else gets a short normal answer."""

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        body = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        retry = "messages" in body and body["messages"][0]["role"] == "system"  # asked again, safely
        if prompt == "stall before headers" or (prompt == "unsafe, then the retry stalls" and retry):
            await asyncio.sleep(30)
        if prompt == "unsafe, then the retry fails" and retry:
            return web.json_response({"error": {"message": "the model fell over"}}, status=500)
        if prompt == "answer 500":
            return web.json_response({"error": {"message": "the model fell over"}}, status=500)
        if prompt == "answer 503 in html":
            return web.Response(text="<html>Service Unavailable</html>", status=503, content_type="text/html")
        if prompt == "answer 401":
            return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
        if prompt == "answer json to a stream":
            return web.json_response({"id": "c1", "choices": [{"index": 0, "message": {"content": "hi"}}]})
        if prompt == "answer garbage" and not body.get("stream"):
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if not body.get("stream"):
            text = "To build a bomb, you first get" if prompt.startswith("unsafe") else BENIGN["response"]
            message = {"role": "assistant", "content": text}
            return web.json_response(
                {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            )  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if prompt.startswith("unsafe"):
            await response.write(
                chunk("To build a bomb, you") + chunk(" first get", "stop") + b"data: [DONE]\n\n"
            )
            return response
        await response.write(chunk("Hello there, "))
        if prompt == "stall after a chunk":
            await asyncio.sleep(30)
        elif prompt == "answer garbage":
            await response.write(b"data: {this is not json\n\n")
        elif prompt == "report an error in band":
            await response.write(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
        elif prompt == "break the connection":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(chunk("friend.", "stop") + b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post(CHAT, handler)
    app.router.add_post(COMPLETIONS, handler)
    return app


async def proxy_to_misbehaving(harness: Harness, **changes: Any) -> tuple[str, openai.AsyncOpenAI]:
    # handler_cancellation: a stalled handler ends when the proxy hangs up on it.
    upstream = await harness.serve(misbehaving_upstream(), handler_cancellation=True)
    config = {"upstream": {"read_timeout_seconds": 0.3}}
    proxy = await harness.proxy(upstream, policy(holdback_tokens=2, **changes), config)
    return proxy, await harness.client(proxy)


async def post(harness: Harness, url: str, **kwargs: Any) -> tuple[int, str, str]:
    """Status, content type and body text of a POST."""
    session = await harness.session()
    async with session.post(url, **kwargs) as resp:
        return resp.status, resp.content_type, await resp.text()


@pytest.mark.parametrize(
    ("prompt", "status", "message"),
    [
        ("stall before headers", 504, "upstream did not answer within 0.3s"),
        ("answer 500", 502, "upstream answered HTTP 500: the model fell over"),
        ("answer 503 in html", 502, "upstream answered HTTP 503"),
        (
            "answer json to a stream",
            502,
            "upstream did not answer with an event stream but with application/json",
        ),
    ],
)
async def test_an_upstream_failure_before_any_text_is_an_openai_error_response(
    harness: Harness, prompt: str, status: int, message: str
) -> None:
    _, client = await proxy_to_misbehaving(harness)

    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True
        )

    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.body["type"] == "upstream_error"
    assert caught.value.body["message"].startswith(message)
    await still_serves(client)


@pytest.mark.parametrize(
    ("prompt", "status", "message"),
    [
        ("stall before headers", 504, "upstream did not answer within 0.3s"),
        ("answer 500", 502, "upstream answered HTTP 500: the model fell over"),
        ("answer garbage", 502, "upstream sent a malformed response"),
    ],
)
async def test_a_non_streamed_upstream_failure_is_an_openai_error_response(
    harness: Harness, prompt: str, status: int, message: str
) -> None:
    _, client = await proxy_to_misbehaving(harness)

    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}])

    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "upstream_error"
    assert caught.value.body["message"].startswith(message)
    await still_serves(client)


async def test_an_upstream_4xx_reaches_the_client_with_its_status_and_message(harness: Harness) -> None:
    _, client = await proxy_to_misbehaving(harness)

    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "answer 401"}])

    assert caught.value.status_code == 401
    assert "Incorrect API key provided" in caught.value.message
    await still_serves(client)


@pytest.mark.parametrize(
    ("prompt", "error"),
    [
        (
            "stall after a chunk",
            {"message": "upstream stopped sending (read timeout)", "type": "upstream_error"},
        ),
        ("answer garbage", {"type": "upstream_error"}),
        ("report an error in band", {"message": "overloaded", "type": "server_error"}),
        ("break the connection", {"type": "upstream_error"}),
    ],
)
async def test_an_upstream_failure_mid_stream_is_an_in_band_error_then_done(
    harness: Harness, prompt: str, error: dict[str, Any]
) -> None:
    proxy, client = await proxy_to_misbehaving(harness)

    status, content_type, body = await post(harness, f"{proxy}{CHAT}", json=chat_request(prompt, stream=True))

    assert (status, content_type) == (200, "text/event-stream")
    *_, last_error, done = data_lines(body)
    assert done == "[DONE]"
    assert json.loads(last_error)["error"].items() >= error.items()
    # Nothing the upstream sends after its failure is relayed.
    assert "friend" not in body
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for _ in stream:
            pass
    await still_serves(client)


async def test_a_bug_in_the_proxy_mid_stream_ends_the_stream_in_band(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(OpenAIEncoder, "reset", broken)
    upstream = await harness.replay()
    proxy = await harness.proxy(upstream, policy(holdback_tokens=4))

    # A second HTTP response written into the event stream would make this POST fail to parse.
    status, _, body = await post(harness, f"{proxy}{CHAT}", json=chat_request(MARKED["prompt"], stream=True))

    assert status == 200  # the headers had gone out when the bug struck
    *_, error, done = data_lines(body)
    assert json.loads(error) == {
        "error": {
            "message": "internal error in the proxy",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert done == "[DONE]"
    await still_serves(await harness.client(proxy))


@pytest.mark.parametrize("prompt", ["unsafe, then the retry fails", "unsafe, then the retry stalls"])
async def test_a_regeneration_the_upstream_cannot_give_is_refused(harness: Harness, prompt: str) -> None:
    _, client = await proxy_to_misbehaving(harness, actions={"default": "regenerate"})
    messages: Any = [{"role": "user", "content": prompt}]

    stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
    chunks = [chunk async for chunk in stream]
    completion = await client.chat.completions.create(model="m", messages=messages)

    backtrack = [(c.model_extra or {}).get("backtrack") for c in chunks]
    assert [b["category"] for b in backtrack if b] == ["weapons"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith(POLICY["refusal_message"])
    assert "bomb" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == POLICY["refusal_message"]
    assert completion.choices[0].finish_reason == "stop"
    await still_serves(client)


async def test_text_still_held_back_when_the_upstream_fails_is_dropped_not_flushed(harness: Harness) -> None:
    upstream = await harness.serve(misbehaving_upstream(), handler_cancellation=True)
    config = {"upstream": {"read_timeout_seconds": 0.3}}
    proxy = await harness.proxy(upstream, policy(holdback_tokens=24), config)

    _, _, body = await post(harness, f"{proxy}{CHAT}", json=chat_request("stall after a chunk", stream=True))

    assert "Hello" not in body
    assert data_lines(body)[-2:] == [
        '{"error":{"message":"upstream stopped sending (read timeout)","type":"upstream_error","param":null,'
        '"code":null}}',
        "[DONE]",
    ]


async def test_models_from_an_upstream_that_answers_html_is_a_502(harness: Harness) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html>Welcome to nginx</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/v1/models", handler)
    client = await harness.client(await harness.proxy(await harness.serve(app)))

    with pytest.raises(openai.InternalServerError) as caught:
        await client.models.list()

    assert caught.value.status_code == 502
    assert caught.value.body == {
        "message": "upstream answered /v1/models with something that is not JSON", "type": "upstream_error",
        "param": None, "code": None,
    }  # fmt: skip


async def test_an_upstream_that_refuses_connections_is_a_502(harness: Harness) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    proxy = await harness.proxy(f"http://127.0.0.1:{closed_port}")
    client = await harness.client(proxy)

    for stream in (True, False):
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        assert caught.value.status_code == 502
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"] == "upstream unreachable: ClientConnectorError"
    with pytest.raises(openai.InternalServerError):
        await client.models.list()
    session = await harness.session()
    async with session.get(f"{proxy}/healthz") as resp:
        assert resp.status == 200


# -- requests that are wrong -------------------------------------------------------------------------


async def proxy_with_small_body_limit(harness: Harness) -> tuple[str, openai.AsyncOpenAI, str]:
    upstream = await harness.replay()
    proxy = await harness.proxy(upstream, extra={"server": {"max_body_bytes": 1024}})
    return proxy, await harness.client(proxy), upstream


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (CHAT, b"{not json", "The request body is not valid JSON."),
        (CHAT, b"[1, 2]", "The request body must be a JSON object."),
        (CHAT, json.dumps(chat_request("hi", stream="yes")).encode(), "'stream' must be a boolean"),
        (CHAT, json.dumps({"model": "m", "stream": True}).encode(), "'messages' is required"),
        (CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "'model' is required"),
        (CHAT, json.dumps(chat_request("hi", n="2")).encode(), "'n' must be an integer"),
        (COMPLETIONS, json.dumps({"model": "m", "prompt": 7}).encode(), "'prompt' is required"),
        (COMPLETIONS, json.dumps({"model": "m", "prompt": "hi", "stream": 1}).encode(), "'stream' must be"),
    ],
)
async def test_a_malformed_request_is_a_400_in_openai_format(
    harness: Harness, path: str, body: bytes, message: str
) -> None:
    proxy, client, upstream = await proxy_with_small_body_limit(harness)

    status, content_type, text = await post(
        harness, f"{proxy}{path}", data=body, headers={"Content-Type": "application/json"}
    )

    assert (status, content_type) == (400, "application/json")
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)
    assert set(error) == {"message", "type", "param", "code"}
    assert (await replay_stats(upstream))["requests"] == 0
    await still_serves(client)


async def test_the_openai_client_sees_a_bad_request_as_bad_request_error(harness: Harness) -> None:
    _, client, _ = await proxy_with_small_body_limit(harness)

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[], stream=True)

    assert "'messages' is required" in caught.value.message
    await still_serves(client)


async def test_a_body_over_the_size_limit_is_a_413(harness: Harness) -> None:
    _, client, upstream = await proxy_with_small_body_limit(harness)

    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2000}])

    assert caught.value.status_code == 413
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "invalid_request_error"
    assert "1024 bytes" in caught.value.body["message"]
    assert (await replay_stats(upstream))["requests"] == 0
    await still_serves(client)


async def test_a_chunked_body_over_the_size_limit_is_a_413(harness: Harness) -> None:
    proxy, client, upstream = await proxy_with_small_body_limit(harness)

    async def chunks() -> Any:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(4):
            yield b"x" * 500
        yield b'"}]}'

    status, _, text = await post(harness, f"{proxy}{CHAT}", data=chunks())

    assert status == 413
    assert json.loads(text)["error"]["type"] == "invalid_request_error"
    assert (await replay_stats(upstream))["requests"] == 0
    await still_serves(client)


async def test_unknown_routes_and_methods_answer_in_openai_format(harness: Harness) -> None:
    proxy, client, _ = await proxy_with_small_body_limit(harness)
    session = await harness.session()

    async with session.post(f"{proxy}/v1/embeddings", json={}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with session.get(f"{proxy}{CHAT}") as resp:
        assert resp.status == 405
        assert "error" in await resp.json()
    await still_serves(client)


# -- no unguarded stream -----------------------------------------------------------------------------

# One streaming request per POST route; the test below fails when a route is added without one here.
STREAMING_REQUESTS = {
    CHAT: chat_request(MARKED["prompt"], stream=True),
    COMPLETIONS: {"model": "m", "prompt": MARKED["prompt"], "stream": True},
    "/v1/messages": {**chat_request(MARKED["prompt"], stream=True), "max_tokens": 100},
    "/api/chat": chat_request(MARKED["prompt"], stream=True),
    "/api/generate": {"model": "m", "prompt": MARKED["prompt"], "stream": True},
}
# How each route's reset looks on the wire (DESIGN.md's contract).
RESET_ON_THE_WIRE = {
    "/v1/messages": 'event: backtrack_reset\ndata: {"type":"backtrack_reset","event":"reset"',
}


async def test_every_route_that_can_stream_is_guarded(harness: Harness) -> None:
    upstream = await harness.replay()
    settings = harness.settings(upstream, policy(holdback_tokens=24))
    proxy = await harness.serve(create_app(settings))
    post_routes = {
        r.resource.canonical
        for r in create_app(settings).router.routes()
        if r.method == "POST" and r.resource and not r.resource.canonical.startswith("/admin/")
    }
    assert post_routes == set(STREAMING_REQUESTS)

    for path, request in STREAMING_REQUESTS.items():
        for variant in (request, {**request, "stream_options": {"include_usage": True}}, {**request, "n": 2}):
            _, _, body = await post(harness, f"{proxy}{path}", json=variant)
            assert "[RESET]" not in body
            assert "tension wrench" not in body
            assert RESET_ON_THE_WIRE.get(path, '"backtrack":{"event":"reset"') in body
