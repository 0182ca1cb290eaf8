"""replay-upstream's OpenAI routes with the wire habits of `transformers serve` (`--wire transformers`).

What `transformers serve` 5.24.0 sent in front of SmolLM2-135M-Instruct, where it differs from OpenAI's
own API (and from this server's default wire, `proxy.replay.app`):

- The first chat chunk carries the role alone: `"delta": {"role": "assistant"}`, no `content` key.
- Every chat chunk has `"system_fingerprint": ""`; no chunk has `logprobs`, and `finish_reason` is
  left out (not `null`) until the last chunk.
- Usage rides on the last chunk, beside its `finish_reason`, whether or not the request asked for it
  with `stream_options.include_usage`; there is no separate usage chunk with `"choices": []`.
- The stream ends at the end of the body: no `data: [DONE]`.
- `n` is ignored: one choice, whatever was asked.
- Completions streams have no role chunk; their last chunk has `"text": ""`, the finish and the usage.
- Non-streamed answers have no `system_fingerprint`, `logprobs` or `refusal`.
- Ids are bare UUIDs (`b9baf6ad-eaf9-...`), not `chatcmpl-...`.
- A failure mid-stream is `data: {"error": "MESSAGE"}`: the error is a string, not an object.

The proxy must take each of these in its stride; the fast tests run it against this wire
(tests/replay/test_replay_transformers_wire.py), the slow ones against the real server
(tests/e2e/test_real_model.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from proxy.replay.app import (
    REPLAY_STATE,
    InvalidRequest,
    ReplayState,
    chat_prompt,
    fail_before_headers,
    read_json_body,
    stream,
)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error(message: str) -> bytes:
    return _sse({"error": message})


def _model_and_stream(body: dict[str, Any]) -> tuple[str, bool]:
    model, streamed = body.get("model"), body.get("stream") or False
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string.", "model")
    if not isinstance(streamed, bool):
        raise InvalidRequest("'stream' must be a boolean.", "stream")
    return model, streamed


def _usage(state: ReplayState, prompt_text: str, pieces: list[str]) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(state.tokenizer.split(prompt_text)), len(pieces)
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions` as `transformers serve` answers it."""
    state = request.app[REPLAY_STATE]
    body = await read_json_body(request)
    model, streamed = _model_and_stream(body)
    talk = chat_prompt(body)
    row = state.answer(talk.last_user)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer, talk.prefill)
    usage = _usage(state, talk.text, pieces)
    head = {"id": str(uuid.uuid4()), "created": int(time.time()), "model": model}
    if not streamed:
        message = {"content": "".join(pieces), "role": "assistant"}
        choice = {"finish_reason": "stop", "index": 0, "message": message}
        return web.json_response({**head, "choices": [choice], "object": "chat.completion", "usage": usage})

    def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
        fingerprint = {"object": "chat.completion.chunk", "system_fingerprint": ""}
        return _sse({"id": head["id"], "choices": [choice], **head, **fingerprint, **extra})

    def steps() -> Iterator[bytes]:
        yield chunk({"delta": {"role": "assistant"}, "index": 0})
        for piece in pieces:
            yield chunk({"delta": {"content": piece}, "index": 0})

    tail = chunk({"delta": {}, "index": 0, "finish_reason": "stop"}, usage=usage)
    # The role chunk is step 0, so a row failing after N tokens fails after N + 1 steps.
    return await stream(request, steps(), lambda: tail, row, _error, skip=1)


async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions` as `transformers serve` answers it."""
    state = request.app[REPLAY_STATE]
    body = await read_json_body(request)
    model, streamed = _model_and_stream(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string.", "prompt")
    row = state.answer(prompt)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer)
    usage = _usage(state, prompt, pieces)
    head = {"id": str(uuid.uuid4()), "created": int(time.time()), "model": model, "object": "text_completion"}
    if not streamed:
        choice = {"finish_reason": "stop", "index": 0, "text": "".join(pieces)}
        return web.json_response({"id": head["id"], "choices": [choice], **head, "usage": usage})

    def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
        return _sse({"id": head["id"], "choices": [choice], **head, **extra})

    def steps() -> Iterator[bytes]:
        for piece in pieces:
            yield chunk({"index": 0, "text": piece})

    tail = chunk({"finish_reason": "stop", "index": 0, "text": ""}, usage=usage)
    return await stream(request, steps(), lambda: tail, row, _error)
