"""`backtrack bench guard`: throughput and verdict latency of the scorer, against re-scoring prefixes.

For each number of concurrent streams, every stream feeds a response of `response_tokens` tokens in
pieces of about `new_tokens` tokens and waits for each verdict before sending the next piece (as the
proxy does). Reported: aggregate scored tokens/s, p50/p99 verdict latency, and the same workload done
naively (each step re-reads prompt + whole prefix, batched across streams, no cache). The model's FLOPs
per token and this CPU's measured matmul FLOP/s give the fraction of the roofline reached. With several
precisions (`--precision fp32,int8`), each gets its rows in the same run, the fp32 FLOPs as the roofline's
yardstick for all of them (int8 does the same work in cheaper arithmetic).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from guard.scorer import BatchScorer, load_scorer

PROMPT = "Can you explain how a bread recipe works, step by step, for a beginner baker at home?"
TEXT = (
    "Sure. Start by mixing flour, water, salt and yeast in a large bowl until a shaggy dough forms. "
    "Knead it for about ten minutes, until it is smooth and springs back when you press it. Cover the "
    "bowl and let the dough rise somewhere warm for an hour or two, until it has doubled in size. Shape "
    "it into a loaf, let it rise again, then bake it in a hot oven until the crust is deep brown. "
)


def matmul_flops(threads: int, seconds: float = 1.5) -> float:
    """Sustained fp32 FLOP/s of a (512 x 384) @ (384 x 1536) matmul, the guard's typical shape."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 384), torch.randn(384, 1536)
    for _ in range(5):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 512 * 384 * 1536 * n / (time.perf_counter() - start)


def pieces(scorer: BatchScorer, n_tokens: int, new_tokens: int) -> list[str]:
    """The bench response cut into word-aligned pieces of about `new_tokens` tokens."""
    text = TEXT * (1 + n_tokens // 60)
    ids, starts = scorer.tokenizer.encode(text)
    cuts = [starts[i] for i in range(0, min(n_tokens, len(ids)), new_tokens)] + [
        starts[min(n_tokens, len(ids) - 1)]
    ]
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


async def incremental(scorer: BatchScorer, n_streams: int, parts: list[str]) -> dict[str, float]:
    guard = scorer.guard(-1e9, 0.5)  # never resets: the whole response is scored
    latencies: list[float] = []
    scored = 0

    async def one() -> None:
        nonlocal scored
        s = guard.open(PROMPT)
        for i, part in enumerate(parts):
            t = time.perf_counter()
            await s.feed(part, final=i == len(parts) - 1)
            latencies.append(time.perf_counter() - t)
        scored += len(s.state.logits)
        s.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n_streams)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "tokens_per_s": scored / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


@torch.no_grad()
def rescoring(scorer: BatchScorer, n_streams: int, parts: list[str]) -> dict[str, float]:
    """The same workload, each step re-reading prompt + the whole prefix (all streams in one batch)."""
    head = scorer.tokenizer.prompt_ids(PROMPT, scorer.model.cfg.max_prompt_tokens)
    scored, text = 0, ""
    start = time.perf_counter()
    for part in parts:
        text += part
        ids = head + scorer.tokenizer.encode(text)[0]
        batch = torch.tensor([ids] * n_streams)
        types = torch.tensor([[0] * len(head) + [1] * (len(ids) - len(head))] * n_streams)
        scorer.model(batch, types)
        scored = n_streams * (len(ids) - len(head))
    return {"tokens_per_s": scored / (time.perf_counter() - start)}


@dataclass(frozen=True)
class Setup:
    """A loaded scorer, the workload's pieces, and the two halves of the roofline."""

    scorer: BatchScorer
    parts: list[str]
    peak: float  # this CPU's matmul FLOP/s
    context: int  # the mean context a token is scored in
    flops: float  # the model's FLOPs per token at that context


def setup(
    checkpoint: Path | None,
    threads: int,
    response_tokens: int,
    new_tokens: int,
    precision: str = "fp32",
    peak: float | None = None,
) -> Setup:
    """The scorer at `precision`; `peak` None: measure this CPU's matmul FLOP/s."""
    scorer = load_scorer(checkpoint, threads=threads, precision=precision)
    torch.set_num_threads(threads)
    parts = pieces(scorer, response_tokens, new_tokens)
    peak = peak or matmul_flops(threads)
    context = scorer.model.cfg.max_prompt_tokens // 2 + response_tokens // 2
    return Setup(scorer, parts, peak, context, scorer.model.flops_per_token(context))


async def started_incremental(scorer: BatchScorer, n_streams: int, parts: list[str]) -> dict[str, float]:
    """`incremental` with the scorer's worker running, on the current event loop."""
    await scorer.start()
    try:
        return await incremental(scorer, n_streams, parts)
    finally:
        await scorer.stop()


def run_bench(
    checkpoint: Path | None,
    streams: list[int],
    new_tokens: int,
    response_tokens: int,
    threads: int,
    precisions: tuple[str, ...] = ("fp32",),
    log: TextIO = sys.stdout,
) -> dict[str, Any]:
    """The table, one row per precision and stream count, printed to `log`; the results returned."""
    rows: list[dict[str, Any]] = []
    head = ["precision", "streams", "tok/s", "p50 ms", "p99 ms", "roofline", "rescore tok/s", "speedup"]
    widths = [9, 8, 9, 8, 8, 9, 14, 8]
    first: Setup | None = None
    for precision in precisions:
        s = setup(checkpoint, threads, response_tokens, new_tokens, precision, first.peak if first else None)
        if first is None:
            first = s
            print(
                f"model: {s.flops / 1e6:.1f} MFLOP/token at context {s.context}; "
                f"CPU matmul: {s.peak / 1e9:.1f} GFLOP/s",
                file=log,
            )
            print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)), file=log)
        for n in streams:
            inc = asyncio.run(started_incremental(s.scorer, n, s.parts))
            naive = rescoring(s.scorer, n, s.parts)
            row = {
                "precision": precision,
                "streams": n,
                **inc,
                "roofline": inc["tokens_per_s"] * first.flops / first.peak,
                "rescore_tokens_per_s": naive["tokens_per_s"],
                "speedup": inc["tokens_per_s"] / naive["tokens_per_s"],
            }
            rows.append(row)
            print(
                f"{precision:>9} {n:>8} {row['tokens_per_s']:>9.0f} {row['p50_ms']:>8.1f} "
                f"{row['p99_ms']:>8.1f} {row['roofline']:>9.1%} {row['rescore_tokens_per_s']:>14.0f} "
                f"{row['speedup']:>7.1f}x",
                file=log,
            )
    assert first is not None  # argparse requires at least one precision
    return {
        "flops_per_token": first.flops,
        "matmul_flops": first.peak,
        "threads": threads,
        "new_tokens": new_tokens,
        "response_tokens": response_tokens,
        "precisions": list(precisions),
        "rows": rows,
    }


async def guard_roofline(
    checkpoint: Path, streams: list[int], threads: int, precision: str | None = None
) -> dict[str, Any]:
    """The incremental workload at `backtrack bench guard`'s defaults, on the running event loop:
    tokens/s and the share of the roofline (`backtrack bench all`'s last part), at `precision` (None:
    the proxy's default, `guard.precision` in the config).
    """
    from proxy.core.config import ScorerConfig

    precision = precision or ScorerConfig().precision
    response_tokens, new_tokens = 128, 8  # `backtrack bench guard`'s defaults
    s = setup(checkpoint, threads, response_tokens, new_tokens, precision)
    rows = []
    for n in streams:
        row: dict[str, Any] = {"streams": n, **await started_incremental(s.scorer, n, s.parts)}
        row["roofline"] = row["tokens_per_s"] * s.flops / s.peak
        rows.append(row)
        print(
            f"  guard {n:>4} streams, {precision}: {row['tokens_per_s']:.0f} tokens/s, {row['roofline']:.1%}",
            file=sys.stderr,
        )
    return {
        "flops_per_token": s.flops,
        "context": s.context,
        "matmul_flops": s.peak,
        "threads": threads,
        "precision": precision,
        "new_tokens": new_tokens,
        "response_tokens": response_tokens,
        "rows": rows,
    }
