"""Anthropic Messages (`/v1/messages`), sans-IO.

The stream is SSE: `message_start`, then per content block `content_block_start`, `content_block_delta`s
and `content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`; `ping` and
`error` may come at any time. A message has one "choice" (index 0) and many blocks: only `text_delta`s
carry text the guard reads. Every block event travels through the engine as a piece (empty unless it is
text) so it reaches the client in its place after the text held back before it; `thinking`, signature
and `input_json` deltas thus pass through unjudged but in order.

The client's block indices are the encoder's: a regenerated attempt starts its blocks after the ones the
client already has (the SDK appends blocks by position), and text the engine makes (a refusal) goes into
the open text block, or a new one. A reset is an extra event, `event: backtrack_reset`, whose data is
DESIGN.md's `backtrack` object plus `"type": "backtrack_reset"` (the SDK reads every event's `type`).

Only events known to carry no answer text pass on unjudged (`message_start`, its content emptied, and
`ping`); an event or delta type newer than this code is dropped, and data that is not an Anthropic event
at all (an OpenAI chunk, a line that is not JSON) fails the stream, as does a body that ends before
`message_stop`.
"""

from __future__ import annotations

import copy
import json
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
    decode_until_over,
    json_body,
    json_object,
    last_text,
    message_text,
    model_and_stream,
    reset_object,
    trailing_assistant,
    without_trailing_assistant,
)
from proxy.dialects.lines import MAX_LINE_BYTES
from proxy.dialects.sse import SSEDecoder, SSEEvent, TooLong, encode_sse

MEDIA_TYPE = "text/event-stream"
RESET_EVENT = "backtrack_reset"
# The engine speaks OpenAI's finish reasons; a message's stop reasons are Anthropic's.
STOP_REASONS = {"stop": "end_turn", "content_filter": "refusal"}
# Anthropic names its errors by status; any other 5xx is its generic "api_error".
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error",
}  # fmt: skip
# The deltas of the blocks the proxy knows; only `text_delta` carries text the guard reads.
DELTA_TYPES = {"text_delta", "thinking_delta", "signature_delta", "input_json_delta", "citations_delta"}
INCOMPLETE = "upstream closed the stream before it finished"


def stop_reason(reason: str | None) -> str | None:
    return STOP_REASONS.get(reason, reason) if reason is not None else None


def error_object(message: str, status: int = 500) -> JSON:
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


@dataclass(frozen=True)
class MessagesRequest:
    body: JSON
    stream: bool
    model: str
    n: int = 1

    @property
    def prompt(self) -> str | None:
        return last_text(self.body["messages"], "user")

    @property
    def prefill(self) -> str:
        return trailing_assistant(self.body["messages"])

    def regenerate_body(self, instruction: str) -> JSON:
        body = copy.deepcopy(self.body)
        body["messages"] = without_trailing_assistant(body["messages"])
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [{"type": "text", "text": instruction}, *system]
        else:
            body["system"] = (
                f"{instruction}\n\n{system}" if isinstance(system, str) and system else instruction
            )
        return body

    def inject_body(self, prefix: str) -> JSON | None:
        body = copy.deepcopy(self.body)
        body["messages"] = [
            *without_trailing_assistant(body["messages"]),
            {"role": "assistant", "content": prefix},
        ]
        return body

    def codec(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> AnthropicCodec:
        return AnthropicCodec(self.model, max_line_bytes=max_line_bytes)

    def answer_choices(self, answer: Any) -> list[tuple[int, str, str | None]]:
        content = answer.get("content") if isinstance(answer, dict) else None
        if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
            raise ValueError("not a message")
        return [(0, message_text(content), answer.get("stop_reason"))]

    def set_answer_choice(self, answer: JSON, index: int, text: str | None, reason: str | None) -> None:
        if text is not None:
            # The answer was reset: all of it (thinking, tool calls, citations) is the dropped answer's,
            # and the guarded text is the whole answer now.
            answer["content"] = [{"type": "text", "text": text}] if text else []
            answer["stop_sequence"] = None
        answer["stop_reason"] = stop_reason(reason)


def parse_request(raw: bytes) -> MessagesRequest:
    """Validate what the proxy relies on; everything else goes to the upstream untouched."""
    body = json_body(raw)
    model, stream = model_and_stream(body, stream_default=False)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError("messages: Field required (a non-empty array).")
    if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in messages):
        raise ClientError("messages: each message must be an object whose role is 'user' or 'assistant'.")
    return MessagesRequest(body, stream, model)


class AnthropicCodec(Codec):
    def __init__(self, model: str, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.media_type = MEDIA_TYPE
        self.model = model
        self.max_line_bytes = max_line_bytes
        self._sse = SSEDecoder(max_line_bytes=max_line_bytes)
        self._over = False  # the attempt's message_stop or a failure came: nothing after it counts
        self.started = False  # the client has its message_start
        self.blocks: dict[int, int] = {}  # the attempt's block index -> the client's
        self.open: int | None = None  # the client's block that has a start and no stop yet
        self.open_type = ""
        self.next_block = 0
        self.reason: str | None = None
        self.final: JSON | None = None  # the upstream's message_delta (its usage)

    # -- decoding ------------------------------------------------------------------------------------

    def begin_attempt(self) -> None:
        self._sse = SSEDecoder(max_line_bytes=self.max_line_bytes)
        self._over = False
        self.blocks = {}

    def feed(self, data: bytes) -> list[Event]:
        return self._events(self._sse.feed(data))

    def flush(self) -> list[Event]:
        """End of the upstream's body: a message without its `message_stop` was cut short."""
        out = self._events(self._sse.flush())
        if not self._over:
            self._over = True
            out.append(UpstreamFailure(_error(INCOMPLETE)))
        return out

    def _events(self, sse_events: list[SSEEvent | TooLong]) -> list[Event]:
        if self._over:
            return []
        out, self._over = decode_until_over(sse_events, self._event, _error)
        return out

    def _event(self, data: str) -> list[Event]:
        event = json_object(data, _error)
        if isinstance(event, UpstreamFailure):
            return [event]
        kind = event.get("type")
        if not isinstance(kind, str):
            return [UpstreamFailure(_error("upstream sent an event that is not an Anthropic event"))]
        if kind == "content_block_start":
            block = event.get("content_block")
            text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else ""
            return [ChoicePiece(0, Piece(text if isinstance(text, str) else "", event))]
        if kind == "content_block_delta":
            delta = event.get("delta")
            if not isinstance(delta, dict) or delta.get("type") not in DELTA_TYPES:
                return []  # newer than this code: it may carry text, and nothing judges it
            text = delta.get("text") if delta.get("type") == "text_delta" else ""
            return [ChoicePiece(0, Piece(text if isinstance(text, str) else "", event))]
        if kind == "content_block_stop":
            return [ChoicePiece(0, Piece("", event))]
        if kind == "message_delta":
            self.final = event
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            return [ChoiceFinish(0, reason if isinstance(reason, str) else None, event)]
        if kind == "message_stop":
            return [Done()]
        if kind == "error":
            error = event.get("error")
            return [UpstreamFailure(error if isinstance(error, dict) else _error(str(error)))]
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict) and message.get("content"):
                event = {**event, "message": {**message, "content": []}}  # its text would go unjudged
            return [Passthrough(event)]
        if kind == "ping":
            return [Passthrough(event)]
        return []  # an event newer than this code: it may carry text, and nothing judges it

    # -- encoding ------------------------------------------------------------------------------------

    def piece(self, index: int, piece: Piece) -> bytes:
        out = self._start()
        event = piece.extra if isinstance(piece.extra, dict) else None
        kind = event.get("type") if event is not None else None
        if event is None:
            out += self._engine_text(piece.text)
        elif kind == "content_block_start":
            out += self._close()
            client = self.blocks[event.get("index", 0)] = self.next_block
            self.next_block += 1
            block = dict(event.get("content_block") or {})
            if block.get("type") == "text":
                block["text"] = piece.text
            self.open, self.open_type = client, str(block.get("type"))
            out += _sse({**event, "index": client, "content_block": block})
        elif kind == "content_block_delta":
            mapped = self.blocks.get(event.get("index", 0))
            if mapped is None:  # its start was dropped with an abandoned attempt
                return out + self._engine_text(piece.text)
            delta = dict(event.get("delta") or {})
            if delta.get("type") == "text_delta":
                delta["text"] = piece.text
            out += _sse({**event, "index": mapped, "delta": delta})
        elif kind == "content_block_stop" and self.blocks.get(event.get("index", 0)) == self.open:
            out += self._close()
        return out

    def reset(self, index: int, event: ResetEvent) -> bytes:
        obj = {"type": RESET_EVENT, **reset_object(event, streamed=True)}
        out = self._start() + encode_sse(_json(obj), RESET_EVENT)
        return out + self._engine_text(event.notice) if event.notice else out

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        # The message_delta waits for end(): the upstream's usage may still come after an early finish.
        self.reason = reason
        return self._start() + self._close()

    def passthrough(self, event: Usage | Passthrough) -> bytes:
        chunk = event.chunk
        if chunk.get("type") == "message_start":
            if self.started:
                return b""  # a regenerated attempt: the client has its message already
            self.started = True
        return _sse(chunk)

    def error(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        body = {"type": "error", "error": upstream} if upstream else error_object(message)
        return self._start() + _sse(body)

    def end(self) -> bytes:
        out = self._start() + self._close()
        final = self.final or {}
        given = final.get("delta")
        delta: JSON = given if isinstance(given, dict) else {}
        reason = stop_reason(self.reason) if self.reason is not None else delta.get("stop_reason")
        upstream_reason = delta.get("stop_reason")
        message_delta = {
            **final,
            "type": "message_delta",
            "delta": {
                **delta,
                "stop_reason": reason,
                "stop_sequence": delta.get("stop_sequence") if reason == upstream_reason else None,
            },
            "usage": final.get("usage") or {"output_tokens": 0},
        }
        return out + _sse(message_delta) + _sse({"type": "message_stop"})

    def _start(self) -> bytes:
        """The message_start, made up here when the upstream's has not come (nothing to copy)."""
        if self.started:
            return b""
        self.started = True
        message: JSON = {
            "id": "msg_backtrack", "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        return _sse({"type": "message_start", "message": message})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        index, self.open = self.open, None
        return _sse({"type": "content_block_stop", "index": index})

    def _engine_text(self, text: str) -> bytes:
        """Text the engine made (a refusal): into the open text block, or a new one."""
        if not text:
            return b""
        out = b""
        if self.open is None or self.open_type != "text":
            out += self._close()
            self.open, self.open_type = self.next_block, "text"
            self.next_block += 1
            out += _sse({"type": "content_block_start", "index": self.open,
                         "content_block": {"type": "text", "text": ""}})  # fmt: skip
        delta = {"type": "text_delta", "text": text}
        return out + _sse({"type": "content_block_delta", "index": self.open, "delta": delta})


def _error(message: str) -> JSON:
    return {"type": "api_error", "message": message}


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(event: JSON) -> bytes:
    """An event named by its `type`, as Anthropic writes them."""
    return encode_sse(_json(event), str(event.get("type", "message")))
