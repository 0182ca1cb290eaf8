"""One guarded response: a `Choice` per choice (its engine, its guard stream, what its client was
shown), and the scoring loop between the engine and the guard.

`GuardedResponse` is the only place that drives an engine or awaits the guard: the relay hands it
pieces and finishes and writes out the outputs it returns. Timeouts and guard failures become the
policy's fail mode here; after a fail-open the choice goes on unguarded (its guard stream state is
unknown) and every further verdict it would have needed counts as a fail-open event.

A `DebugTap` (the playground's debug channel, `proxy.server.playground`) is told of each upstream piece and
each verdict, for a request that carries the debug token; every other request has none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.core.detectors import Guard, GuardStream, InlineStream, Verdict
from proxy.core.engine import Flagged, Output, Piece, ResetEvent, State, StreamEngine
from proxy.core.errors import GuardError
from proxy.core.policy import Action, Policy
from proxy.dialects.base import PREFILL
from proxy.server.playground import DebugTap
from proxy.state.metrics import Metrics

log = logging.getLogger("backtrack")

# The most text the guard is given in one call (about 1,000 tokens): its timeout then bounds a call of
# bounded size, whatever the size of the upstream's delta.
FEED_CHARS = 4096


@dataclass
class Choice:
    """Everything one choice of the response holds, for its whole life (every attempt)."""

    index: int
    engine: StreamEngine
    guard: GuardStream
    unguarded: bool = False
    # The same stream when it is cheap enough to judge inline (no task, no timeout); checked once.
    inline: InlineStream | None = None
    # The current attempt's released pieces, prefill included (joined only for `inject`: appending to
    # one string per chunk would copy the whole answer every time).
    shown: list[str] = field(default_factory=list)
    inject: str | None = None  # after an `inject` reset: the answer's start to ask again with
    # Streaming: the guard's answer to text given by `GuardedResponse.ask`, not yet applied.
    asking: asyncio.Task[Asked] | None = None

    def __post_init__(self) -> None:
        self.inline = self.guard if isinstance(self.guard, InlineStream) else None

    def drop_asking(self) -> None:
        """Forget the verdict out, if any: it is about text or an attempt that no longer counts."""
        if self.asking is not None:
            self.asking.cancel()
            self.asking = None

    @property
    def state(self) -> State:
        return self.engine.state


@dataclass(frozen=True)
class Asked:
    """What the guard answered to one feed: a verdict, or why there is none."""

    verdict: Verdict | None
    failure: str = ""  # without a verdict: "timeout", the GuardError's class name, or "error"
    counted: bool = False  # the failure was counted where it happened (a remote judge)


@dataclass(frozen=True)
class Labels:
    policy: str
    route: str
    model: str


class GuardedResponse:
    def __init__(
        self,
        policy: Policy,
        guard: Guard,
        prompt: str | None,
        metrics: Metrics,
        labels: Labels,
        on_event: Callable[[ResetEvent | Flagged], None] | None = None,
        tap: DebugTap | None = None,
    ) -> None:
        self.policy = policy
        self.guard = guard
        self.prompt = prompt if policy.score_prompt else None
        self.metrics = metrics
        self.labels = labels
        self.choices: dict[int, Choice] = {}
        self.on_event = on_event  # told of each reset and flag (the audit log, strikes)
        self.tap = tap
        # Observed for every released piece: the labelled series is looked up once, not per chunk.
        self._holdback_delay = metrics.holdback_delay.labels(labels.policy)

    def choice(self, index: int, prefill: str = "") -> Choice:
        """Choice `index`; a new one reads the client's `prefill` first, as the start of its answer."""
        choice = self.choices.get(index)
        if choice is None:
            engine = StreamEngine(self.policy, self.guard.tokenizer)
            choice = self.choices[index] = Choice(index, engine, self.guard.open(self.prompt))
            if prefill:
                # Nothing is judged yet, so feeding cannot release anything: the outputs are empty.
                engine.feed(Piece(prefill, PREFILL))
        return choice

    def feed(self, choice: Choice, piece: Piece) -> list[Output]:
        if self.tap is not None:
            self.tap.piece(choice.index, piece.text)
        return choice.engine.feed(piece)

    def give_up(self, choice: Choice) -> list[Output]:
        """Asking again for this choice failed: it is refused."""
        return choice.engine.give_up()

    def abandon(self) -> None:
        """The upstream failed mid-stream: every choice ends where it is, its held text dropped."""
        for choice in self.choices.values():
            choice.engine.abandon()
            choice.drop_asking()

    def begin_again(self, choice: Choice) -> None:
        """A regenerated answer for this choice starts: a new attempt, read afresh."""
        if choice.state is State.REGENERATING:
            choice.engine.begin_attempt()
            self._restart_guard(choice)
            if self.tap is not None:
                self.tap.attempt(choice.index)
        choice.shown = []

    def _restart_guard(self, choice: Choice) -> None:
        """A new attempt (regenerated, or the upstream's continuation) is read from its start."""
        choice.drop_asking()  # its answer is about the attempt that ended
        choice.guard.close()
        choice.guard = self.guard.open(self.prompt)
        choice.inline = choice.guard if isinstance(choice.guard, InlineStream) else None

    async def score(self, run: Choice, *, final: bool = False) -> list[Output]:
        """Give the guard what it has not read; returns the engine's outputs for the verdicts."""
        out: list[Output] = []
        engine = run.engine
        while engine.state is State.STREAMING:
            if not final and not engine.scoring_due():
                break
            # At most FEED_CHARS at a time, each within the guard's timeout: sending more text at once
            # must not be a way to push the guard past its deadline (and, failing open, past the guard).
            text = engine.take_unscored(None if run.unguarded else FEED_CHARS)
            more = not engine.all_sent
            if run.unguarded:
                self.metrics.fail_open.labels(self.labels.policy).inc()
                step = engine.on_guard_failure()
            else:
                step = await self._verdict(run, text, final and not more)
            out += step
            self._observe(step)
            if any(isinstance(o, ResetEvent) and o.action is Action.CONTINUE for o in step):
                self._restart_guard(run)  # the continuation is a new response: read it afresh
                continue
            if more:
                continue
            if not final or engine.fully_scored:
                break
        return out

    async def finish(self, run: Choice, reason: str | None) -> list[Output]:
        """The upstream finished this choice with `reason`: judge the rest, then release it."""
        out = await self.answer(run, again=False)
        out += await self.score(run, final=True)
        out += run.engine.finish(reason)
        return out

    # -- streaming: the guard reads while the relay goes on ------------------------------------------

    async def ask(self, run: Choice) -> list[Output]:
        """Give the guard what it has not read, without waiting for its verdict (`answer` applies it).

        While a verdict is out the relay goes on reading the upstream and releasing what earlier verdicts
        allow, so text leaves as the upstream sends it, `holdback_tokens` behind, not in bursts at each
        guard pass. One feed per choice is out at a time. Inline and unguarded choices are judged at
        once, their outputs returned.
        """
        if run.inline is not None or run.unguarded:
            return await self.score(run)
        engine = run.engine
        if run.asking is None and engine.state is State.STREAMING and engine.scoring_due():
            text = engine.take_unscored(FEED_CHARS)
            run.asking = asyncio.create_task(self._ask(run.guard, text))
        return []

    def asking(self) -> list[asyncio.Task[Asked]]:
        """The verdicts out, one per choice at most."""
        return [c.asking for c in self.choices.values() if c.asking is not None]

    def answered(self) -> list[Choice]:
        """The choices whose verdict has come, in index order."""
        return [c for _, c in sorted(self.choices.items()) if c.asking is not None and c.asking.done()]

    async def answer(self, run: Choice, *, again: bool = True) -> list[Output]:
        """Apply the verdict `ask` asked for (waiting for it if it is still out); `again`: then ask for
        the text that arrived meanwhile."""
        task, run.asking = run.asking, None
        if task is None:
            return []
        step = self._apply(run, await task)
        self._observe(step)
        if any(isinstance(o, ResetEvent) and o.action is Action.CONTINUE for o in step):
            self._restart_guard(run)
        return step + (await self.ask(run) if again else [])

    async def _ask(self, guard: GuardStream, text: str, final: bool = False) -> Asked:
        """One feed within the guard's timeout; a failure is returned as such, never raised."""
        started = time.perf_counter()
        try:
            verdict = await asyncio.wait_for(guard.feed(text, final=final), self.policy.guard_timeout_seconds)
        except (TimeoutError, GuardError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            # A remote judge counts its own failures, by detector (`proxy.server.judges`).
            return Asked(None, kind, counted=getattr(exc, "counted", False))
        except Exception:
            log.exception("guard failed")
            return Asked(None, "error")
        self.metrics.guard_latency.labels(self.labels.policy).observe(time.perf_counter() - started)
        return Asked(verdict)

    def _apply(self, run: Choice, asked: Asked) -> list[Output]:
        if asked.verdict is None:
            return self._failed(run, asked.failure, counted=asked.counted)
        return self._judged(run, asked.verdict)

    async def _verdict(self, run: Choice, text: str, final: bool) -> list[Output]:
        if run.inline is not None:
            return self._judged(run, run.inline.feed_sync(text, final=final))
        return self._apply(run, await self._ask(run.guard, text, final))

    def _judged(self, run: Choice, verdict: Verdict) -> list[Output]:
        outputs = run.engine.on_verdict(verdict)
        if self.tap is not None:
            self.tap.verdict(run.index, run.engine, verdict, outputs)
        return outputs

    def _failed(self, run: Choice, kind: str, counted: bool = False) -> list[Output]:
        if not counted:
            self.metrics.guard_failures.labels(self.labels.policy, kind, self.policy.fail_mode).inc()
            log.warning(
                "guard unavailable (%s); policy %s fails %s", kind, self.policy.name, self.policy.fail_mode
            )
        run.unguarded = self.policy.fail_mode == "open"
        if run.unguarded:
            self.metrics.fail_open.labels(self.labels.policy).inc()
        return run.engine.on_guard_failure()

    def _observe(self, outputs: list[Output]) -> None:
        for o in outputs:
            if self.on_event is not None and isinstance(o, ResetEvent | Flagged):
                self.on_event(o)
            if isinstance(o, ResetEvent):
                self.metrics.resets.labels(
                    self.labels.policy, self.labels.route, self.labels.model, o.category, o.action.value
                ).inc()
                self.metrics.reset_position.labels(self.labels.policy).observe(o.position)
                log.info(
                    "reset policy=%s route=%s category=%s action=%s detector=%s position=%d",
                    o.policy, self.labels.route, o.category, o.action.value, o.detector, o.position,
                )  # fmt: skip
            elif isinstance(o, Flagged):
                self.metrics.resets.labels(
                    self.labels.policy, self.labels.route, self.labels.model, o.category, Action.FLAG.value
                ).inc()
                self.metrics.reset_position.labels(self.labels.policy).observe(o.position)

    def observe_release(self, received: float) -> None:
        if received:
            self._holdback_delay.observe(time.monotonic() - received)

    def close(self) -> None:
        for choice in self.choices.values():
            choice.drop_asking()
            choice.guard.close()
