"""The batched incremental scorer: same scores as one full pass, same verdicts batched or alone."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from guard.scorer import BatchScorer, load_scorer
from proxy.core.detectors import Verdict
from proxy.core.errors import GuardError, GuardOverloaded

PROMPT = "how to make a bomb"
RESPONSES = [
    "sure , here is how to make a bomb : step 1 , get the flour . step 2 , mix sugar and eggs !",
    "i can not help with that , sorry .",
    "cake recipe : mix flour , sugar , eggs . bake in the oven for 3 minutes . good answer",
    "def hello ( ) : return print ( hello world ) python code you kill the car lock",
]


@pytest.fixture
async def scorer(tiny_checkpoint: Path) -> AsyncIterator[BatchScorer]:
    s = load_scorer(tiny_checkpoint, max_batch_tokens=64, queue_size=8)
    await s.start()
    yield s
    await s.stop()


def full_pass_logits(scorer: BatchScorer, prompt: str | None, response: str) -> list[float]:
    head = scorer.tokenizer.prompt_ids(prompt, scorer.model.cfg.max_prompt_tokens)
    ids = scorer.tokenizer.encode(response)[0]
    with torch.no_grad():
        logits = scorer.model(torch.tensor([head + ids]), torch.tensor([[0] * len(head) + [1] * len(ids)]))
    return logits[0, len(head) :].tolist()


async def stream(
    scorer: BatchScorer, response: str, piece: int, bias: float, threshold: float
) -> list[Verdict]:
    s = scorer.guard(bias, threshold).open(PROMPT)
    verdicts = [await s.feed(response[i : i + piece]) for i in range(0, len(response), piece)]
    verdicts.append(await s.feed("", final=True))
    s.close()
    return verdicts


async def test_incremental_scores_equal_the_full_pass(scorer: BatchScorer) -> None:
    for response in RESPONSES:
        for piece in (1, 3, 17, 1000):
            s = scorer.guard(-1000.0, 0.5).open(PROMPT)  # never resets: every token gets scored
            for i in range(0, len(response), piece):
                await s.feed(response[i : i + piece])
            await s.feed("", final=True)
            expected = full_pass_logits(scorer, PROMPT, response)
            assert s.state.logits == pytest.approx(expected, abs=1e-4)
            s.close()


async def test_reset_rule_needs_k_consecutive_tokens_and_points_at_the_run_start(scorer: BatchScorer) -> None:
    response = RESPONSES[0]
    logits = full_pass_logits(scorer, PROMPT, response)
    starts = scorer.tokenizer.encode(response)[1]
    threshold = 0.5
    bias = -sorted(logits)[len(logits) // 2]  # about half the tokens over threshold
    over = [1 / (1 + math.exp(-(x + bias))) >= threshold for x in logits]
    first = next(i for i in range(1, len(over)) if over[i] and over[i - 1])
    verdict = (await stream(scorer, response, 5, bias, threshold))[-1]
    assert verdict.reset is not None
    assert verdict.reset.at == starts[first - 1]
    assert verdict.reset.detector == "model" and verdict.reset.category == "unsafe"
    assert verdict.scored_until == len(response)


async def test_no_reset_under_a_strong_negative_bias_and_scored_until_follows_words(
    scorer: BatchScorer,
) -> None:
    s = scorer.guard(-50.0, 0.5).open(PROMPT)
    v = await s.feed("cake recipe : mi")
    assert v.reset is None and v.scored_until == len("cake recipe :")
    v = await s.feed("x flour", final=True)
    assert v.reset is None and v.scored_until == len("cake recipe : mix flour")
    assert 0.0 < v.score < 1e-6
    s.close()


async def test_many_streams_batched_give_the_verdicts_of_one_by_one(scorer: BatchScorer) -> None:
    def key(v: Verdict) -> tuple[int, int | None, float]:
        # Batched matmuls sum in another order: scores agree to float rounding, decisions exactly.
        return v.scored_until, v.reset.at if v.reset else None, round(v.score, 4)

    alone = [await stream(scorer, r, 4, -9.0, 0.6) for r in RESPONSES for _ in range(2)]
    sizes_before = len(scorer.batch_sizes)
    together = await asyncio.gather(*(stream(scorer, r, 4, -9.0, 0.6) for r in RESPONSES for _ in range(2)))
    assert [[key(v) for v in vs] for vs in together] == [[key(v) for v in vs] for vs in alone]
    assert {v[-1].reset is None for v in alone} == {True, False}  # the bias gives passes and resets
    assert max(list(scorer.batch_sizes)[sizes_before:]) > 1  # they really shared forward passes


async def test_long_streams_roll_over_past_the_position_limit(tiny_checkpoint: Path) -> None:
    scorer = load_scorer(tiny_checkpoint, max_batch_tokens=64)
    scorer.rollover_keep = 8
    await scorer.start()
    s = scorer.guard(-50.0, 0.5).open(PROMPT)
    text = " ".join(["flour sugar eggs"] * 40)  # 120 tokens, the tiny model has 64 positions
    v = await s.feed(text, final=True)
    assert v.scored_until == len(text) and len(s.state.logits) == 120
    assert s.state.length <= scorer.model.cfg.max_positions
    s.close()
    await scorer.stop()


async def test_a_full_queue_raises_overloaded_and_loses_no_text(tiny_checkpoint: Path) -> None:
    scorer = load_scorer(tiny_checkpoint, queue_size=2)
    await scorer.start()
    guard = scorer.guard(0.0, 0.99)
    streams = [guard.open(PROMPT) for _ in range(3)]
    first = [asyncio.create_task(s.feed("cake recipe : mix flour ")) for s in streams[:2]]
    await asyncio.sleep(0)  # both are queued; the worker has not run yet
    with pytest.raises(GuardOverloaded):
        await streams[2].feed("cake recipe : mix flour ")
    await asyncio.gather(*first)
    v = await streams[2].feed("sugar", final=True)  # the refused text is still in the stream
    assert v.scored_until == len("cake recipe : mix flour sugar")
    assert len(streams[2].state.logits) == len(scorer.tokenizer.encode("cake recipe : mix flour sugar")[0])
    for s in streams:
        s.close()
    await scorer.stop()


async def test_a_cancelled_feed_leaves_the_stream_consistent(scorer: BatchScorer) -> None:
    s = scorer.guard(-1000.0, 0.5).open(PROMPT)  # never resets: every token gets scored
    task = asyncio.create_task(s.feed(RESPONSES[2][:40]))
    await asyncio.sleep(0)
    task.cancel()  # what asyncio.wait_for does on the caller's timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    await s.feed(RESPONSES[2][40:], final=True)
    assert s.state.logits == pytest.approx(full_pass_logits(scorer, PROMPT, RESPONSES[2]), abs=1e-4)
    s.close()


async def test_a_failing_model_raises_guard_error(scorer: BatchScorer) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("boom")

    scorer.model.step = broken  # type: ignore[method-assign]
    s = scorer.guard(0.0, 0.5).open(PROMPT)
    with pytest.raises(GuardError, match="boom"):
        await s.feed("cake recipe ", final=True)
    s.close()


async def test_null_prompt_and_unstarted_scorer(tiny_checkpoint: Path) -> None:
    scorer = load_scorer(tiny_checkpoint)
    s = scorer.guard(0.0, 0.5).open(None)
    assert s.state.prompt_ids == [scorer.tokenizer.cls_id, scorer.tokenizer.sep_id]
    with pytest.raises(GuardError, match="not started"):
        await s.feed("cake recipe ")


async def test_the_scorer_runs_in_the_models_own_dtype(tiny_checkpoint: Path) -> None:
    """Nothing in the model or the cache is hard-wired to float32 (nor, by the same code, to the CPU):
    in float64 the incremental scores still equal the full pass, and the caches are float64."""
    s = load_scorer(tiny_checkpoint, max_batch_tokens=64, queue_size=8)
    s.model.to(torch.float64)
    await s.start()
    try:
        stream = s.guard(-1000.0, 0.5).open(PROMPT)
        for i in range(0, len(RESPONSES[0]), 7):
            await stream.feed(RESPONSES[0][i : i + 7])
        await stream.feed("", final=True)
        assert s.pool.kv is not None and s.pool.kv.dtype == torch.float64
        expected = full_pass_logits(s, PROMPT, RESPONSES[0])
        assert stream.state.logits == pytest.approx(expected, abs=1e-9)
        stream.close()
    finally:
        await s.stop()


@pytest.mark.parametrize(("precision", "tolerance"), [("bf16", 0.05), ("int8", 0.5)])
async def test_a_reduced_precision_scorer_stays_near_fp32(
    tiny_checkpoint: Path, precision: str, tolerance: float
) -> None:
    reference = load_scorer(tiny_checkpoint)
    s = load_scorer(tiny_checkpoint, max_batch_tokens=64, queue_size=8, precision=precision)
    assert not any(isinstance(m, torch.nn.Linear) for m in s.model.blocks.modules())  # all replaced
    await s.start()
    try:
        for response in RESPONSES:
            stream = s.guard(-1000.0, 0.5).open(PROMPT)
            for i in range(0, len(response), 5):
                await stream.feed(response[i : i + 5])
            await stream.feed("", final=True)
            expected = full_pass_logits(reference, PROMPT, response)
            assert stream.state.logits == pytest.approx(expected, abs=tolerance)
            stream.close()
    finally:
        await s.stop()
    with pytest.raises(ValueError, match="fp16"):
        load_scorer(tiny_checkpoint, precision="fp16")
