"""The upstream connection pool stays warm: a stream read to its `[DONE]` gives its connection back,
even when the upstream ends the body a moment after it; the client gets its end in one write."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.server import upstream as upstream_module
from tests.harness import Harness, policy

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def sse(choice: dict[str, object]) -> bytes:
    return b"data: " + json.dumps({**CHUNK, "choices": [choice]}).encode() + b"\n\n"


async def late_ending_upstream(harness: Harness, peers: list[int], pause: float) -> str:
    """An upstream that sends `[DONE]`, then the end of its chunked body `pause` seconds later, and
    records the client port of each request (one port: one kept connection)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"index": 0, "delta": {"role": "assistant", "content": "Hi"}}))
        await response.write(sse({"index": 0, "delta": {}, "finish_reason": "stop"}))
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(pause)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return await harness.serve(app)


async def stream_in_turn(proxy: str, n: int, wait: float) -> list[str]:
    """`n` streamed requests through `proxy` on one client session, `wait` seconds apart: the bodies."""
    request = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    bodies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(f"{proxy}/v1/chat/completions", json=request) as resp:
                bodies.append(await resp.text())
            await asyncio.sleep(wait)
    return bodies


async def test_a_finished_stream_gives_its_upstream_connection_back(harness: Harness) -> None:
    peers: list[int] = []
    upstream = await late_ending_upstream(harness, peers, pause=0.02)
    bodies = await stream_in_turn(await harness.proxy(upstream, policy(holdback_tokens=0)), 3, wait=0.2)
    # The upstream's end of body comes after [DONE]: each request waited for it before the next.
    assert all(b.endswith("data: [DONE]\n\n") and '"content":"Hi"' in b.replace(" ", "") for b in bodies)
    assert len(peers) == 3
    assert len(set(peers)) == 1


async def test_an_upstream_that_never_ends_its_body_is_closed_after_the_read_out(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "READ_OUT_SECONDS", 0.1)
    peers: list[int] = []
    upstream = await late_ending_upstream(harness, peers, pause=30.0)
    bodies = await stream_in_turn(await harness.proxy(upstream, policy(holdback_tokens=0)), 2, wait=0.3)
    assert all(b.endswith("data: [DONE]\n\n") for b in bodies)
    assert len(set(peers)) == 2  # the first connection was closed, not kept half-read
