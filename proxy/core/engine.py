"""The stream engine: hold-back, release and reset for one choice of one response. No I/O.

Theory of operation
-------------------
The upstream's response arrives as `Piece`s (a text delta plus whatever else the dialect attached to it:
a role, logprobs, tool-call deltas). Pieces enter the hold-back buffer and leave it, whole and in order,
as `Release` outputs. A piece is released only when both hold:

1. the guard has vouched for all of its text (`Verdict.scored_until` is at or past its end), and
2. it ends at least `holdback_tokens` guard tokens behind the head (the newest text received).

So the client is always `holdback_tokens` behind the upstream, and the guard has that many tokens of
look-ahead to change its mind before anything it judged is shown.

When a verdict carries a reset at character X, the engine releases what a guard scoring every token
would already have let out (pieces `holdback_tokens` behind the token at X, counting it), drops the
rest of the buffer, emits a `ResetEvent`, and runs the policy's action for the reset's category:

    refuse      -> the refusal message is released, the choice finishes with "stop"
    truncate    -> the choice finishes with "content_filter"
    regenerate  -> the shell must ask the upstream again (`Regenerate`), then call `begin_attempt`
    inject      -> as regenerate; the shell asks with the abandoned text and `[RESET]` as the answer's
                   start where its dialect allows that prefill
    continue    -> the upstream reset itself (its `[RESET]` marker): the text after the marker starts a
                   new attempt in the same upstream stream
    flag        -> nothing is dropped; a `Flagged` output is recorded and the stream goes on

Each reset counts; past `max_resets` the action becomes `refuse`. `retract_chars` in a reset event is
how much text of the abandoned attempt the client was already shown (0 for a truncate, which keeps it),
for clients that mend their display.

Retraction: most clients ignore the reset event and would splice the continuation onto the shown text.
When a reset retracts text (`retract_chars > 0`, any action but truncate), the policy's `retraction`
decides what such a client sees; with nothing shown there is nothing to splice and all three agree:

    event       -> the reset event, then the action's continuation, as above
    notice      -> as event; the event also carries `notice` (the policy's `retraction_notice`), which
                   the dialect's encoder writes into the stream's text right after the reset, before
                   the continuation. The notice is no part of any attempt (no later reset retracts it),
                   and a non-streamed answer, whose client was shown nothing, never carries it
    cut         -> the action becomes a truncate that still retracts: the choice finishes with
                   "content_filter" and no continuation. `retract_chars` still says what was shown, so
                   a mending client removes it; a non-streamed answer ends the same way

States (per choice):

    STREAMING     --reset: regenerate/inject-->          REGENERATING --begin_attempt--> STREAMING
    STREAMING     --reset: refuse/truncate, finish-->    DONE
    STREAMING     --reset: continue / flag-->            STREAMING
    REGENERATING  --give_up (asking again failed)-->     DONE   (the refusal is released)
    any           --abandon (the upstream broke)-->      DONE   (held text dropped, nothing released)

The shell feeds pieces, asks `take_unscored()` for text to give the guard, hands back verdicts, and on
the upstream's finish calls `finish()` once the guard has judged everything (`fully_scored`).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Any

from proxy.core.detectors import Reset, Verdict
from proxy.core.policy import Action, Policy
from proxy.core.tokens import ApproxTokenizer, TokenCounter

GUARD_UNAVAILABLE = "guard_unavailable"


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    extra: Any = None  # the dialect's payload for this delta; the engine never looks inside
    received: float = 0.0  # when the shell got it (for the hold-back delay metric); not read here


# -- outputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Release:
    piece: Piece


@dataclass(frozen=True, slots=True)
class ResetEvent:
    category: str
    action: Action
    score: float
    detector: str
    retract_chars: int  # characters of the abandoned attempt that the client has already received
    position: int  # guard tokens into the attempt where the reset happened
    discarded: str  # the held text that was dropped (for the audit stream; never sent to the client)
    policy: str
    # What a streamed client is shown in the text between the retracted text and the continuation
    # (`retraction: notice`); "" when nothing was retracted or the policy says otherwise.
    notice: str = ""


@dataclass(frozen=True, slots=True)
class Flagged:
    category: str
    score: float
    detector: str
    position: int
    text: str  # the text the detector objected to, from the reset point to the head at that time
    policy: str


@dataclass(frozen=True, slots=True)
class Regenerate:
    """Ask the upstream again with the policy's safety instruction; then call `begin_attempt`."""


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str | None  # the finish_reason to send the client ("stop", "content_filter", ...)


Output = Release | ResetEvent | Flagged | Regenerate | Finish


class State(enum.Enum):
    STREAMING = "streaming"
    REGENERATING = "regenerating"
    DONE = "done"


@dataclass(slots=True)
class _Attempt:
    """What the engine knows of the current attempt. Offsets count from the attempt's first char."""

    held: list[Piece] = field(default_factory=list)
    released_chars: int = 0  # = offset of the first held character
    released_tokens: int = 0
    received_chars: int = 0
    sent_chars: int = 0  # handed to the guard by take_unscored()
    scored_until: int = 0
    flagged: bool = False
    starts_key: tuple[int, int] = (-1, -1)
    starts: list[int] = field(default_factory=list)


class StreamEngine:
    """Hold-back, release and reset for one choice. See the module docstring."""

    def __init__(self, policy: Policy, tokenizer: TokenCounter | None = None) -> None:
        self.policy = policy
        self.tokenizer: TokenCounter = tokenizer or ApproxTokenizer()
        self.state = State.STREAMING
        self.resets = 0
        self.attempt = _Attempt()

    # -- inputs ------------------------------------------------------------------------------------

    def feed(self, piece: Piece) -> list[Output]:
        """A delta from the upstream. Releases at most what the last verdict already allows."""
        if self.state is not State.STREAMING:
            return []  # the rest of an abandoned attempt
        self.attempt.held.append(piece)
        self.attempt.received_chars += len(piece.text)
        return self._release()

    def take_unscored(self, limit: int | None = None) -> str:
        """Text received but not yet given to the guard (at most `limit` characters); marks it as given."""
        a = self.attempt
        if self.state is not State.STREAMING or a.sent_chars == a.received_chars:
            return ""
        start = a.sent_chars - a.released_chars
        end = None if limit is None else start + limit
        text = self._held_text()[start:end]
        a.sent_chars += len(text)
        return text

    @property
    def all_sent(self) -> bool:
        """Whether the guard has been given every character received."""
        return self.attempt.sent_chars == self.attempt.received_chars

    def scoring_due(self) -> bool:
        """Whether `score_every_tokens` guard tokens wait to be scored."""
        a = self.attempt
        if a.sent_chars == a.received_chars:
            return False
        if self.policy.score_every_tokens == 1:
            return True  # any text at all: no need to count
        pending = self._held_text()[a.sent_chars - a.released_chars :]
        return len(self.tokenizer.token_starts(pending)) >= self.policy.score_every_tokens

    @property
    def fully_scored(self) -> bool:
        return self.state is not State.STREAMING or self.attempt.scored_until >= self.attempt.received_chars

    def on_verdict(self, verdict: Verdict) -> list[Output]:
        if self.state is not State.STREAMING:
            return []
        a = self.attempt
        a.scored_until = max(a.scored_until, verdict.scored_until)
        if verdict.reset is not None and not a.flagged:
            return self._reset(verdict.reset, verdict.scored_until)
        return self._release()

    def on_guard_failure(self) -> list[Output]:
        """The guard could not judge the text in time: the policy's fail mode decides."""
        if self.state is not State.STREAMING:
            return []
        a = self.attempt
        if self.policy.fail_mode == "open":
            a.scored_until = a.received_chars
            return self._release()
        # Closed: nothing unjudged gets out; the held text is dropped and the response refused.
        reset = Reset(a.released_chars, GUARD_UNAVAILABLE, 0.0, "guard")
        return self._reset(reset, a.released_chars, forced=Action.REFUSE)

    def finish(self, reason: str | None) -> list[Output]:
        """The upstream ended this choice. Call once the guard has judged all text (`fully_scored`)."""
        if self.state is not State.STREAMING:
            return []
        if not self.fully_scored:
            raise RuntimeError("finish() before the guard judged all text")
        out: list[Output] = [Release(p) for p in self.attempt.held]
        self.attempt.held = []
        self.state = State.DONE
        out.append(Finish(reason))
        return out

    def give_up(self) -> list[Output]:
        """A regeneration could not be had (the upstream failed): refuse instead."""
        if self.state is not State.REGENERATING:
            return []
        self.state = State.DONE
        return [Release(Piece(self.policy.refusal_message)), Finish("stop")]

    def abandon(self) -> None:
        """The upstream failed mid-stream: the choice ends where it is, its held text dropped unjudged
        (the shell sends the client an in-band error instead of a finish)."""
        self.attempt.held = []
        self.state = State.DONE

    def begin_attempt(self) -> None:
        """A regenerated response starts; call after acting on `Regenerate`."""
        if self.state is not State.REGENERATING:
            raise RuntimeError(f"begin_attempt() in state {self.state.value}")
        self.attempt = _Attempt()
        self.state = State.STREAMING

    # -- internals ---------------------------------------------------------------------------------

    def _held_text(self) -> str:
        return "".join(p.text for p in self.attempt.held)

    def _held_starts(self, text: str) -> list[int]:
        """Token starts of the held text, cached: a feed and the verdict after it ask the same."""
        a = self.attempt
        key = (a.released_chars, a.received_chars)
        if a.starts_key != key:
            a.starts_key, a.starts = key, self.tokenizer.token_starts(text)
        return a.starts

    def _tokens_between(self, text: str, start: int, end: int) -> int:
        """Guard tokens of the held `text` starting at attempt offsets start..end-1."""
        starts, base = self._held_starts(text), self.attempt.released_chars
        return bisect.bisect_left(starts, end - base) - bisect.bisect_left(starts, start - base)

    def _cut(self, text: str, head: int | None = None) -> int:
        """Offset in `text` before which everything is `holdback_tokens` behind the head: the end of
        `text`, or (on a reset) the end of the token at offset `head`, the first unsafe one."""
        k = self.policy.holdback_tokens
        if k == 0:
            return len(text) if head is None else head
        starts = self._held_starts(text)
        n = len(starts) if head is None else bisect.bisect_right(starts, head)
        return starts[n - k] if n > k else 0

    def _release(self, limit: int | None = None) -> list[Output]:
        """Release whole pieces ending at or before `limit` (attempt offset; default: the rule above)."""
        a = self.attempt
        if not a.held:
            return []
        if limit is None and a.released_chars + len(a.held[0].text) > a.scored_until:
            return []  # the oldest piece is not judged yet: skip the tokenizing below
        text = self._held_text()
        split = False
        if limit is None:
            cut = a.released_chars + self._cut(text)
            # A piece the hold-back's cut falls inside by 2 tokens or more is split at the cut: a word of
            # several guard tokens would otherwise wait as many more upstream chunks, then leave in a
            # burst with the next ones (a 4-token word: an 80 ms gap at 50 tokens/s, then 0 ms ones).
            # One token in, it waits one chunk: not worth a chunk more for the client.
            split = cut <= a.scored_until
            limit = min(a.scored_until, cut)
        out: list[Output] = []
        end = a.released_chars
        n = 0
        for piece in a.held:
            if end + len(piece.text) > limit:
                break
            end += len(piece.text)
            n += 1
            out.append(Release(piece))
        rest = None
        if split and n < len(a.held) and self._tokens_between(text, end, limit) >= 2:
            # Both parts keep the piece's payload: the dialects encode a piece whose text is not its
            # payload's own (as after a reset's cut), and a client's prefill stays the client's.
            piece, k = a.held[n], limit - end
            out.append(Release(Piece(piece.text[:k], piece.extra, piece.received)))
            rest = Piece(piece.text[k:], piece.extra, piece.received)
            end = limit
        if out:
            a.released_tokens += bisect.bisect_left(self._held_starts(text), end - a.released_chars)
            a.held = a.held[n:] if rest is None else [rest, *a.held[n + 1 :]]
            a.released_chars = end
        return out

    def _reset(self, reset: Reset, vouched: int, forced: Action | None = None) -> list[Output]:
        a = self.attempt
        at = max(reset.at, a.released_chars)
        text = self._held_text()
        before = text[: at - a.released_chars]
        position = a.released_tokens + len(self.tokenizer.token_starts(before))
        action = forced or self.policy.action_for(reset.category)

        if action is Action.FLAG:
            a.flagged = True
            flagged = Flagged(
                reset.category, reset.score, reset.detector, position,
                text[at - a.released_chars :], self.policy.name,
            )  # fmt: skip
            return [flagged, *self._release()]

        out = self._release(min(vouched, a.released_chars + self._cut(text, at - a.released_chars)))
        self.resets += 1
        if self.resets > self.policy.max_resets and action is not Action.TRUNCATE:
            action = Action.REFUSE
        # A truncate keeps what was shown; every other action abandons the attempt's text.
        retract = 0 if action is Action.TRUNCATE else a.released_chars
        retraction = self.policy.retraction if retract else "event"
        if retraction == "cut":
            action = Action.TRUNCATE  # ends here, but still retracts what was shown
        held_text = self._held_text()
        remainder = self._remainder(reset.resume_at) if action is Action.CONTINUE else []
        discarded_end = len(held_text) if reset.resume_at is None else reset.resume_at - a.released_chars
        out.append(
            ResetEvent(
                category=reset.category,
                action=action,
                score=reset.score,
                detector=reset.detector,
                retract_chars=retract,
                position=position,
                discarded=held_text[:discarded_end],
                policy=self.policy.name,
                notice=self.policy.retraction_notice if retraction == "notice" else "",
            )
        )
        a.held = []
        if action is Action.CONTINUE:
            self.attempt = _Attempt()
            for piece in remainder:
                out += self.feed(piece)
        elif action in (Action.REGENERATE, Action.INJECT):
            self.state = State.REGENERATING
            out.append(Regenerate())
        elif action is Action.REFUSE:
            self.state = State.DONE
            out += [Release(Piece(self.policy.message_for(reset.category))), Finish("stop")]
        else:
            self.state = State.DONE
            out.append(Finish("content_filter"))
        return out

    def _remainder(self, resume_at: int | None) -> list[Piece]:
        """The held pieces from `resume_at` on, the first one cut to start there."""
        a = self.attempt
        if resume_at is None:
            return []
        out: list[Piece] = []
        start = a.released_chars
        for piece in a.held:
            end = start + len(piece.text)
            if end > resume_at or (end == resume_at and not piece.text):
                out.append(Piece(piece.text[max(0, resume_at - start) :], piece.extra))
            start = end
        return out
