"""The batched incremental scorer the proxy uses, and the per-policy `Guard` on top of it.

Theory of operation:
- One `BatchScorer` owns the model. Every live response stream has a `StreamState`: its KV cache, the
  tokens waiting to be scored, and the logits of its response tokens so far.
- `ModelStream.feed` tokenizes new text incrementally (same tokens as the whole text), appends them to
  its stream's pending tokens and waits until they are scored. The scorer's queue holds streams with
  waiting feeds; when `queue_size` streams already wait, a feed raises `GuardOverloaded` (its tokens stay
  pending and are scored with that stream's next feed, so the cache never loses text).
- One worker takes queued streams until `max_batch_tokens`, runs one forward pass over all of their
  pending tokens in a thread (the event loop never blocks), writing their keys/values into each stream's
  slot of one `KVPool` and attending in one batched call, and wakes the waiting feeds.
- A feed cancelled by the caller's timeout leaves its tokens pending; the worker scores them anyway
  and the stream's next feed catches up, so cancellation never desynchronises a cache.
- When a stream reaches the model's position limit it rolls over: the cache restarts from the prompt and
  the last `rollover_keep` response tokens (their logits, already known, are not used again).
- The reset rule belongs to the policy's `Guard`: p = sigmoid(logit + logit_bias); token i resets when
  p >= threshold at i and at the `consecutive - 1` tokens before it. `Reset.at` is where that run starts.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from guard.model import GuardModel, KVPool, Segment, load_checkpoint, resolve_base
from guard.precision import with_precision
from guard.tokenize import GuardTokenizer, IncrementalTokenizer
from proxy.core.detectors import Reset, Verdict
from proxy.core.errors import GuardError, GuardOverloaded

BUNDLED = Path(__file__).resolve().parent / "checkpoint"


@dataclass(eq=False)
class StreamState:
    prompt_ids: list[int]
    pending: list[tuple[int, int, bool]]  # (token id, token type, whether its logit is wanted)
    slot: int | None = None  # its keys and values in the scorer's `KVPool`, from its first pass
    length: int = 0  # tokens in the cache
    response_ids: list[int] = field(default_factory=list)  # all response tokens submitted
    logits: list[float] = field(default_factory=list)  # one per scored response token
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    queued: bool = False
    closed: bool = False


@dataclass
class _Item:
    state: StreamState
    take: list[tuple[int, int, bool]]


class BatchScorer:
    """Owns the guard model and the worker that batches all live streams (see the module docstring)."""

    def __init__(
        self,
        model: GuardModel,
        tokenizer: GuardTokenizer,
        *,
        max_batch_tokens: int = 512,
        queue_size: int = 256,
        rollover_keep: int = 128,
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.queue_size = queue_size
        self.rollover_keep = rollover_keep
        self.threads = threads
        self.pool = KVPool(model.cfg)
        self.queue: deque[StreamState] = deque()
        self.wake = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        self.inflight: list[_Item] = []
        # Streams per forward pass, recent ones only: for the batch-size metric and the bench.
        self.batch_sizes: deque[int] = deque(maxlen=4096)
        # Called with each forward pass's stream count (the proxy observes its batch-size histogram).
        self.on_batch: Callable[[int], None] | None = None

    async def start(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.wake = asyncio.Event()
        self.worker = asyncio.create_task(self._run(), name="guard-scorer")

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
            self.worker = None
        for state in [it.state for it in self.inflight] + list(self.queue):
            self._fail(state, GuardError("guard scorer stopped"))
        self.queue.clear()
        self.inflight = []

    def guard(self, logit_bias: float, threshold: float, category: str = "unsafe") -> ModelGuard:
        """A lightweight per-policy guard sharing this scorer's model and worker."""
        return ModelGuard(self, logit_bias, threshold, category)

    def open_state(self, prompt: str | None) -> StreamState:
        ids = self.tokenizer.prompt_ids(prompt, self.model.cfg.max_prompt_tokens)
        return StreamState(ids, [(t, 0, False) for t in ids])

    async def score(self, state: StreamState, ids: list[int]) -> None:
        """Queue `ids` (new response tokens) and wait until every response token so far is scored."""
        if self.worker is None:
            raise GuardError("guard scorer not started")
        state.pending += [(t, 1, True) for t in ids]
        state.response_ids += ids
        target = len(state.response_ids)
        if len(state.logits) >= target:
            return
        if not state.queued and len(self.queue) >= self.queue_size:
            raise GuardOverloaded(f"guard queue full ({self.queue_size} streams waiting)")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append((target, fut))
        if not state.queued:
            state.queued = True
            self.queue.append(state)
            self.wake.set()
        await fut

    def close_state(self, state: StreamState) -> None:
        state.closed = True
        self._release(state)
        for _, fut in state.waiters:
            fut.cancel()
        state.waiters.clear()

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                items = self._take_batch()
                if not items:
                    continue
                try:
                    logits = await asyncio.to_thread(self._forward, items)
                except Exception as exc:  # any model failure becomes the policy's fail mode
                    for item in items:
                        item.state.pending[:0] = item.take
                        self._fail(item.state, GuardError(f"guard model failed: {exc!r}"))
                    continue
                self.batch_sizes.append(len(items))
                if self.on_batch is not None:
                    self.on_batch(len(items))
                for item, row in zip(items, logits, strict=True):
                    self._finish(item, row)
            if not self.pool.live:
                self.pool.clear()  # no pass runs now, and no stream holds keys: give the memory back

    def _take_batch(self) -> list[_Item]:
        items: list[_Item] = []
        budget = self.max_batch_tokens
        # Equal slices keep one long prefill from delaying every other stream's verdict.
        share = max(16, self.max_batch_tokens // max(1, len(self.queue)))
        while self.queue and budget > 0:
            state = self.queue.popleft()
            state.queued = False
            if state.closed or not state.pending:
                continue
            if state.slot is None:
                state.slot = self.pool.acquire()
            if state.length + min(len(state.pending), share, budget) > self.model.cfg.max_positions:
                self._rollover(state)
            n = min(len(state.pending), share, budget, self.model.cfg.max_positions - state.length)
            items.append(_Item(state, state.pending[:n]))
            del state.pending[:n]
            budget -= n
        self.inflight = items
        return items

    def _rollover(self, state: StreamState) -> None:
        keep = state.response_ids[max(0, len(state.logits) - self.rollover_keep) : len(state.logits)]
        replay = [(t, 0, False) for t in state.prompt_ids] + [(t, 1, False) for t in keep]
        state.pending[:0] = replay
        state.length = 0

    def _finish(self, item: _Item, row: list[float]) -> None:
        state = item.state
        if state.closed:
            return
        state.logits += [x for x, (_, _, wanted) in zip(row, item.take, strict=True) if wanted]
        done = len(state.logits)
        still = []
        for target, fut in state.waiters:
            if target <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        state.waiters = still
        if state.pending and state.waiters and not state.queued:
            state.queued = True
            self.queue.append(state)

    def _fail(self, state: StreamState, exc: GuardError) -> None:
        state.queued = False
        for _, fut in state.waiters:
            if not fut.done():
                fut.set_exception(exc)
        state.waiters.clear()

    def _release(self, state: StreamState) -> None:
        if state.slot is not None:
            self.pool.release(state.slot)
            state.slot = None

    @torch.no_grad()
    def _forward(self, items: list[_Item]) -> list[list[float]]:
        """One packed pass over every item's new tokens; runs in a worker thread."""
        if self.threads and torch.get_num_threads() != self.threads:
            # torch's thread count is per thread: what `start` set on the loop's thread does not reach
            # an executor worker that had run a torch op before (the one that loaded the model had).
            torch.set_num_threads(self.threads)
        ids: list[int] = []
        types: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        for it in items:
            n, L = len(it.take), it.state.length
            assert it.state.slot is not None  # `_take_batch` gave it one
            segments.append(Segment(it.state.slot, L, len(ids), n))
            ids += [t for t, _, _ in it.take]
            types += [ty for _, ty, _ in it.take]
            positions += range(L, L + n)
        dev = self.model.tok_emb.weight.device  # the pool follows the model's dtype and device
        logits = self.model.step(
            torch.tensor(ids, device=dev), torch.tensor(types, device=dev),
            torch.tensor(positions, device=dev), segments, self.pool,
        )  # fmt: skip
        out = logits.tolist()
        for it, seg in zip(items, segments, strict=True):
            it.state.length = seg.past + seg.n
        return [out[seg.start : seg.start + seg.n] for seg in segments]


class ResetRule:
    """p = sigmoid(logit + bias); fires at the token that completes a run of k tokens with p >= threshold."""

    def __init__(self, logit_bias: float, threshold: float, consecutive: int) -> None:
        self.logit_bias = logit_bias
        self.threshold = threshold
        self.consecutive = consecutive
        self.run = 0
        self.max_p = 0.0
        self.last_p = 0.0

    def push(self, logit: float) -> bool:
        self.last_p = _sigmoid(logit + self.logit_bias)
        self.max_p = max(self.max_p, self.last_p)
        self.run = self.run + 1 if self.last_p >= self.threshold else 0
        return self.run >= self.consecutive


class ModelStream:
    """One response attempt read by the guard model under one policy's reset rule."""

    def __init__(self, guard: ModelGuard, prompt: str | None) -> None:
        self.guard = guard
        self.scorer = guard.scorer
        self.state = self.scorer.open_state(prompt)
        self.tok = IncrementalTokenizer(self.scorer.tokenizer)
        self.rule = ResetRule(guard.logit_bias, guard.threshold, self.scorer.model.cfg.consecutive)
        self.checked = 0  # response tokens whose logits the rule has read
        self.reset: Reset | None = None

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        if self.reset is not None:
            self.tok.text += text
            return Verdict(len(self.tok.text), self.reset, self.rule.max_p)
        ids, _ = self.tok.feed(text, final=final)
        if ids or len(self.state.logits) < len(self.state.response_ids):
            await self.scorer.score(self.state, ids)
        logits = self.state.logits
        while self.checked < len(logits) and self.reset is None:
            if self.rule.push(logits[self.checked]):
                first = self.checked - self.rule.consecutive + 1
                self.reset = Reset(self.tok.starts[first], self.guard.category, self.rule.last_p, "model")
            self.checked += 1
        if self.reset is not None:
            return Verdict(len(self.tok.text), self.reset, self.rule.max_p)
        return Verdict(self.tok.done_until, None, self.rule.max_p)

    def close(self) -> None:
        self.scorer.close_state(self.state)


class ModelGuard:
    """The guard model under one policy's `logit_bias` and `threshold`."""

    name = "model"

    def __init__(self, scorer: BatchScorer, logit_bias: float, threshold: float, category: str) -> None:
        self.scorer = scorer
        self.tokenizer = scorer.tokenizer
        self.logit_bias = logit_bias
        self.threshold = threshold
        self.category = category

    def open(self, prompt: str | None) -> ModelStream:
        return ModelStream(self, prompt)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def load_scorer(
    checkpoint: Path | None = None,
    base: str | None = None,
    max_batch_tokens: int = 512,
    queue_size: int = 256,
    threads: int | None = None,
    precision: str = "fp32",
) -> BatchScorer:
    """A scorer for a guard checkpoint (None: the bundled one) on its base (None: the one it names), at
    `precision` (`guard.precision.PRECISIONS`)."""
    model, _ = load_checkpoint(checkpoint or BUNDLED, base)
    tokenizer = GuardTokenizer(resolve_base(base or model.cfg.base))
    return BatchScorer(
        with_precision(model, precision),
        tokenizer,
        max_batch_tokens=max_batch_tokens,
        queue_size=queue_size,
        threads=threads,
    )
