"""OpenAI chat completions and completions, sans-IO.

`OpenAIDecoder.feed(bytes)` turns an upstream SSE stream into events: a `Piece` per choice per chunk
(text plus everything else the choice carried, untouched), `ChoiceFinish`, `Usage`, `UpstreamFailure`
and `Done`. A chunk that is not a completion chunk (another dialect's event, a line that is not JSON)
fails the stream: what it carries cannot be judged, so none of it may reach the client. So does an
upstream that closes before `[DONE]` while a choice is unfinished: a cut answer must not pass for a
whole one. `OpenAIEncoder` turns the engine's outputs back into chunks that look like the upstream's
own: same id, model, created and unknown top-level fields.

A chunk with one choice, text and no finish (nearly every chunk of a stream) is also kept as it came
(`Forwardable`): when the engine releases its piece whole, on the first attempt, the codec sends the
upstream's own event data instead of encoding the chunk again, which is the same chunk, field for field.

Chat chunks carry text in `choices[i].delta.content`; completions chunks in `choices[i].text`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, TypeGuard

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
    model_and_stream,
    reset_object,
    trailing_assistant,
    without_trailing_assistant,
)
from proxy.dialects.lines import MAX_LINE_BYTES
from proxy.dialects.sse import SSEDecoder, SSEEvent, TooLong, encode_sse

# The neutral events are re-exported: they were born here, and callers import them from here.
__all__ = [
    "DONE", "ChoiceFinish", "ChoicePiece", "Done", "Event", "Forwardable", "OpenAICodec", "OpenAIDecoder",
    "OpenAIEncoder",
    "OpenAIRequest", "Passthrough", "UpstreamFailure", "Usage", "data_line", "error_object", "in_band_error",
    "parse_request", "reset_object", "response_text", "set_response_text",
]  # fmt: skip


class Forwardable(dict[str, Any]):
    """A piece's choice (its `Piece.extra`), as any other, that also keeps the event's data as the
    upstream sent it: the chunk whose only choice it was, without a finish or usage."""

    __slots__ = ("data", "envelope", "text")

    def __init__(self, choice: JSON, data: str, envelope: tuple[Any, Any], text: str) -> None:
        super().__init__(choice)
        self.data = data  # the SSE event's data: the upstream's JSON text of the chunk
        self.envelope = envelope  # the chunk's (id, created)
        self.text = text  # the choice's text as it came: a piece cut by a reset no longer matches it


class OpenAIDecoder:
    def __init__(self, *, chat: bool = True, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.chat = chat
        self.template: JSON = {}
        self._sse = SSEDecoder(max_line_bytes=max_line_bytes)
        self._open: set[int] = set()  # choices seen without their finish_reason yet
        self._finished = False  # a finish_reason came: with every choice finished, the answer is whole
        self._over = False  # [DONE] or a failure came: nothing after it counts

    def feed(self, data: bytes) -> list[Event]:
        return self._events(self._sse.feed(data))

    def flush(self) -> list[Event]:
        """End of the upstream's body: an answer cut short (no `[DONE]`, a choice unfinished) fails."""
        out = self._events(self._sse.flush())
        if not self._over and (self._open or not self._finished):
            self._over = True
            out.append(UpstreamFailure(_error(INCOMPLETE)))
        return out

    def _events(self, sse_events: list[SSEEvent | TooLong]) -> list[Event]:
        if self._over:
            return []
        out, self._over = decode_until_over(sse_events, self._chunk, _error)
        return out

    def _chunk(self, data: str) -> list[Event]:
        if data.strip() == "[DONE]":
            return [Done()]
        chunk = json_object(data, _error)
        if isinstance(chunk, UpstreamFailure):
            return [chunk]
        if "error" in chunk:
            err = chunk["error"]
            return [UpstreamFailure(err if isinstance(err, dict) else _error(str(err)))]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            if isinstance(chunk.get("usage"), dict) and "type" not in chunk:
                return [Usage(chunk)]
            return [UpstreamFailure(_error("upstream sent an event that is not a completion chunk"))]
        self.template = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        usage = chunk.get("usage")
        # The event can go to the client as it came only when it is one choice's piece and nothing more.
        whole = data if len(choices) == 1 and not usage else None
        out: list[Event] = []
        for choice in choices:
            delta = choice.get("delta", {}) if isinstance(choice, dict) else None
            if (
                not isinstance(choice, dict)
                or not isinstance(choice.get("index", 0), int)
                or (self.chat and delta is not None and not isinstance(delta, dict))
            ):
                return [UpstreamFailure(_error("upstream sent a malformed choice"))]
            envelope = (chunk.get("id"), chunk.get("created"))
            out += self._choice(choice, whole, envelope)
        if usage and not choices:
            out.append(Usage(chunk))
        elif usage:
            out.append(Usage({**self.template, "choices": [], "usage": usage}))
        return out

    def _choice(self, choice: JSON, data: str | None, envelope: tuple[Any, Any]) -> list[Event]:
        index = choice.get("index", 0)
        reason = choice.get("finish_reason")
        rest = {k: v for k, v in choice.items() if k != "finish_reason"}
        text = _get_text(rest, self.chat)
        out: list[Event] = []
        if text or _carries_more(rest, self.chat):
            # A finishing chunk is never sent as it came: its finish goes out with the engine's reason.
            extra = rest if data is None or reason is not None else Forwardable(rest, data, envelope, text)
            out.append(ChoicePiece(index, Piece(text, extra)))
        self._open.add(index)
        if reason is not None:
            self._open.discard(index)
            self._finished = True
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
        delta = choice.get("delta") or {}  # an object or null: `_chunk` refused anything else
        return any(v is not None for k, v in delta.items() if k != "content") or bool(choice.get("logprobs"))
    return bool(choice.get("logprobs"))


INCOMPLETE = "upstream closed the stream before it finished"


def _error(message: str, kind: str = "upstream_error") -> JSON:
    return {"message": message, "type": kind, "param": None, "code": None}


class OpenAIEncoder:
    """Builds client chunks. `template` is the decoder's view of the upstream's chunk envelope."""

    def __init__(self, *, chat: bool = True) -> None:
        self.chat = chat

    def piece(self, template: JSON, index: int, piece: Piece) -> bytes:
        choice = copy.copy(piece.extra) if isinstance(piece.extra, dict) else {"index": index}
        choice["index"] = index
        if choice.get("logprobs") is not None and piece.text != _get_text(choice, self.chat):
            # Cut by a reset: the upstream's logprobs describe text the guard dropped.
            choice["logprobs"] = None
        if self.chat:
            delta = choice.get("delta")
            delta = dict(delta) if isinstance(delta, dict) else {}
            # A tool-call delta says `"content": null`; keep it null unless there is text to carry.
            if piece.text or delta.get("content") is not None:
                delta["content"] = piece.text
            choice["delta"] = delta
        else:
            choice["text"] = piece.text
        choice["finish_reason"] = None
        return self._chunk(template, [choice])

    def reset(self, template: JSON, index: int, event: ResetEvent) -> bytes:
        empty: JSON = {"index": index, "delta": {}} if self.chat else {"index": index, "text": ""}
        empty["finish_reason"] = None
        return self._chunk(template, [empty], backtrack=reset_object(event, streamed=True))

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


def _wire(data: str) -> bytes:
    """An event's data as one SSE event again (its data lines rejoined if it had several)."""
    return f"data: {data}\n\n".encode() if "\n" not in data else encode_sse(data)


DONE = b"data: [DONE]\n\n"


def error_object(
    message: str, kind: str = "server_error", code: str | None = None, param: str | None = None
) -> JSON:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    """Replace a choice's answer with `text`, and with it every field derived from the answer it had
    (logprobs of its tokens, tool calls, a refusal, audio, reasoning): none may outlive the text."""
    if chat:
        message = choice.get("message")
        role = message.get("role", "assistant") if isinstance(message, dict) else "assistant"
        choice["message"] = {"role": role, "content": text}
    else:
        choice["text"] = text
    if "logprobs" in choice:
        choice["logprobs"] = None


@dataclass(frozen=True)
class OpenAIRequest:
    body: JSON
    chat: bool
    stream: bool
    model: str
    n: int

    @property
    def prompt(self) -> str | None:
        """The text the guard reads before the response: the last user message, or the prompt."""
        if not self.chat:
            prompt = self.body.get("prompt")
            return prompt if isinstance(prompt, str) else None
        return last_text(self.body["messages"], "user")

    @property
    def prefill(self) -> str:
        # A trailing assistant message is continued by upstreams that support it (vLLM's
        # `continue_final_message`); OpenAI itself answers after it, and then it is still the client's.
        return trailing_assistant(self.body["messages"]) if self.chat else ""

    def regenerate_body(self, instruction: str) -> JSON:
        body = copy.deepcopy(self.body)
        body["n"] = 1
        if self.chat:
            messages = without_trailing_assistant(body["messages"])
            body["messages"] = [{"role": "system", "content": instruction}, *messages]
        elif isinstance(body.get("prompt"), str):
            body["prompt"] = f"{instruction}\n\n{body['prompt']}"
        return body

    def inject_body(self, prefix: str) -> JSON | None:
        body = copy.deepcopy(self.body)
        body["n"] = 1
        if not self.chat:
            # A completion continues its prompt: the prompt is where an answer's start goes.
            if not isinstance(body.get("prompt"), str):
                return None
            body["prompt"] += prefix
            return body
        if not body.get("continue_final_message"):
            return None  # only an upstream the client already asks to continue a prefill is sent one
        body["messages"] = [
            *without_trailing_assistant(body["messages"]),
            {"role": "assistant", "content": prefix},
        ]
        return body

    def codec(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> OpenAICodec:
        return OpenAICodec(chat=self.chat, max_line_bytes=max_line_bytes)

    def answer_choices(self, answer: Any) -> list[tuple[int, str, str | None]]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise ValueError("not a completion")
        return [(c.get("index", 0), response_text(c, self.chat), c.get("finish_reason")) for c in choices]

    def set_answer_choice(self, answer: JSON, index: int, text: str | None, reason: str | None) -> None:
        for choice in answer["choices"]:
            if choice.get("index", 0) == index:
                if text is not None:  # untouched, a null content stays null
                    set_response_text(choice, text, self.chat)
                choice["finish_reason"] = reason


def parse_request(raw: bytes, *, chat: bool) -> OpenAIRequest:
    """Validate what the proxy relies on; everything else goes to the upstream untouched."""
    body = json_body(raw)
    model, stream = model_and_stream(body, stream_default=False)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise ClientError("'n' must be an integer from 1 to 128.")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError("'messages' is required and must be a non-empty array.")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ClientError("Each message must be an object with a string 'role'.")
    elif not isinstance(body.get("prompt"), str | list):
        raise ClientError("'prompt' is required and must be a string or an array.")
    return OpenAIRequest(body, chat, stream, model, n)


class OpenAICodec(Codec):
    """Chunks in, chunks out. Chunks the proxy makes copy the envelope of the upstream's latest (model,
    system_fingerprint, unknown fields) but keep the first attempt's id and created: a regenerated
    answer is still the one response."""

    def __init__(self, *, chat: bool, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.media_type = "text/event-stream"
        self.chat = chat
        self.max_line_bytes = max_line_bytes
        self.encoder = OpenAIEncoder(chat=chat)
        self.decoder = OpenAIDecoder(chat=chat, max_line_bytes=max_line_bytes)
        self.identity: JSON = {}
        self.template: JSON = {}
        self.role_sent: set[int] = set()  # choices whose role the client has; a regeneration repeats it
        self.attempts = 0

    def begin_attempt(self) -> None:
        self.decoder = OpenAIDecoder(chat=self.chat, max_line_bytes=self.max_line_bytes)
        self.attempts += 1

    def feed(self, data: bytes) -> list[Event]:
        return self._envelope(self.decoder.feed(data))

    def flush(self) -> list[Event]:
        return self._envelope(self.decoder.flush())

    def _envelope(self, events: list[Event]) -> list[Event]:
        if not self.identity:
            self.identity = {k: v for k, v in self.decoder.template.items() if k in ("id", "created")}
        if self.decoder.template:
            self.template = {**self.decoder.template, **self.identity}
        return events

    def piece(self, index: int, piece: Piece) -> bytes:
        extra = piece.extra
        if index in self.role_sent:
            extra = _without_role(extra)  # SDKs concatenate a repeated role: "assistantassistant"
        elif isinstance(extra, dict) and "role" in (extra.get("delta") or {}):
            self.role_sent.add(index)
        if self._as_it_came(index, piece, extra):
            return _wire(extra.data)
        return self.encoder.piece(self.template, index, Piece(piece.text, extra, piece.received))

    def _as_it_came(self, index: int, piece: Piece, extra: Any) -> TypeGuard[Forwardable]:
        """Whether the upstream's own chunk is the one the encoder would build: the piece is whole,
        its role is not a repeat (`_without_role` gave a copy), and the first attempt gave it (later
        ones take the first attempt's id, and may stand in for another choice index)."""
        return (
            type(extra) is Forwardable
            and extra is piece.extra
            and extra.text == piece.text
            and self.attempts <= 1
            and extra.get("index", 0) == index
            and extra.envelope == (self.identity.get("id"), self.identity.get("created"))
        )

    def reset(self, index: int, event: ResetEvent) -> bytes:
        notice = self.piece(index, Piece(event.notice)) if event.notice else b""
        return self.encoder.reset(self.template, index, event) + notice

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        return self.encoder.finish(self.template, index, reason, rest)

    def passthrough(self, event: Usage | Passthrough) -> bytes:
        if isinstance(event, Usage):
            return data_line({**event.chunk, **self.identity})
        return data_line(event.chunk)

    def error(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        if upstream is not None:
            return data_line({"error": upstream}) + DONE
        return in_band_error(message, kind)

    def end(self) -> bytes:
        return DONE


def _without_role(choice: Any) -> Any:
    """A streamed choice without the `role` of its delta."""
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict) or "role" not in delta:
        return choice
    return {**choice, "delta": {k: v for k, v in delta.items() if k != "role"}}
