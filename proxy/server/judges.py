"""Remote judges at the server edge: the HTTP client, and the `Guard` that asks a judge in the background.

Theory of operation:
- A `RemoteGuard` is one policy's remote detector. Its `JudgeClient` sends the calls that
  `proxy.core.judges` builds, at most `max_concurrency` at a time for all streams together, each attempt
  within `timeout_seconds`, again after a timeout, a refused connection or a 5xx, up to `retries` times.
- A `RemoteStream` never makes the relay wait on the judge while the answer streams: `feed` adds the text
  to its `JudgeSchedule` and returns at once with what the judge has vouched for so far. When enough new
  text waits and no call of this stream is in flight, it starts one in a task (one at a time per stream,
  so a slow judge sees fewer, longer texts rather than a queue). The hold-back holds the unjudged text
  meanwhile, so the judge's latency costs the client nothing while it is shorter than the hold-back.
- Only a final feed (the upstream finished) waits: for the call in flight, then for one over the rest.
- A call that fails for good follows the policy's `fail_mode`: open vouches for the text it judged and
  the stream goes on (the other detectors still read it); closed makes the stream's next feed raise
  `JudgeUnavailable`, and the choice is refused. Each such failure counts in
  `backtrack_guard_failures_total{kind="DETECTOR:KIND"}` and `backtrack_judge_failures_total`.
- The key (`api_key_env`) goes in the Authorization header and nowhere else: errors name the detector
  and what went wrong, never the key or the text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import aiohttp

from proxy.core.detectors import Verdict
from proxy.core.errors import GuardError
from proxy.core.judge_config import RemoteDetector
from proxy.core.judges import JudgeAnswerError, Judgement, JudgeSchedule, judge_request, read_answer
from proxy.core.policy import Policy
from proxy.core.tokens import TokenCounter
from proxy.state.metrics import FAIL_MODES, JUDGE_FAILURE_KINDS, JudgeMetrics, Metrics

log = logging.getLogger("backtrack")


class JudgeUnavailable(GuardError):
    """A judge gave no verdict and the policy fails closed (already counted where it failed)."""

    counted = True


class JudgeFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # one of JUDGE_FAILURE_KINDS


class JudgeClient:
    """Sends one detector's calls (see the module docstring)."""

    def __init__(
        self, detector: RemoteDetector, session: aiohttp.ClientSession, metrics: JudgeMetrics, policy: str
    ) -> None:
        self.detector = detector
        self.session = session
        self.metrics = metrics
        self.policy = policy
        self.slots = asyncio.Semaphore(detector.max_concurrency)
        self.headers = {"Content-Type": "application/json"}
        key = os.environ.get(detector.api_key_env) if detector.api_key_env else None
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        elif detector.api_key_env:
            log.warning(
                "detector %s: api_key_env names %s, which is not set", detector.name, detector.api_key_env
            )

    async def judge(self, prompt: str | None, text: str, final: bool, policy: Policy) -> Judgement:
        """The judge's verdict on `prompt` and `text`; raises `JudgeFailed` once every attempt failed."""
        d = self.detector
        path, body = judge_request(d, prompt, text, final, policy.logit_bias, policy.threshold)
        data = json.dumps(body).encode()
        failure = JudgeFailed("unreachable", "no attempt made")
        for _ in range(d.retries + 1):
            async with self.slots:
                started = time.perf_counter()
                self.metrics.calls.labels(self.policy, d.name).inc()
                try:
                    async with asyncio.timeout(d.timeout_seconds):
                        status, answer = await self._post(path, data)
                        judgement = read_answer(d, status, answer)
                except TimeoutError:
                    failure = JudgeFailed("timeout", f"no answer within {d.timeout_seconds} s")
                    continue
                except aiohttp.ClientError as exc:
                    failure = JudgeFailed("unreachable", f"cannot reach the judge: {type(exc).__name__}")
                    continue
                except JudgeAnswerError as exc:
                    failure = JudgeFailed("bad_answer", exc.message)
                    if exc.retry:
                        continue
                    break
                self.metrics.latency.labels(self.policy, d.name).observe(time.perf_counter() - started)
                verdict = "unsafe" if judgement.unsafe else "safe"
                self.metrics.verdicts.labels(self.policy, d.name, verdict).inc()
                return judgement
        raise failure

    async def _post(self, path: str, data: bytes) -> tuple[int, Any]:
        async with self.session.post(self.detector.url + path, data=data, headers=self.headers) as resp:
            raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return resp.status, None


class RemoteGuard:
    """One policy's remote detector as a `Guard` (see the module docstring)."""

    tokenizer: TokenCounter | None = None

    def __init__(
        self,
        detector: RemoteDetector,
        policy: Policy,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        judge_metrics: JudgeMetrics,
    ) -> None:
        self.name = detector.name
        self.detector = detector
        self.policy = policy
        self.metrics = metrics
        self.judge_metrics = judge_metrics
        self.client = JudgeClient(detector, session, judge_metrics, policy.name)
        judge_metrics.init_detector(policy.name, detector.name)
        for kind in JUDGE_FAILURE_KINDS:
            for mode in FAIL_MODES:  # both, as for the other kinds: a reload may change the fail mode
                metrics.guard_failures.labels(policy.name, f"{detector.name}:{kind}", mode)

    def open(self, prompt: str | None) -> RemoteStream:
        return RemoteStream(self, prompt)

    def count_failure(self, exc: JudgeFailed) -> None:
        policy, name = self.policy, self.detector.name
        self.metrics.guard_failures.labels(policy.name, f"{name}:{exc.kind}", policy.fail_mode).inc()
        self.judge_metrics.failures.labels(policy.name, name, exc.kind).inc()
        if policy.fail_mode == "open":
            self.metrics.fail_open.labels(policy.name).inc()
        log.warning(
            "judge %s gave no verdict (%s: %s); policy %s fails %s",
            name,
            exc.kind,
            exc,
            policy.name,
            policy.fail_mode,
        )


class RemoteStream:
    def __init__(self, guard: RemoteGuard, prompt: str | None) -> None:
        self.guard = guard
        self.prompt = prompt
        self.schedule = JudgeSchedule(guard.detector)
        self.task: asyncio.Task[None] | None = None
        self.unavailable = False

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        self.schedule.add(text)
        if not final:
            self._ask()
            return self._verdict()
        # The upstream finished: everything must be judged before the rest is released.
        for _ in range(3):
            if self.task is not None:
                await asyncio.shield(self.task)
            if self.schedule.settled or self.unavailable:
                break
            self._ask(final=True)
        if not self.schedule.settled and not self.unavailable:
            # A judge that keeps vouching for less than a finished text is not answering the question.
            self._give_up(
                JudgeFailed("bad_answer", "judge vouched for less than the finished text"),
                len(self.schedule.text),
            )
        return self._verdict()

    def _verdict(self) -> Verdict:
        if self.unavailable:
            raise JudgeUnavailable(f"judge {self.guard.name} unavailable")
        return self.schedule.verdict()

    def _ask(self, final: bool = False) -> None:
        if self.task is not None or self.unavailable:
            return
        end = self.schedule.due(final)
        if end is not None:
            self.task = asyncio.get_running_loop().create_task(self._call(end, final))

    async def _call(self, end: int, final: bool) -> None:
        text = self.schedule.text[:end]
        try:
            judgement = await self.guard.client.judge(self.prompt, text, final, self.guard.policy)
        except JudgeFailed as exc:
            self._give_up(exc, end)
        except Exception:  # a bug must not leave the stream waiting on a task that is gone
            log.exception("judge %s call failed", self.guard.name)
            self._give_up(JudgeFailed("bad_answer", "the call failed"), end)
        else:
            self.schedule.judged(end, judgement)
        finally:
            self.task = None

    def _give_up(self, exc: JudgeFailed, end: int) -> None:
        self.guard.count_failure(exc)
        fail_open = self.guard.policy.fail_mode == "open"
        self.schedule.failed(end, fail_open)
        self.unavailable = not fail_open

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


class Judges:
    """What an app's remote detectors share: one client session (no pool limit: the detectors' own
    `max_concurrency` bounds the calls), and the judge metrics. Made by `model_ctx`, closed after it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._judge_metrics: JudgeMetrics | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def judge_metrics(self) -> JudgeMetrics:
        """Registered with the first remote detector: a proxy without one exports none of them."""
        if self._judge_metrics is None:
            self._judge_metrics = JudgeMetrics(self.metrics.registry)
        return self._judge_metrics

    def remote(self, detector: RemoteDetector, policy: Policy) -> RemoteGuard:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return RemoteGuard(detector, policy, self.session, self.metrics, self.judge_metrics)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
