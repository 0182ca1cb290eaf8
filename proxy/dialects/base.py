"""What every dialect provides: the neutral events its decoder yields and the interfaces the relay drives.

A dialect module (`openai`, `anthropic`, `ollama`) is sans-IO. It parses the client's request into a
`DialectRequest` (the prompt and any client-supplied assistant prefill for the guard, and the bodies to
send upstream for a first try, a regeneration or an injected `[RESET]`), and gives a `Codec` per
streamed response: upstream bytes in, neutral `Event`s out; engine outputs in, the client's bytes out.
Everything the proxy does not read rides along untouched in `Piece.extra`, `ChoiceFinish.choice` or
`Passthrough.chunk`, so that the encoder can rebuild the upstream's own messages around released text.

Two rules bound what rides along. A message the decoder does not know is never passed on unjudged: it
is dropped, or fails the stream (`UpstreamFailure`) when the stream is not in the dialect at all. And an
upstream body that ends before the dialect's terminator fails at `flush()`, so the relay ends the
client's stream with an in-band error instead of passing a cut answer off as a whole one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.core.engine import Piece, ResetEvent
from proxy.core.errors import ClientError
from proxy.dialects.lines import MAX_LINE_BYTES, TooLong
from proxy.dialects.sse import SSEEvent

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChoicePiece:
    index: int
    piece: Piece  # piece.extra is the upstream's message for this delta; its text is replaced on encode


@dataclass(frozen=True, slots=True)
class ChoiceFinish:
    index: int
    reason: str | None
    choice: JSON  # the rest of the finishing message (logprobs, counters, usage, ...) passed through


@dataclass(frozen=True, slots=True)
class Usage:
    chunk: JSON


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    error: JSON  # the upstream's in-band error object, or one describing a malformed stream


@dataclass(frozen=True, slots=True)
class Passthrough:
    chunk: JSON  # a message known to carry no answer text (a ping, a message_start): sent on as it came


@dataclass(frozen=True, slots=True)
class Done:
    pass


Event = ChoicePiece | ChoiceFinish | Usage | UpstreamFailure | Passthrough | Done


@dataclass(frozen=True, slots=True)
class Prefill:
    """`Piece.extra` of the client's own assistant text: the guard reads it, the client is not sent it."""


PREFILL = Prefill()


class Codec(Protocol):
    """One streamed response in one dialect: decodes upstream attempts, encodes what the client gets."""

    media_type: str  # of the upstream's stream and of the client's

    def begin_attempt(self) -> None:
        """A new upstream response (the first, or a regenerated one) starts: decode it afresh."""

    def feed(self, data: bytes) -> list[Event]: ...

    def flush(self) -> list[Event]: ...

    def piece(self, index: int, piece: Piece) -> bytes:
        """Released text (and what rode with it) of choice `index`."""

    def reset(self, index: int, event: ResetEvent) -> bytes: ...

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        """Choice `index` ends with the engine's `reason`; `rest` is the upstream's finishing message
        when the reason is the upstream's own."""

    def passthrough(self, event: Usage | Passthrough) -> bytes: ...

    def error(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        """An in-band error that ends the stream (the headers are gone; no status can change)."""

    def end(self) -> bytes:
        """Every choice has finished: close the stream the dialect's way."""


class DialectRequest(Protocol):
    """A client's request as the relay needs it; the body goes upstream untouched on the first try."""

    # Read-only: the requests are frozen dataclasses.
    @property
    def body(self) -> JSON: ...

    @property
    def stream(self) -> bool: ...

    @property
    def model(self) -> str: ...

    @property
    def n(self) -> int: ...

    @property
    def prompt(self) -> str | None:
        """The text the guard reads before the response (the last user message)."""

    @property
    def prefill(self) -> str:
        """Client-supplied assistant text the upstream continues: the start of the response."""

    def regenerate_body(self, instruction: str) -> JSON:
        """The request to ask again with the policy's safety instruction, one answer, no prefill."""

    def inject_body(self, prefix: str) -> JSON | None:
        """The request that hands `prefix` (ending in `[RESET]`) to the upstream as the start of its
        answer; None where the dialect has no prefill (the relay regenerates instead)."""

    def codec(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> Codec:
        """The codec of a streamed answer; a line of the upstream's stream over `max_line_bytes` fails it."""

    def answer_choices(self, answer: Any) -> list[tuple[int, str, str | None]]:
        """(index, text, finish reason) of each choice of a non-streamed answer. Raises ValueError
        when the answer is not one."""

    def set_answer_choice(self, answer: JSON, index: int, text: str | None, reason: str | None) -> None:
        """Write the guarded text (None: unchanged) and the engine's finish reason into the answer.

        A changed text replaces the choice's answer whole: every field that repeats or encodes the
        upstream's text (logprobs, token context, other content blocks, tool calls) goes with it."""


def message_text(content: Any, where: str = "content") -> str:
    """The text of a message's content: a string, or the text parts of a list of parts.

    Raises `ClientError` naming `where` for a content that is neither, or a text part whose `text` is
    not a string: such a request is the client's mistake, never an internal error."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ClientError(f"'{where}' must be a string or a list of parts.")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise ClientError(f"'{where}' parts must be objects.")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ClientError(f"'{where}' text parts need a string 'text'.")
            texts.append(text)
    return "".join(texts)


def last_text(messages: list[Any], role: str) -> str | None:
    """The text of the last message with `role`, or None."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == role:
            return message_text(message.get("content"))
    return None


def trailing_assistant(messages: list[Any]) -> str:
    """The text of a final assistant message, which the upstream continues; "" if the last is not one."""
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        return message_text(last.get("content"))
    return ""


def without_trailing_assistant(messages: list[Any]) -> list[Any]:
    """The messages without a final assistant prefill (a regeneration must not continue the attack)."""
    last = messages[-1] if messages else None
    return messages[:-1] if isinstance(last, dict) and last.get("role") == "assistant" else list(messages)


def reset_object(event: ResetEvent, *, streamed: bool = False) -> JSON:
    """The `backtrack` object of DESIGN.md's reset contract.

    `streamed`: it goes out in a stream, where the event's notice (if any) follows it as text:
    `notice_chars` says how long it is, so that a mending client can skip it. A non-streamed answer
    never carries the notice, nor the field."""
    obj: JSON = {
        "event": "reset",
        "retract_chars": event.retract_chars,
        "category": event.category,
        "policy": event.policy,
        "score": round(event.score, 4),
    }
    if streamed and event.notice:
        obj["notice_chars"] = len(event.notice)
    return obj


def backtrack_summary(resets: list[JSON]) -> JSON:
    """The `backtrack` object of a non-streamed answer: its one reset, or all of them."""
    return resets[0] if len(resets) == 1 else {"event": "resets", "resets": resets}


def json_body(raw: bytes) -> JSON:
    """A request body as a JSON object, or the `ClientError` that says why it is not one."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ClientError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ClientError("The request body must be a JSON object.")
    return body


def model_and_stream(body: JSON, *, stream_default: bool) -> tuple[str, bool]:
    """The fields every dialect's request has: `model`, and whether to stream (each API's default)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ClientError("'model' is required and must be a non-empty string.")
    stream = body.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise ClientError(f"'stream' must be a boolean, not {type(stream).__name__}.")
    return model, stream


def decode_until_over(
    items: Iterable[SSEEvent | TooLong], decode: Callable[[str], list[Event]], error: Callable[[str], JSON]
) -> tuple[list[Event], bool]:
    """An event stream's events, each `decode`d, up to and with the first that ends it (a `Done` or an
    `UpstreamFailure`: nothing after it counts); and whether one did. An over-long line is a failure."""
    out: list[Event] = []
    for item in items:
        events = [UpstreamFailure(error(item.message))] if isinstance(item, TooLong) else decode(item.data)
        out += events
        if any(isinstance(e, UpstreamFailure | Done) for e in events):
            return out, True
    return out, False


def json_object(data: str, error: Callable[[str], JSON]) -> JSON | UpstreamFailure:
    """An event's data as a JSON object, or the failure that ends the stream. The data is never quoted:
    it is unjudged text, and an error message is text the client sees."""
    try:
        obj = json.loads(data)
    except ValueError:
        return UpstreamFailure(error("upstream sent a malformed event (not JSON)"))
    if not isinstance(obj, dict):
        return UpstreamFailure(error("upstream sent an event that is not a JSON object"))
    return obj
