"""Ollama `/api/chat` and `/api/generate`, sans-IO.

The stream is NDJSON: lines with `"done": false` carry text (`message.content` for chat, `response` for
generate) and whatever else rode with it (`thinking`, `tool_calls`, `logprobs`); a last line with
`"done": true` carries `done_reason` and the counters (`eval_count`, durations, generate's `context`).
An error is a line `{"error": "..."}`. One choice, index 0.

A reset rides on an otherwise ordinary line with empty text, `"done": false` and DESIGN.md's `backtrack`
object, so the official client (which builds a model from every line and ignores unknown keys) keeps
reading. The final line waits until the end: after an early finish (a refusal) the upstream's counters
still come, and the client gets one `done` line with them: only the counters of the upstream's done
line, whose text and what rode with it (thinking, tool calls, logprobs) travel before it as a piece.
When the answer was reset or cut, generate's `context` is left out: it would encode the discarded text
for the next request to continue. A body that ends before its `done` line was cut short and fails.
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
from proxy.dialects.lines import MAX_LINE_BYTES
from proxy.dialects.ndjson import BadLine, Line, NDJSONDecoder, TooLong, encode_line

MEDIA_TYPE = "application/x-ndjson"
INCOMPLETE = "upstream closed the stream before it finished"
# What a done line carries besides its counters: the answer's, which travels as a piece.
ANSWER_FIELDS = ("message", "response", "thinking", "logprobs")


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

    def codec(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> OllamaCodec:
        return OllamaCodec(self.model, chat=self.chat, max_line_bytes=max_line_bytes)

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
            # Everything else the answer carried is the dropped answer's: its thinking, tool calls,
            # logprobs, and generate's `context` (its tokens, for the next request to continue).
            for key in ("context", "thinking", "logprobs"):
                answer.pop(key, None)
            if self.chat:
                message = answer.get("message")
                role = message.get("role", "assistant") if isinstance(message, dict) else "assistant"
                answer["message"] = {"role": role, "content": text}
            else:
                answer["response"] = text
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
    def __init__(self, model: str, *, chat: bool, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.media_type = MEDIA_TYPE
        self.chat = chat
        self.max_line_bytes = max_line_bytes
        self._lines = NDJSONDecoder(max_line_bytes=max_line_bytes)
        self._over = False  # the attempt's done line or a failure came: nothing after it counts
        # The envelope of lines the proxy makes: the upstream's latest model and created_at.
        self.template: JSON = {"model": model}
        self.final: JSON | None = None  # the upstream's done line (its counters)
        self.reason: str | None = None
        self.was_reset = False

    # -- decoding ------------------------------------------------------------------------------------

    def begin_attempt(self) -> None:
        self._lines = NDJSONDecoder(max_line_bytes=self.max_line_bytes)
        self._over = False

    def feed(self, data: bytes) -> list[Event]:
        return self._events(self._lines.feed(data))

    def flush(self) -> list[Event]:
        """End of the upstream's body: an answer without its `done` line was cut short."""
        out = self._events(self._lines.flush())
        if not self._over:
            self._over = True
            out.append(UpstreamFailure({"message": INCOMPLETE}))
        return out

    def _events(self, lines: list[Line | BadLine | TooLong]) -> list[Event]:
        out: list[Event] = []
        for line in lines:
            if self._over:
                break
            events = self._line(line)
            self._over = any(isinstance(e, UpstreamFailure | Done) for e in events)
            out += events
        return out

    def _line(self, line: Line | BadLine | TooLong) -> list[Event]:
        if isinstance(line, TooLong):
            return [UpstreamFailure({"message": line.message})]
        if isinstance(line, BadLine):
            # Never quoted: the bytes are unjudged text, and an error message is text the client sees.
            return [UpstreamFailure({"message": "upstream sent a malformed line (not JSON)"})]
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
        if text or _carries_more(value, self.chat):
            rest = {k: v for k, v in value.items() if k not in ("done_reason", "context")}
            out.append(ChoicePiece(0, Piece(text, {**rest, "done": False})))
        self.final = {k: v for k, v in value.items() if k not in ANSWER_FIELDS}
        reason = value.get("done_reason")
        return [*out, ChoiceFinish(0, reason if isinstance(reason, str) else None, value), Done()]

    # -- encoding ------------------------------------------------------------------------------------

    def piece(self, index: int, piece: Piece) -> bytes:
        line = copy.deepcopy(piece.extra) if isinstance(piece.extra, dict) else self._empty()
        if line.get("logprobs") is not None and piece.text != (_text(line, self.chat) or ""):
            line.pop("logprobs")  # cut by a reset: they describe text the guard dropped
        _set_text(line, piece.text, self.chat)
        return encode_line(line)

    def reset(self, index: int, event: ResetEvent) -> bytes:
        self.was_reset = True
        out = encode_line({**self._empty(), "backtrack": reset_object(event, streamed=True)})
        return out + self.piece(index, Piece(event.notice)) if event.notice else out

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
        upstream_reason = line.get("done_reason")
        line["done_reason"] = self.reason if self.reason is not None else upstream_reason
        if self.was_reset or line["done_reason"] != upstream_reason:
            line.pop("context", None)
        return encode_line(line)

    def _empty(self) -> JSON:
        line = {**self.template}
        _set_text(line, "", self.chat)
        line["done"] = False
        return line
