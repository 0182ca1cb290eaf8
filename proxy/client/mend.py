"""Mend a guarded stream: the text a person should see, with Backtrack's resets applied.

The official SDKs pass Backtrack's reset events through without acting on them, so a UI that shows
their text keeps the text the proxy withdrew. `mend(stream)` (and `amend` for async streams) wraps a
streaming iterator of any of them and yields a `View` per chunk: the display text so far, mended, and
the reset event when the chunk carried one. At a reset the last `retract_chars` characters are erased,
the next `notice_chars` characters of text (the policy's visible notice for clients that cannot mend)
are skipped, and what follows is appended.

What it reads, chunk by chunk (SDK objects, or the same messages as plain parsed JSON):

- openai: `chat.completions.create(..., stream=True)` and `completions.create(..., stream=True)`
  chunks; the SDK keeps the unknown top-level `backtrack` object among the chunk's extra fields.
- anthropic: the raw events of `messages.create(..., stream=True)`; the SDK yields the unknown
  `backtrack_reset` event as an object with `type == "backtrack_reset"` and the reset's fields.
- ollama: `/api/chat` and `/api/generate` NDJSON lines with their `backtrack` key. The official ollama
  client drops keys it does not know, so give `mend` the parsed lines (`json.loads` of each) instead.

Pure Python: it imports none of the SDKs and nothing of the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Mender", "View", "amend", "mend"]

ANTHROPIC_RESET = "backtrack_reset"


@dataclass(frozen=True, slots=True)
class View:
    """The display after one chunk."""

    text: str  # choice `index`'s text as a person should see it now
    event: dict[str, Any] | None = None  # the reset object this chunk carried, as on the wire
    index: int = 0  # the choice this chunk was about (OpenAI `n > 1`; 0 elsewhere)
    finish_reason: str | None = None  # set by the chunk that ends the choice (Anthropic: stop_reason)
    chunk: Any = None  # the chunk itself, for anything else it carries


@dataclass(slots=True)
class _Choice:
    text: str
    skip: int = 0  # notice characters still to leave out


@dataclass(slots=True)
class Mender:
    """The state of one mended stream; `feed` each chunk in order. `prefill`: the assistant text the
    request ended with, which the display starts with (a reset may retract it)."""

    prefill: str = ""
    choices: dict[int, _Choice] = field(default_factory=dict)

    def text(self, index: int = 0) -> str:
        return self._choice(index).text

    def feed(self, chunk: Any) -> View:
        data = _as_dict(chunk)
        index, event, deltas, finish = _read(data)
        if event is not None:
            self._reset(index, event)
        for i, delta in deltas:
            self._append(i, delta)
        return View(self.text(index), event, index, finish, chunk)

    def _choice(self, index: int) -> _Choice:
        return self.choices.setdefault(index, _Choice(self.prefill))

    def _reset(self, index: int, event: Mapping[str, Any]) -> None:
        choice = self._choice(index)
        retract = min(max(int(event.get("retract_chars") or 0), 0), len(choice.text))
        choice.text = choice.text[: len(choice.text) - retract]
        choice.skip = max(int(event.get("notice_chars") or 0), 0)

    def _append(self, index: int, delta: str) -> None:
        choice = self._choice(index)
        skipped = min(choice.skip, len(delta))
        choice.skip -= skipped
        choice.text += delta[skipped:]


def mend(stream: Iterable[Any], *, prefill: str = "") -> Iterator[View]:
    """A `View` per chunk of a streaming iterator of the openai, anthropic or ollama SDK."""
    mender = Mender(prefill)
    for chunk in stream:
        yield mender.feed(chunk)


async def amend(stream: AsyncIterable[Any], *, prefill: str = "") -> AsyncIterator[View]:
    """`mend` for the SDKs' async streams."""
    mender = Mender(prefill)
    async for chunk in stream:
        yield mender.feed(chunk)


def _as_dict(chunk: Any) -> Mapping[str, Any]:
    if isinstance(chunk, Mapping):
        return chunk
    for method in ("to_dict", "model_dump"):  # openai and anthropic objects; ollama's (pydantic)
        dump = getattr(chunk, method, None)
        if callable(dump):
            data = dump()
            if isinstance(data, Mapping):
                return data
    raise TypeError(f"mend() reads SDK stream chunks or parsed JSON objects, not {type(chunk).__name__}")


Read = tuple[int, dict[str, Any] | None, list[tuple[int, str]], str | None]


def _read(data: Mapping[str, Any]) -> Read:
    """(choice index, reset object or None, (index, text) deltas, finish reason) of one message."""
    if isinstance(data.get("choices"), list):
        return _openai(data)
    if isinstance(data.get("type"), str):
        return _anthropic(data)
    return _ollama(data)


def _openai(data: Mapping[str, Any]) -> Read:
    deltas: list[tuple[int, str]] = []
    finish = None
    index: int | None = None
    for choice in data["choices"]:
        i = int(choice.get("index") or 0)
        index = i if index is None else index
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, Mapping) else choice.get("text")
        if isinstance(text, str) and text:
            deltas.append((i, text))
        finish = choice.get("finish_reason") or finish
    return index or 0, _event(data.get("backtrack")), deltas, finish


def _anthropic(data: Mapping[str, Any]) -> Read:
    kind = data["type"]
    if kind == ANTHROPIC_RESET:
        return 0, {k: v for k, v in data.items() if k != "type"}, [], None
    delta = data.get("delta")
    if not isinstance(delta, Mapping):
        return 0, None, [], None
    if kind == "content_block_delta" and delta.get("type") == "text_delta":
        return 0, None, [(0, str(delta.get("text") or ""))], None
    if kind == "message_delta":
        return 0, None, [], delta.get("stop_reason")
    return 0, None, [], None


def _ollama(data: Mapping[str, Any]) -> Read:
    message = data.get("message")
    text = message.get("content") if isinstance(message, Mapping) else data.get("response")
    deltas = [(0, text)] if isinstance(text, str) and text else []
    finish = data.get("done_reason") if data.get("done") else None
    return 0, _event(data.get("backtrack")), deltas, finish


def _event(obj: Any) -> dict[str, Any] | None:
    """A reset object; a non-streamed answer's summary (`"event": "resets"`) mends nothing."""
    return dict(obj) if isinstance(obj, Mapping) and obj.get("event") == "reset" else None
