"""Requests the HTTP layer or the JSON parser refuses: a 400 in the route's own format, and no secrets.

aiohttp's parser quotes what it could not parse; an `Authorization` header must appear neither in the
answer nor in the log.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from typing import Any

import pytest
from aiohttp import web

from proxy.server.app import ProxyRunner, create_app
from tests.harness import Harness

SECRET = "sk-live-5up3rs3cr3t"
CHAT_ROUTES = ["/v1/chat/completions", "/v1/messages", "/api/chat"]


def is_api_error(path: str, body: Any) -> bool:
    """`body` is an error in the format of the API `path` belongs to."""
    if path == "/v1/messages":
        return body["type"] == "error" and isinstance(body["error"]["message"], str)
    if path.startswith("/api/"):
        return isinstance(body["error"], str)
    return isinstance(body["error"]["message"], str)


async def serve_proxy(harness: Harness) -> int:
    app = create_app(harness.settings(await harness.replay()))
    runner = ProxyRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    harness.stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return port


async def exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    """Send `raw` over a fresh connection; the answer's status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return status, body


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *headers,
            f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize("path", CHAT_ROUTES)
@pytest.mark.parametrize(
    "header",
    [f"Authorization: Bearer {SECRET}{'x' * 9000}", f"Authorization: Bearer {SECRET}\x01tail"],
    ids=["over-8kb", "control-byte"],
)
async def test_a_bad_authorization_header_is_refused_without_quoting_it(
    harness: Harness, caplog: pytest.LogCaptureFixture, path: str, header: str
) -> None:
    caplog.set_level(logging.DEBUG)
    port = await serve_proxy(harness)

    status, body = await exchange(port, post(path, BODY, header))

    assert status == 400
    assert is_api_error(path, json.loads(body))
    assert SECRET.encode() not in body
    assert SECRET not in caplog.text
    assert "Traceback" not in caplog.text
    for record in caplog.records:
        assert record.exc_info is None


@pytest.mark.parametrize("path", CHAT_ROUTES)
async def test_deeply_nested_json_is_a_400(harness: Harness, path: str) -> None:
    port = await serve_proxy(harness)
    nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    status, body = await exchange(port, post(path, nested))

    assert status == 400
    assert is_api_error(path, json.loads(body))


@pytest.mark.parametrize("path", CHAT_ROUTES)
async def test_a_malformed_gzip_body_is_a_400(harness: Harness, path: str) -> None:
    port = await serve_proxy(harness)
    broken = gzip.compress(BODY)[:-12] + b"garbage-garbage"

    status, body = await exchange(port, post(path, broken, "Content-Encoding: gzip"))

    assert status == 400
    assert is_api_error(path, json.loads(body))


@pytest.mark.parametrize("path", CHAT_ROUTES)
async def test_the_http_layers_own_400s_are_in_the_apis_format(harness: Harness, path: str) -> None:
    port = await serve_proxy(harness)
    raw = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode()

    status, body = await exchange(port, raw)

    assert status == 400
    assert is_api_error(path, json.loads(body))


@pytest.mark.parametrize("path", CHAT_ROUTES)
async def test_a_content_part_whose_text_is_not_a_string_is_a_400(harness: Harness, path: str) -> None:
    port = await serve_proxy(harness)
    part = {"type": "text", "text": 5}
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [part]}]})

    status, answer = await exchange(port, post(path, body.encode()))

    assert status == 400
    assert is_api_error(path, json.loads(answer))
