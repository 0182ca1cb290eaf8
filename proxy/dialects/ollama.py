"""Ollama `/api/chat` and `/api/generate`, sans-IO.

The stream is NDJSON: lines with `"done": false` carry text (`message.content` for chat, `response` for
generate) and whatever else rode with it (`thinking`, `tool_calls`, `logprobs`); a last line with
`"done": true` carries `done_reason` and the counters (`eval_count`, durations, generate's `context`).
An error is a line `{"error": "..."}`. One choice, index 0.

A reset rides on an otherwise ordinary line with empty text, `"done": false` and DESIGN.md's `backtrack`
object, so the official client (which builds a model from every line and ignores unknown keys) keeps
reading. The final line waits until the end: after an early finish (a refusal) the upstream's counters
still come, and the client gets one `done` line with them. When the answer was reset, generate's
`context` is left out: it would encode the discarded text for the next request to continue.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from proxy.core.engine import Piece, ResetEvent
from proxy.core.errors import ClientError
from proxy.dialects.base import (
    JSON,
    ChoiceFinish,
    ChoicePiece,
    Codec,
    Done,
    Event,
    Passthrough,
    UpstreamFailure,
    Usage,
    json_body,
    last_text,
    model_and_stream,
    reset_object,
    trailing_assistant,
    without_trailing_assistant,
)
from proxy.dialects.ndjson import BadLine, NDJSONDecoder, encode_line

MEDIA_TYPE = "application/x-ndjson"


def error_object(message: str, status: int = 500) -> JSON:
    """Ollama's error body: `{"error": "..."}` (the status, which other dialects name, goes unsaid)."""
    return {"error": message}


@dataclass(frozen=True)
class OllamaRequest:
    body: JSON
    chat: bool
    stream: bool
    model: str
    n: int = 1

    @property
    def prompt(self) -> str | None:
        if self.chat:
            return last_text(self.body["messages"], "user")
        prompt = self.body.get("prompt")
        return prompt if isinstance(prompt, str) else None

    @property
    def prefill(self) -> str:
        # Ollama continues a trailing assistant message; generate has nothing of the kind.
        return trailing_assistant(self.body["messages"]) if self.chat else ""

    def regenerate_body(self, instruction: str) -> JSON:
        body = copy.deepcopy(self.body)
        if self.chat:
            messages = without_trailing_assistant(body["messages"])
            body["messages"] = [{"role": "system", "content": instruction}, *messages]
        else:
            # `system` would replace the model's own system prompt; the prompt keeps it.
            body["prompt"] = f"{instruction}\n\n{body.get('prompt') or ''}"
        return body

    def inject_body(self, prefix: str) -> JSON | None:
        if not self.chat:
            return None  # a generate prompt is the user's turn: text put there is not the answer's
        body = copy.deepcopy(self.body)
        body["messages"] = [
            *without_trailing_assistant(body["messages"]),
            {"role": "assistant", "content": prefix},
        ]
        return body

    def codec(self) -> OllamaCodec:
        return OllamaCodec(self.model, chat=self.chat)

    def answer_choices(self, answer: Any) -> list[tuple[int, str, str | None]]:
        if not isinstance(answer, dict) or "error" in answer:
            raise ValueError("not an answer")
        text = _text(answer, self.chat)
        if text is None:
            raise ValueError("an answer without text")
        reason = answer.get("done_reason")
        return [(0, text, reason if isinstance(reason, str) else None)]

    def set_answer_choice(self, answer: JSON, index: int, text: str | None, reason: str | None) -> None:
        if text is not None:
            _set_text(answer, text, self.chat)
            answer.pop("context", None)
        answer["done_reason"] = reason


def parse_request(raw: bytes, *, chat: bool) -> OllamaRequest:
    """Validate what the proxy relies on; everything else goes to the upstream untouched."""
    body = json_body(raw)
    model, stream = model_and_stream(body, stream_default=True)  # Ollama streams unless told not to
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError("messages is required and must be a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ClientError("each message must be an object with a string role")
    elif not isinstance(body.get("prompt"), str):
        raise ClientError("prompt is required and must be a string")
    return OllamaRequest(body, chat, stream, model)


def _text(line: JSON, chat: bool) -> str | None:
    if chat:
        message = line.get("message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = line.get("response")
    return content if isinstance(content, str) else None


def _set_text(line: JSON, text: str, chat: bool) -> None:
    if chat:
        message = line.get("message")
        line["message"] = {
            **(message if isinstance(message, dict) else {"role": "assistant"}),
            "content": text,
        }
    else:
        line["response"] = text


def _carries_more(line: JSON, chat: bool) -> bool:
    """Whether a line without text still has something for the client (thinking, tool calls, ...)."""
    message = line.get("message") if chat else None
    if isinstance(message, dict) and any(v for k, v in message.items() if k not in ("role", "content")):
        return True
    return bool(line.get("thinking") or line.get("logprobs"))


class OllamaCodec(Codec):
    def __init__(self, model: str, *, chat: bool) -> None:
        self.media_type = MEDIA_TYPE
        self.chat = chat
        self._lines = NDJSONDecoder()
        # The envelope of lines the proxy makes: the upstream's latest model and created_at.
        self.template: JSON = {"model": model}
        self.final: JSON | None = None  # the upstream's done line (its counters)
        self.reason: str | None = None
        self.was_reset = False

    # -- decoding ------------------------------------------------------------------------------------

    def begin_attempt(self) -> None:
        self._lines = NDJSONDecoder()

    def feed(self, data: bytes) -> list[Event]:
        return [e for line in self._lines.feed(data) for e in self._line(line)]

    def flush(self) -> list[Event]:
        return [e for line in self._lines.flush() for e in self._line(line)]

    def _line(self, line: Any) -> list[Event]:
        if isinstance(line, BadLine):
            return [UpstreamFailure({"message": f"upstream sent a malformed line: {line.text!r}"})]
        value = line.value
        if not isinstance(value, dict):
            return [UpstreamFailure({"message": "upstream sent a line that is not a JSON object"})]
        if "error" in value:
            return [UpstreamFailure({"message": str(value["error"])})]
        self.template = {k: value[k] for k in ("model", "created_at") if k in value} or self.template
        text = _text(value, self.chat) or ""
        out: list[Event] = []
        if not value.get("done"):
            if text or _carries_more(value, self.chat):
                out.append(ChoicePiece(0, Piece(text, value)))
            return out
        if text:
            rest = copy.deepcopy(value)
            _set_text(rest, text, self.chat)
            out.append(ChoicePiece(0, Piece(text, {**rest, "done": False})))
        self.final = value
        reason = value.get("done_reason")
        return [*out, ChoiceFinish(0, reason if isinstance(reason, str) else None, value), Done()]

    # -- encoding ------------------------------------------------------------------------------------

    def piece(self, index: int, piece: Piece) -> bytes:
        line = copy.deepcopy(piece.extra) if isinstance(piece.extra, dict) else self._empty()
        _set_text(line, piece.text, self.chat)
        return encode_line(line)

    def reset(self, index: int, event: ResetEvent) -> bytes:
        self.was_reset = True
        return encode_line({**self._empty(), "backtrack": reset_object(event)})

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        self.reason = reason
        return b""

    def passthrough(self, event: Usage | Passthrough) -> bytes:
        return encode_line(event.chunk)

    def error(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        return encode_line(error_object(str((upstream or {}).get("message") or message)))

    def end(self) -> bytes:
        line = dict(self.final) if self.final is not None else {**self.template}
        _set_text(line, "", self.chat)
        line["done"] = True
        line["done_reason"] = self.reason if self.reason is not None else line.get("done_reason")
        if self.was_reset:
            line.pop("context", None)
        return encode_line(line)

    def _empty(self) -> JSON:
        line = {**self.template}
        _set_text(line, "", self.chat)
        line["done"] = False
        return line
