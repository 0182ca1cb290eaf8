"""A cascade (a policy's `cascade:`): one detector's resets are candidates that another must confirm.

Theory of operation:
- The trigger reads the stream as any detector does. When it finds a reset, that is a candidate: the
  verifier is asked, in a task, about the prompt and all the text so far. Meanwhile the cascade vouches
  only for the text before the candidate, so the hold-back keeps what may be retracted, and the relay
  never waits (except on the upstream's finish, when everything must be judged).
- Unsafe from the verifier confirms the candidate: a reset where the trigger placed it, with the category
  of the stage the policy names (`cascade.category`). Safe dismisses it: the trigger (whose streams stop
  at their first reset) starts afresh, with the prompt, on the text after what the verifier cleared, and
  the stream goes on untouched.
- A verifier that fails follows the policy's `fail_mode`: open dismisses the candidate, closed confirms it.
  A remote verifier counts its own failures (`proxy.server.judges`); a local one, here.
- `backtrack_judge_verdicts_total{detector=VERIFIER, verdict="confirmed"|"cleared"}` counts the outcomes.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.core.detectors import Guard, GuardStream, Reset, Verdict
from proxy.core.errors import GuardError
from proxy.core.policy import Policy
from proxy.core.tokens import TokenCounter
from proxy.state.metrics import JudgeMetrics, Metrics

log = logging.getLogger("backtrack")


class CascadeGuard:
    tokenizer: TokenCounter | None = None

    def __init__(
        self, trigger: Guard, verifier: Guard, policy: Policy, metrics: Metrics, judge_metrics: JudgeMetrics
    ) -> None:
        self.trigger = trigger
        self.verifier = verifier
        self.policy = policy
        self.metrics = metrics
        self.judge_metrics = judge_metrics
        self.name = f"{trigger.name}>{verifier.name}"
        self.tokenizer = trigger.tokenizer or verifier.tokenizer

    def open(self, prompt: str | None) -> CascadeStream:
        return CascadeStream(self, prompt)

    def outcome(self, verdict: str) -> None:
        self.judge_metrics.verdicts.labels(self.policy.name, self.verifier.name, verdict).inc()


class CascadeStream:
    def __init__(self, guard: CascadeGuard, prompt: str | None) -> None:
        self.guard = guard
        self.prompt = prompt
        self.text = ""
        self.base = 0  # the current trigger stream reads text[base:]
        self.fed = 0  # text[:fed] was given to the trigger
        self.trigger: GuardStream = guard.trigger.open(prompt)
        self.vouched = 0  # the trigger found no reset in text[:vouched]
        self.candidate: Reset | None = None
        self.verifying: asyncio.Task[Reset | None] | None = None
        self.verified_until = 0  # the text the pending verification reads
        self.confirmed: Reset | None = None
        self.score = 0.0

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        self.text += text
        while self.confirmed is None:
            if self.verifying is not None:
                if not self.verifying.done() and not final:
                    return self._waiting()
                self._settle(await asyncio.shield(self.verifying))
                continue
            new, self.fed = self.text[self.fed :], len(self.text)
            verdict = await self.trigger.feed(new, final=final)
            self.score = max(self.score, verdict.score)
            self.vouched = self.base + verdict.scored_until
            if verdict.reset is None:
                return Verdict(self.vouched, None, self.score)
            r = verdict.reset
            self.candidate = Reset(self.base + r.at, r.category, r.score, r.detector)
            self.verified_until = len(self.text)
            self.verifying = asyncio.get_running_loop().create_task(self._verify(self.text))
        return Verdict(len(self.text), self.confirmed, self.score)

    def _waiting(self) -> Verdict:
        assert self.candidate is not None
        return Verdict(min(self.vouched, self.candidate.at), None, self.score)

    async def _verify(self, text: str) -> Reset | None:
        """The verifier's reset over `text` (None: it found the text safe)."""
        stream = self.guard.verifier.open(self.prompt)
        policy = self.guard.policy
        try:
            verdict = await asyncio.wait_for(stream.feed(text, final=True), policy.guard_timeout_seconds)
        except (TimeoutError, GuardError) as exc:
            counted = getattr(exc, "counted", False)
            if not counted:
                kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                self.guard.metrics.guard_failures.labels(policy.name, kind, policy.fail_mode).inc()
            log.warning(
                "cascade verifier %s failed; policy %s fails %s",
                self.guard.verifier.name, policy.name, policy.fail_mode,
            )  # fmt: skip
            if policy.fail_mode == "open":
                return None
            assert self.candidate is not None
            return self.candidate
        finally:
            stream.close()
        return verdict.reset

    def _settle(self, found: Reset | None) -> None:
        candidate = self.candidate
        assert candidate is not None
        self.verifying = None
        if found is not None:
            self.guard.outcome("confirmed")
            cascade = self.guard.policy.cascade
            by_verifier = cascade is None or cascade.category == "verifier"
            category = found.category if by_verifier else candidate.category
            # Where the trigger placed it: a judge that read the whole text says only that it is unsafe.
            self.confirmed = Reset(candidate.at, category, max(found.score, candidate.score), self.guard.name)
            return
        self.guard.outcome("cleared")
        # The trigger stops at its first reset: it starts again after what the verifier cleared.
        self.trigger.close()
        self.trigger = self.guard.trigger.open(self.prompt)
        self.base = self.fed = self.vouched = self.verified_until
        self.candidate = None

    def close(self) -> None:
        self.trigger.close()
        if self.verifying is not None:
            self.verifying.cancel()
            self.verifying = None
