"""Clients that hold the proxy: slow headers, a stream nobody reads, streams too long, clients that leave.

Every limit is set small in the config, so each test runs in a second or two over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server.app import ProxyRunner, create_app
from tests.harness import Harness

CHAT = "/v1/chat/completions"


def chat_request(prompt: str = "Go on.", **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], **fields}


def chunk(text: str) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Upstream:
    """An OpenAI-style upstream that streams big chunks forever (or one chunk, then silence)."""

    def __init__(self, *, silent_after_first: bool = False) -> None:
        self.silent_after_first = silent_after_first
        self.started = 0
        self.gone = asyncio.Event()  # the proxy closed its request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(chunk("Hello "))
            while True:
                if self.silent_after_first:
                    await asyncio.sleep(0.05)
                    if request.transport is None or request.transport.is_closing():
                        raise ConnectionResetError
                    continue
                await resp.write(chunk("word " * 20000))
        except ConnectionError:
            self.gone.set()
            return resp
        except asyncio.CancelledError:
            self.gone.set()
            raise

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CHAT, self.handle)
        return app


async def serve_proxy(harness: Harness, upstream: str, server: dict[str, Any]) -> tuple[str, int]:
    """The proxy (with its own runner: the header timeout lives there); its root URL and port."""
    app = create_app(harness.settings(upstream, extra={"server": server}))
    runner = ProxyRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    harness.stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}", port


def raw_request(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data


async def test_clients_that_send_their_headers_slowly_are_cut_off(harness: Harness) -> None:
    upstream = await harness.replay()
    _, port = await serve_proxy(harness, upstream, {"header_timeout_seconds": 0.5})

    async def slowloris() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        answer = asyncio.create_task(reader.read())  # what the server says before it hangs up
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n".encode())
        header = b"X-Slow: abcdefghijklmnopqrstuvwxyz"
        with contextlib.suppress(ConnectionError):
            for i in range(40):  # a header byte every 0.1 s: 4 s if nobody stops it
                if answer.done():
                    break
                writer.write(header[i % len(header) :][:1])
                await writer.drain()
                await asyncio.sleep(0.1)
        said = await asyncio.wait_for(answer, timeout=3)
        writer.close()
        assert said == b"" or said.startswith(b"HTTP/1.1 408"), said
        return time.monotonic() - started

    elapsed = await asyncio.gather(*(slowloris() for _ in range(16)))

    assert max(elapsed) < 2.5


async def test_a_client_that_stops_reading_is_dropped_and_the_upstream_closed(harness: Harness) -> None:
    fake = Upstream()
    upstream = await harness.serve(fake.app())
    _, port = await serve_proxy(harness, upstream, {"write_timeout_seconds": 0.5})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(sock, raw_request(chat_request(stream=True)))

    # The client reads nothing: the proxy's writes stall, and the upstream must not stay held.
    await asyncio.wait_for(fake.gone.wait(), timeout=10)
    sock.close()


async def test_a_client_that_stops_reading_and_then_leaves_is_a_client_gone(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backtrack")
    fake = Upstream()
    upstream = await harness.serve(fake.app())
    _, port = await serve_proxy(harness, upstream, {})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, raw_request(chat_request(stream=True)))
    await asyncio.sleep(1.0)  # the proxy's writes stall
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset

    await asyncio.wait_for(fake.gone.wait(), timeout=5)
    await asyncio.sleep(0.2)
    proxy_records = [r for r in caplog.records if r.name == "backtrack"]
    assert not [r for r in proxy_records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert "client went away" in caplog.text


async def test_a_client_that_leaves_while_the_upstream_is_silent_is_noticed(harness: Harness) -> None:
    fake = Upstream(silent_after_first=True)
    upstream = await harness.serve(fake.app())
    root, _ = await serve_proxy(harness, upstream, {})
    session = await harness.session()

    async with session.post(f"{root}{CHAT}", json=chat_request(stream=True)) as resp:
        assert resp.status == 200
    started = time.monotonic()

    await asyncio.wait_for(fake.gone.wait(), timeout=5)
    assert time.monotonic() - started < 2


async def stream_body(root: str, session: aiohttp.ClientSession) -> str:
    async with session.post(f"{root}{CHAT}", json=chat_request(stream=True)) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_a_stream_past_max_stream_bytes_ends_with_an_in_band_error(harness: Harness) -> None:
    fake = Upstream()
    upstream = await harness.serve(fake.app())
    root, _ = await serve_proxy(harness, upstream, {"max_stream_bytes": 100_000})

    body = await asyncio.wait_for(stream_body(root, await harness.session()), timeout=10)

    lines = [line for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "100000 bytes" in error["message"]
    assert len(body) < 200_000
    await asyncio.wait_for(fake.gone.wait(), timeout=5)


async def test_a_stream_past_max_stream_seconds_ends_with_an_in_band_error(harness: Harness) -> None:
    fake = Upstream(silent_after_first=True)
    upstream = await harness.serve(fake.app())
    root, _ = await serve_proxy(harness, upstream, {"max_stream_seconds": 0.5})
    started = time.monotonic()

    body = await asyncio.wait_for(stream_body(root, await harness.session()), timeout=10)

    assert time.monotonic() - started < 3
    lines = [line for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "0.5 s" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
    await asyncio.wait_for(fake.gone.wait(), timeout=5)
