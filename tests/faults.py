"""A misbehaving upstream for the fault matrix: it speaks each route's dialect, and breaks as told.

The fault is the request's `model` (the proxy forwards the body untouched), so one upstream serves
every cell of the matrix. Each fault is what a broken network or a broken model server does:

    ok              a benign answer, properly ended (the control)
    slow_headers    answers only after SLOW seconds (past the proxy's upstream read timeout)
    5xx             503 with a JSON error
    garbage         a good first piece, then a line that is not JSON
    drop            a good first piece, then the connection is cut
    endless_line    one line that never ends (MiB after MiB, no newline)
    endless_stream  benign deltas forever, never a finish
    early_close     good pieces, then the body ends without the dialect's finish or terminator
    wrong_dialect   a well-formed answer in another API's format (OpenAI's SSE for Anthropic, ...)
    huge_delta      one 100 KB delta that turns unsafe at its very end
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

SLOW = 3.0
FIRST = "Here is a calm first part. "
BENIGN = FIRST + "And a calm second part."
HUGE = "word " * 20_000 + "now build the bomb like this"
FAULTS = (
    "ok", "slow_headers", "5xx", "garbage", "drop", "endless_line", "endless_stream", "early_close",
    "wrong_dialect", "huge_delta",
)  # fmt: skip
ENDLESS_SECONDS = 20.0  # an endless body stops by itself at last, whatever the proxy does


def _openai_chunk(text: str | None, finish: str | None, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "f1", "object": kind, "created": 1, "model": "m", "choices": [choice]}


class Dialect:
    """How one route's answers look: streamed frames and a whole answer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.api = {"/v1/messages": "anthropic", "/api/chat": "ollama", "/api/generate": "ollama"}.get(
            path, "openai"
        )
        self.chat = path in ("/v1/chat/completions", "/api/chat")
        self.media = "application/x-ndjson" if self.api == "ollama" else "text/event-stream"

    def start(self) -> bytes:
        if self.api != "anthropic":
            return b""
        message = {
            "id": "msg_f", "type": "message", "role": "assistant", "content": [], "model": "m",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
        }  # fmt: skip
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return _sse({"type": "message_start", "message": message}, "message_start") + _sse(
            block, "content_block_start"
        )

    def delta(self, text: str) -> bytes:
        if self.api == "openai":
            return _sse(_openai_chunk(text, None, self.chat))
        if self.api == "anthropic":
            event = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            return _sse(event, "content_block_delta")
        key = {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}
        return _line({"model": "m", **key, "done": False})

    def end(self) -> bytes:
        if self.api == "openai":
            return _sse(_openai_chunk(None, "stop", self.chat)) + b"data: [DONE]\n\n"
        if self.api == "anthropic":
            return (
                _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                + _sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": 3},
                    },
                    "message_delta",
                )
                + _sse({"type": "message_stop"}, "message_stop")
            )
        key = {"message": {"role": "assistant", "content": ""}} if self.chat else {"response": ""}
        return _line({"model": "m", **key, "done": True, "done_reason": "stop"})

    def garbage(self) -> bytes:
        return b"this is not json\n" if self.api == "ollama" else b"data: this is not json\n\n"

    def foreign(self, text: str) -> bytes:
        """A whole streamed answer in another API's format."""
        other = Dialect("/api/chat" if self.api != "ollama" else "/v1/chat/completions")
        if self.api == "openai":
            other = Dialect("/v1/messages")
        return other.start() + other.delta(text) + other.end()

    def answer(self, text: str) -> dict[str, Any]:
        if self.api == "openai":
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            kind = "chat.completion" if self.chat else "text_completion"
            return {"id": "f1", "object": kind, "created": 1, "model": "m", "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
        if self.api == "anthropic":
            return {"id": "msg_f", "type": "message", "role": "assistant", "model": "m",
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
        key = {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}
        return {"model": "m", **key, "done": True, "done_reason": "stop"}

    def foreign_answer(self, text: str) -> dict[str, Any]:
        return Dialect("/v1/messages" if self.api != "anthropic" else "/v1/chat/completions").answer(text)


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(obj) + "\n\n").encode()


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


async def _handle(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    fault = body.get("model", "ok")
    stream = body.get("stream", request.path.startswith("/api/"))
    d = Dialect(request.path)
    if fault == "slow_headers":
        await asyncio.sleep(SLOW)
    if fault == "5xx":
        return web.json_response({"error": {"message": "the model server is overloaded"}}, status=503)
    if not stream:
        return await _whole(request, d, fault)
    resp = web.StreamResponse(headers={"Content-Type": d.media})
    await resp.prepare(request)
    if fault == "wrong_dialect":
        await resp.write(d.foreign(BENIGN))
        await resp.write_eof()
        return resp
    if fault == "endless_line":
        await resp.write(b"data: " if d.api != "ollama" else b'{"response": "')
        await _for_a_while(resp, lambda: b"x" * 65536)
        return resp
    await resp.write(d.start())
    if fault == "huge_delta":
        await resp.write(d.delta(HUGE) + d.end())
        await resp.write_eof()
        return resp
    await resp.write(d.delta(FIRST))
    if fault == "endless_stream":
        await _for_a_while(resp, lambda: d.delta("and on "), pause=0.01)
        return resp
    if fault == "garbage":
        await resp.write(d.garbage())
    elif fault == "drop":
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # no terminator, no end of the chunked body: the connection is gone
        return resp
    else:
        await resp.write(d.delta("And a calm second part."))
        if fault != "early_close":
            await resp.write(d.end())
    await resp.write_eof()
    return resp


async def _whole(request: web.Request, d: Dialect, fault: str) -> web.StreamResponse:
    if fault in ("garbage", "wrong_dialect", "huge_delta", "ok", "slow_headers"):
        answer = {"garbage": None, "wrong_dialect": d.foreign_answer(BENIGN), "huge_delta": d.answer(HUGE)}
        if fault == "garbage":
            return web.Response(body=b"this is not json", content_type="application/json")
        return web.json_response(answer.get(fault, d.answer(BENIGN)))
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    if fault in ("drop", "early_close"):
        raw = json.dumps(d.answer(BENIGN)).encode()
        resp.content_length = len(raw)
        await resp.prepare(request)
        await resp.write(raw[: len(raw) // 2])
        assert request.transport is not None
        request.transport.abort()  # half a body, then gone
        return resp
    await resp.prepare(request)  # endless_line / endless_stream: a body that never ends
    await _for_a_while(resp, lambda: b" " * 65536)
    return resp


async def _for_a_while(resp: web.StreamResponse, make: Any, pause: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + ENDLESS_SECONDS
    try:
        while loop.time() < until:
            await resp.write(make())
            await asyncio.sleep(pause)
    except (ConnectionError, RuntimeError):
        return  # the proxy hung up: as it should


def create_fault_app() -> web.Application:
    app = web.Application()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate"):
        app.router.add_post(path, _handle)
    return app
