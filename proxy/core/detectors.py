"""The guard interface, and the detectors that need no model.

A `Guard` is shared by all requests of a policy; `Guard.open` gives a `GuardStream` for one response
attempt. The stream shell feeds it the response text as it arrives and hands each `Verdict` to the
stream engine (`proxy.core.engine`), which alone decides what is released, dropped or reset.

Offsets in a verdict are character offsets into all text fed to that stream. A detector vouches for the
text up to `scored_until`: it has read it and found no reset before `reset.at` (if any). A detector may
keep a short tail unjudged (a partial word, the start of what may become the `[RESET]` marker) until more
text arrives or `final=True` says no more will.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from proxy.core.tokens import TokenCounter

MARKER = "[RESET]"
UPSTREAM_RESET = "upstream_reset"


@dataclass(frozen=True, slots=True)
class Reset:
    at: int  # first character of the unsafe text
    category: str
    score: float
    detector: str
    resume_at: int | None = None  # where the upstream's own continuation starts (marker only)


@dataclass(frozen=True, slots=True)
class Verdict:
    scored_until: int
    reset: Reset | None = None
    score: float = 0.0  # the highest reset probability seen so far in this stream


class GuardStream(Protocol):
    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        """Read `text` (the response's next characters) and judge everything fed so far."""
        ...

    def close(self) -> None:
        """Release what the stream holds (a KV cache, a queue slot). Idempotent."""
        ...


@runtime_checkable
class InlineStream(Protocol):
    """A stream cheap enough to judge inline, without a task, a queue or a timeout."""

    def feed_sync(self, text: str, *, final: bool = False) -> Verdict: ...


class Guard(Protocol):
    name: str
    # The tokenizer the hold-back counts with; None means the approximation in `proxy.core.tokens`.
    tokenizer: TokenCounter | None

    def open(self, prompt: str | None) -> GuardStream: ...


class _TextStream:
    """Base for cheap detectors: they keep the text and rescan only a bounded tail."""

    def __init__(self) -> None:
        self.text = ""
        self.done: Reset | None = None

    def close(self) -> None:
        self.text = ""


class MarkerStream(_TextStream):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        return self.feed_sync(text, final=final)

    def feed_sync(self, text: str, *, final: bool = False) -> Verdict:
        start = max(0, len(self.text) - len(self.marker) + 1)
        self.text += text
        if self.done is None:
            at = self.text.find(self.marker, start)
            if at >= 0:
                self.done = Reset(at, UPSTREAM_RESET, 1.0, "marker", at + len(self.marker))
        if self.done is not None:
            return Verdict(len(self.text), self.done, 1.0)
        return Verdict(len(self.text) if final else len(self.text) - _partial_suffix(self.text, self.marker))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class MarkerGuard:
    """The upstream's own literal `[RESET]`: the paper's inference rule, honoured by the proxy."""

    name = "marker"
    tokenizer: TokenCounter | None = None

    def __init__(self, marker: str = MARKER) -> None:
        self.marker = marker

    def open(self, prompt: str | None) -> MarkerStream:
        return MarkerStream(self.marker)


_WORD_END = re.compile(r"\W")
_WINDOW = 512  # a pattern match may span at most this many characters


class PatternStream(_TextStream):
    def __init__(self, rules: Sequence[tuple[re.Pattern[str], str]]) -> None:
        super().__init__()
        self.rules = rules
        self.judged = 0

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        return self.feed_sync(text, final=final)

    def feed_sync(self, text: str, *, final: bool = False) -> Verdict:
        self.text += text
        if self.done is None:
            # A trailing partial word is not judged yet: "kill" may still become "killjoy".
            end = len(self.text) if final else _last_word_break(self.text)
            window_start = max(0, self.judged - _WINDOW)
            for pattern, category in self.rules:
                m = pattern.search(self.text, window_start, end)
                if m and (self.done is None or m.start() < self.done.at):
                    self.done = Reset(m.start(), category, 1.0, "patterns")
            self.judged = end
        if self.done is not None:
            return Verdict(len(self.text), self.done, 1.0)
        return Verdict(self.judged)


def _last_word_break(text: str) -> int:
    for i in range(len(text) - 1, -1, -1):
        if _WORD_END.match(text[i]):
            return i + 1
    return 0


class PatternGuard:
    """Regular expressions and word lists from the policy, each rule with its own category."""

    name = "patterns"
    tokenizer: TokenCounter | None = None

    def __init__(self, rules: Sequence[tuple[str, str]], words: Sequence[tuple[str, str]] = ()) -> None:
        compiled = [(re.compile(rx, re.IGNORECASE), cat) for rx, cat in rules]
        compiled += [(re.compile(r"\b" + re.escape(w) + r"\b", re.IGNORECASE), cat) for w, cat in words]
        self.rules = compiled

    def open(self, prompt: str | None) -> PatternStream:
        return PatternStream(self.rules)


class CompositeStream:
    def __init__(self, streams: list[GuardStream]) -> None:
        self.streams = streams

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        verdicts = await asyncio.gather(*(s.feed(text, final=final) for s in self.streams))
        return combine(verdicts)

    def close(self) -> None:
        for s in self.streams:
            s.close()


class InlineCompositeStream(CompositeStream):
    """All parts are inline: judge them one after the other, no tasks."""

    def __init__(self, streams: list[GuardStream], inline: Sequence[InlineStream]) -> None:
        super().__init__(streams)
        self.inline = inline

    def feed_sync(self, text: str, *, final: bool = False) -> Verdict:
        return combine([s.feed_sync(text, final=final) for s in self.inline])


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """The earliest reset any detector found; vouched-for text is what every detector vouches for."""
    resets = [v.reset for v in verdicts if v.reset is not None]
    first = min(resets, key=lambda r: r.at) if resets else None
    return Verdict(min(v.scored_until for v in verdicts), first, max(v.score for v in verdicts))


class CompositeGuard:
    """All of a policy's detectors, read side by side."""

    def __init__(self, guards: Sequence[Guard]) -> None:
        if not guards:
            raise ValueError("a composite guard needs at least one detector")
        self.guards = list(guards)
        self.name = "+".join(g.name for g in guards)
        self.tokenizer = next((g.tokenizer for g in guards if g.tokenizer is not None), None)

    def open(self, prompt: str | None) -> CompositeStream:
        streams = [g.open(prompt) for g in self.guards]
        inline = [s for s in streams if isinstance(s, InlineStream)]
        if len(inline) == len(streams):
            return InlineCompositeStream(streams, inline)
        return CompositeStream(streams)
