"""OpenAI chat completions and completions, sans-IO.

`OpenAIDecoder.feed(bytes)` turns an upstream SSE stream into events: a `Piece` per choice per chunk
(text plus everything else the choice carried, untouched), `ChoiceFinish`, `Usage`, `UpstreamFailure`,
`Passthrough` for chunks it does not understand, and `Done`. `OpenAIEncoder` turns the engine's outputs
back into chunks that look like the upstream's own: same id, model, created and unknown top-level fields.

Chat chunks carry text in `choices[i].delta.content`; completions chunks in `choices[i].text`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from proxy.dialects.base import (
    JSON,
    ChoiceFinish,
    ChoicePiece,
    Done,
    Event,
    Passthrough,
    UpstreamFailure,
    Usage,
    reset_object,
)
from proxy.dialects.sse import SSEDecoder, encode_sse
from proxy.engine import Piece, ResetEvent

# The neutral events are re-exported: they were born here, and callers import them from here.
__all__ = [
    "DONE", "ChoiceFinish", "ChoicePiece", "Done", "Event", "OpenAIDecoder", "OpenAIEncoder", "Passthrough",
    "UpstreamFailure", "Usage", "data_line", "error_object", "in_band_error", "reset_object", "response_text",
    "set_response_text",
]  # fmt: skip


class OpenAIDecoder:
    def __init__(self, *, chat: bool = True) -> None:
        self.chat = chat
        self.template: JSON = {}
        self._sse = SSEDecoder()

    def feed(self, data: bytes) -> list[Event]:
        return self._events(self._sse.feed(data))

    def flush(self) -> list[Event]:
        return self._events(self._sse.flush())

    def _events(self, sse_events: list[Any]) -> list[Event]:
        out: list[Event] = []
        for sse in sse_events:
            out += self._chunk(sse.data)
        return out

    def _chunk(self, data: str) -> list[Event]:
        if data.strip() == "[DONE]":
            return [Done()]
        try:
            chunk = json.loads(data)
        except ValueError:
            return [UpstreamFailure(_error(f"upstream sent a malformed event: {data[:80]!r}"))]
        if not isinstance(chunk, dict):
            return [UpstreamFailure(_error("upstream sent an event that is not a JSON object"))]
        if "error" in chunk:
            err = chunk["error"]
            return [UpstreamFailure(err if isinstance(err, dict) else _error(str(err)))]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return [Passthrough(chunk)]
        self.template = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        out: list[Event] = []
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                return [UpstreamFailure(_error("upstream sent a malformed choice"))]
            out += self._choice(choice)
        if chunk.get("usage") and not choices:
            out.append(Usage(chunk))
        elif chunk.get("usage"):
            out.append(Usage({**self.template, "choices": [], "usage": chunk["usage"]}))
        return out

    def _choice(self, choice: JSON) -> list[Event]:
        index = choice.get("index", 0)
        rest = {k: v for k, v in choice.items() if k != "finish_reason"}
        text = _get_text(rest, self.chat)
        out: list[Event] = []
        if text or _carries_more(rest, self.chat):
            out.append(ChoicePiece(index, Piece(text, rest)))
        reason = choice.get("finish_reason")
        if reason is not None:
            tail = {k: v for k, v in rest.items() if k not in ("delta", "text", "logprobs")}
            out.append(ChoiceFinish(index, reason, tail))
        return out


def _get_text(choice: JSON, chat: bool) -> str:
    if chat:
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


def _carries_more(choice: JSON, chat: bool) -> bool:
    """Whether a choice without text still has something for the client (a role, tool calls, ...)."""
    if chat:
        delta = choice.get("delta") or {}
        return any(v is not None for k, v in delta.items() if k != "content") or bool(choice.get("logprobs"))
    return bool(choice.get("logprobs"))


def _error(message: str, kind: str = "upstream_error") -> JSON:
    return {"message": message, "type": kind, "param": None, "code": None}


class OpenAIEncoder:
    """Builds client chunks. `template` is the decoder's view of the upstream's chunk envelope."""

    def __init__(self, *, chat: bool = True) -> None:
        self.chat = chat

    def piece(self, template: JSON, index: int, piece: Piece) -> bytes:
        choice = copy.copy(piece.extra) if isinstance(piece.extra, dict) else {"index": index}
        choice["index"] = index
        if self.chat:
            delta = choice.get("delta")
            delta = dict(delta) if isinstance(delta, dict) else {}
            if piece.text or "content" in delta:
                delta["content"] = piece.text
            choice["delta"] = delta
        else:
            choice["text"] = piece.text
        choice["finish_reason"] = None
        return self._chunk(template, [choice])

    def reset(self, template: JSON, index: int, event: ResetEvent) -> bytes:
        empty: JSON = {"index": index, "delta": {}} if self.chat else {"index": index, "text": ""}
        empty["finish_reason"] = None
        return self._chunk(template, [empty], backtrack=reset_object(event))

    def finish(self, template: JSON, index: int, reason: str | None, rest: JSON | None = None) -> bytes:
        choice: JSON = dict(rest or {})
        choice["index"] = index
        if self.chat:
            choice.setdefault("delta", {})
        else:
            choice.setdefault("text", "")
        choice["finish_reason"] = reason
        return self._chunk(template, [choice])

    def _chunk(self, template: JSON, choices: list[JSON], **extra: Any) -> bytes:
        return data_line({**template, "choices": choices, **extra})


def data_line(obj: JSON) -> bytes:
    return encode_sse(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


DONE = b"data: [DONE]\n\n"


def error_object(message: str, kind: str = "server_error", code: str | None = None) -> JSON:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def in_band_error(message: str, kind: str = "upstream_error") -> bytes:
    """After the headers are sent, an error can only travel in the stream: the error, then [DONE]."""
    return data_line(error_object(message, kind)) + DONE


def response_text(choice: JSON, chat: bool) -> str:
    """The text of a non-streaming choice."""
    if chat:
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


def set_response_text(choice: JSON, text: str, chat: bool) -> None:
    if chat:
        message = choice.setdefault("message", {"role": "assistant"})
        message["content"] = text
    else:
        choice["text"] = text
