"""The fault matrix: every way an upstream breaks, on every route, streamed and not; then clients that
leave at each phase. Each cell asserts what the client gets and that the proxy still serves after it.

What the client gets, by fault (see `tests/faults.py` for what each fault does):

    fault            streamed                                   not streamed
    ok               the whole answer, properly ended           200, the whole answer
    slow_headers     502/504 in the API's format                502/504 in the API's format
    5xx              502 in the API's format                    502 in the API's format
    garbage          an in-band error, no garbage shown         502
    drop             an in-band error                           502
    endless_line     an in-band error (line / stream limit)     502 (answer over the size limit)
    endless_stream   an in-band error (max_stream_seconds)      502 (answer over the size limit)
    early_close      an in-band error (never a whole answer)    502
    wrong_dialect    an error; none of the foreign text shown   502
    huge_delta       judged: the refusal, nothing unsafe        200, the refusal, nothing unsafe
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.faults import FAULTS, FIRST, Dialect, create_fault_app
from tests.harness import POLICY, Harness, metric

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate")
REFUSAL = POLICY["refusal_message"]
LIMITS = {
    "upstream": {"read_timeout_seconds": 1.0, "max_line_bytes": 256 * 1024},
    "server": {"max_stream_seconds": 2.0, "max_stream_bytes": 1024 * 1024},
}
ERRORS_BEFORE_HEADERS = {"slow_headers": (502, 504), "5xx": (502,)}


def request_body(path: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if path == "/v1/completions" or path == "/api/generate":
        body["prompt"] = "Say something calm."
    else:
        body["messages"] = [{"role": "user", "content": "Say something calm."}]
    if path == "/v1/messages":
        body["max_tokens"] = 64
    return body


def assert_api_error(path: str, body: Any) -> None:
    """An error body in the format of the route's API."""
    api = Dialect(path).api
    if api == "anthropic":
        assert body["type"] == "error" and body["error"]["message"]
    elif api == "ollama":
        assert isinstance(body["error"], str) and body["error"]
    else:
        assert body["error"]["message"]


def in_band_error(path: str, raw: bytes) -> bool:
    """Whether a streamed answer ends with the dialect's in-band error."""
    api = Dialect(path).api
    if api == "anthropic":
        return b"event: error" in raw
    if api == "ollama":
        last = raw.strip().splitlines()[-1]
        return "error" in json.loads(last)
    return b'data: {"error"' in raw and raw.endswith(b"data: [DONE]\n\n")


def ended_whole(path: str, raw: bytes) -> bool:
    api = Dialect(path).api
    if api == "anthropic":
        return raw.rstrip().endswith(b'data: {"type": "message_stop"}') or b"message_stop" in raw[-200:]
    if api == "ollama":
        return json.loads(raw.strip().splitlines()[-1]).get("done") is True
    return raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw


async def ask(root: str, path: str, fault: str, stream: bool) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(root + path, json=request_body(path, fault, stream)) as resp,
    ):
        return resp.status, await resp.read()


@pytest.fixture
async def proxy(harness: Harness) -> str:
    upstream = await harness.serve(create_fault_app())
    return await harness.proxy(upstream, POLICY, LIMITS)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", ROUTES)
async def test_an_upstream_fault(proxy: str, path: str, fault: str, stream: bool) -> None:
    status, raw = await ask(proxy, path, fault, stream)

    if fault in ERRORS_BEFORE_HEADERS:
        assert status in ERRORS_BEFORE_HEADERS[fault]
        assert_api_error(path, json.loads(raw))
    elif fault == "ok":
        assert status == 200 and b"calm second part" in raw
        assert ended_whole(path, raw) if stream else FIRST.encode() in raw
    elif fault == "huge_delta":
        assert status == 200 and b"bomb" not in raw and b"like this" not in raw
        assert REFUSAL.encode() in raw.replace(b"\\u2019", b"'")
    elif not stream:
        assert status == 502
        assert_api_error(path, json.loads(raw))
    elif fault == "wrong_dialect" and status != 200:
        assert status == 502  # a stream of another media type is refused before the headers
        assert_api_error(path, json.loads(raw))
    else:
        assert status == 200 and in_band_error(path, raw), raw[-300:]
        assert b"not json" not in raw
        if fault == "endless_line":
            assert b"over 262144 bytes" in raw  # the configured line limit, not the stream cap, ended it
        if fault == "wrong_dialect":
            assert b"calm" not in raw  # none of the foreign answer was let through unjudged

    # The proxy still serves, on the same route.
    status, raw = await ask(proxy, path, "ok", stream=True)
    assert status == 200 and ended_whole(path, raw) and b"calm second part" in raw


@pytest.mark.parametrize("phase", ["before_headers", "mid_stream"])
@pytest.mark.parametrize("path", ROUTES)
async def test_a_client_that_leaves(harness: Harness, proxy: str, path: str, phase: str) -> None:
    fault = "slow_headers" if phase == "before_headers" else "endless_stream"
    session = aiohttp.ClientSession()
    try:
        resp = await asyncio.wait_for(
            session.post(proxy + path, json=request_body(path, fault, True)),
            0.3 if phase == "before_headers" else 5,
        )
        if phase == "mid_stream":
            await resp.content.readany()  # the first bytes are in: then the client goes
        resp.close()
    except TimeoutError:
        pass  # gone before the headers came
    finally:
        await session.close()

    async with aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while await metric(s, proxy, f'backtrack_active_streams{{route="{path}"}}') != 0:
            assert loop.time() < until, "the stream the client left is still counted as active"
            await asyncio.sleep(0.1)
    status, raw = await ask(proxy, path, "ok", stream=True)
    assert status == 200 and ended_whole(path, raw)
