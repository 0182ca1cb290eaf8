"""replay-upstream's Anthropic Messages and Ollama routes; rows, pacing and stats are `proxy.replay.app`'s.

Each answers in its API's own shapes: Anthropic's event stream (`message_start` ... `message_stop`) or
message object, Ollama's NDJSON lines (a `done: true` line with its counters last) or one object; and
each fails in its API's own error format, before the headers or in-band.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.replay.app import (
    REPLAY_STATE,
    InvalidRequest,
    chat_prompt,
    fail_before_headers,
    read_json_body,
    stream,
)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required", "model")
    return model


def _stream_flag(body: dict[str, Any], default: bool) -> bool:
    value = body.get("stream", default)
    if not isinstance(value, bool):
        raise InvalidRequest("stream: Input should be a valid boolean", "stream")
    return value


# -- Anthropic ---------------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _anthropic_error(message: str) -> bytes:
    return _event({"type": "error", "error": {"type": "api_error", "message": message}})


async def messages(request: web.Request) -> web.StreamResponse:
    """`POST /v1/messages`: the row's response as one text block."""
    state = request.app[REPLAY_STATE]
    body = await read_json_body(request)
    model = _model(body)
    if not isinstance(body.get("max_tokens"), int):
        raise InvalidRequest("max_tokens: Field required", "max_tokens")
    streamed = _stream_flag(body, False)
    talk = chat_prompt(body)
    row = state.answer(talk.last_user)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer, talk.prefill)
    usage = {"input_tokens": len(state.tokenizer.split(talk.text)), "output_tokens": len(pieces)}
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model}
    if not streamed:
        content = [{"type": "text", "text": "".join(pieces)}]
        answer = {**message, "content": content, "stop_reason": "end_turn", "stop_sequence": None}
        return web.json_response({**answer, "usage": usage})

    block = {"type": "text", "text": ""}
    start: dict[str, Any] = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    head = _event({"type": "message_start", "message": {**start, "usage": {**usage, "output_tokens": 1}}})
    head += _event({"type": "content_block_start", "index": 0, "content_block": block})
    head += _event({"type": "ping"})
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    tail = _event({"type": "content_block_stop", "index": 0})
    tail += _event({"type": "message_delta", "delta": stop, "usage": {"output_tokens": len(pieces)}})
    tail += _event({"type": "message_stop"})

    def steps() -> Iterator[bytes]:
        yield head
        for piece in pieces:
            delta = {"type": "text_delta", "text": piece}
            yield _event({"type": "content_block_delta", "index": 0, "delta": delta})

    return await stream(request, steps(), lambda: tail, row, _anthropic_error, skip=1)


# -- Ollama ------------------------------------------------------------------------------------------


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _ollama_error(message: str) -> bytes:
    return _line({"error": message})


async def ollama_chat(request: web.Request) -> web.StreamResponse:
    """`POST /api/chat`: streamed unless `"stream": false`, as Ollama does."""
    body = await read_json_body(request)
    model = _model(body)
    streamed = _stream_flag(body, True)
    talk = chat_prompt(body)
    return await _ollama(request, model, streamed, talk.last_user, talk.text, talk.prefill, chat=True)


async def ollama_generate(request: web.Request) -> web.StreamResponse:
    """`POST /api/generate`: the prompt picks the row."""
    body = await read_json_body(request)
    model = _model(body)
    streamed = _stream_flag(body, True)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", "prompt")
    return await _ollama(request, model, streamed, prompt, prompt, "", chat=False)


async def _ollama(
    request: web.Request, model: str, streamed: bool, prompt: str | None, prompt_text: str, prefill: str,
    *, chat: bool,
) -> web.StreamResponse:  # fmt: skip
    state = request.app[REPLAY_STATE]
    started = time.monotonic_ns()
    row = state.answer(prompt)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer, prefill)
    head = {"model": model, "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}

    def text(piece: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}

    def final(piece: str) -> dict[str, Any]:
        prompt_tokens = len(state.tokenizer.split(prompt_text))
        counters = {
            "done_reason": "stop", "total_duration": time.monotonic_ns() - started, "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 0, "eval_count": len(pieces),
            "eval_duration": 0,
        }  # fmt: skip
        context = {} if chat else {"context": list(range(prompt_tokens + len(pieces)))}
        return {**head, **text(piece), "done": True, **counters, **context}

    if not streamed:
        return web.json_response(final("".join(pieces)))

    def steps() -> Iterator[bytes]:
        for piece in pieces:
            yield _line({**head, **text(piece), "done": False})

    # The done line is made when it is sent, so that its duration covers the stream.
    return await stream(
        request, steps(), lambda: _line(final("")), row, _ollama_error, content_type="application/x-ndjson"
    )
