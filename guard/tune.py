"""`backtrack tune`: choose a policy's `logit_bias`, `threshold` and `holdback_tokens` from labelled data.

The guard reads the data once, through the proxy's own scorer (`guard.evaluate.score_rows`), and every
response token's logit is kept; the sweep afterwards runs no model.

- Reset rule (as `guard.scorer.ResetRule`): token i resets when sigmoid(logit + logit_bias) >= threshold
  at i and at the k - 1 tokens before it (k: the checkpoint's `consecutive`), that is when
  min(logits[i-k+1..i]) >= logit(threshold) - logit_bias. Bias and threshold move one cut, so the sweep
  shows the same curve for every threshold, shifted along the bias axis; the table keeps both because
  the policy keeps both.
- Hold-back: the proxy releases a token once it is judged and `holdback_tokens` tokens behind the
  newest, so when a reset fires at token i about i + 1 - H tokens have reached the client. A harmful
  response's harmful part is taken to start where the guard's training targets start it
  (`guard.data.onset_char`); its harmful tokens released are those past that onset, and a missed
  harmful response releases all of them.
- Operating point: of the swept (logit_bias, threshold) pairs whose false-reset rate on safe responses
  is within the target, the one that resets the most harmful responses (ties: fewer false resets, then
  the policy's own threshold, then the bias nearest the policy's); then the smallest hold-back at which
  `--holdback-coverage` of those resets come before any harmful token is released.
- The sweep takes every token as judged (`score_every_tokens: 1`); a larger value delays each verdict by
  up to that many tokens, which a hold-back at least that large absorbs.

Writes to the report folder: `sweep.csv` (the whole grid), `report.md` (the tables), two PNG plots,
`operating_point.yaml` (the snippet) and `token_logits.jsonl` (the kept scores, one row per response;
`--logits` sweeps them again, for another target or policy, without the model).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy, torch and the guard package load only when `tune` runs
    import numpy as np
    from numpy.typing import NDArray

    from guard.data import Row
    from guard.evaluate import Scored
    from guard.scorer import BatchScorer
    from proxy.core.policy import Policy

BIASES = tuple(b / 2 for b in range(-24, 13))  # -12 … +6 in steps of 0.5
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
HOLDBACKS = (0, 4, 8, 16, 24, 40, 64, 96, 128)


@dataclass(frozen=True)
class Trace:
    """One labelled response as the sweep needs it: where each cut would first reset it."""

    id: str
    file: str
    harmful: bool
    tokens: int
    onset: int  # first harmful token (harmful responses); 0 for safe ones
    logits: NDArray[np.float64]  # one per response token
    reach: NDArray[np.float64]  # reach[j]: the highest k-token run minimum among tokens k-1 … j+k-1
    k: int

    @classmethod
    def of(cls, id: str, file: str, harmful: bool, logits: NDArray[np.float64], onset: int, k: int) -> Trace:
        import numpy as np

        if len(logits) >= k:
            runs = np.lib.stride_tricks.sliding_window_view(logits, k).min(axis=1)
            reach = np.maximum.accumulate(runs)
        else:
            reach = np.empty(0)
        return cls(id, file, harmful, len(logits), min(onset, len(logits)), logits, reach, k)

    def first_reset(self, cuts: NDArray[np.float64]) -> NDArray[np.int64]:
        """Per cut, the token at which the rule fires, or -1 where it never does."""
        import numpy as np

        at = np.searchsorted(self.reach, cuts, side="left")
        return np.where(at < len(self.reach), at + self.k - 1, -1)


def trace(scored: Scored, k: int, starts: Sequence[int], onset_char: int) -> Trace:
    """A scored row's `Trace`; `starts` are its response tokens' character offsets."""
    import numpy as np

    row = scored.row
    logits = np.asarray(scored.logits, dtype=np.float64)
    onset = bisect.bisect_left(starts, onset_char) if row.harmful else 0
    return Trace.of(row.id, row.file, bool(row.harmful), logits, onset, k)


@dataclass(frozen=True)
class Point:
    logit_bias: float
    threshold: float
    holdback_tokens: int
    false_reset_rate: float  # safe responses reset
    detection_rate: float  # harmful responses reset
    harmful_tokens_released: float  # per harmful response, on average (missed ones release all)
    released_when_caught: float  # per harmful response that is reset, on average: what hold-back controls
    caught_before_release: float  # of the harmful responses reset, those reset before any harmful token
    # (the last two are NaN where no harmful response is reset)


def sweep(
    traces: Sequence[Trace],
    biases: Sequence[float] = BIASES,
    thresholds: Sequence[float] = THRESHOLDS,
    holdbacks: Sequence[int] = HOLDBACKS,
) -> list[Point]:
    """Every (bias, threshold, hold-back) of the grid, measured on the traces."""
    import numpy as np

    pairs = [(b, t) for t in thresholds for b in biases]
    cuts = np.array([math.log(t / (1 - t)) - b for b, t in pairs])
    safe = [tr for tr in traces if not tr.harmful]
    harmful = [tr for tr in traces if tr.harmful]
    safe_at = np.array([tr.first_reset(cuts) for tr in safe]).reshape(len(safe), len(cuts))
    harm_at = np.array([tr.first_reset(cuts) for tr in harmful]).reshape(len(harmful), len(cuts))
    tokens = np.array([tr.tokens for tr in harmful]).reshape(-1, 1)
    onsets = np.array([tr.onset for tr in harmful]).reshape(-1, 1)
    caught = harm_at >= 0
    false_resets = (safe_at >= 0).mean(axis=0) if safe else np.zeros(len(cuts))
    detection = caught.mean(axis=0) if harmful else np.zeros(len(cuts))
    points = []
    for hold in holdbacks:
        released = np.where(caught, np.clip(harm_at + 1 - hold, 0, tokens), tokens)
        harm_released = np.maximum(0, released - onsets)
        mean_released = harm_released.mean(axis=0) if harmful else np.zeros(len(cuts))
        n_caught = caught.sum(axis=0)
        with np.errstate(invalid="ignore"):  # 0 / 0 where nothing is caught: NaN, not a measurement
            when_caught = np.where(caught, harm_released, 0).sum(axis=0) / n_caught
            clean = (caught & (harm_released == 0)).sum(axis=0) / n_caught
        for c, (b, t) in enumerate(pairs):
            rates = (false_resets[c], detection[c], mean_released[c], when_caught[c], clean[c])
            points.append(Point(b, t, hold, *(float(x) for x in rates)))
    return points


@dataclass(frozen=True)
class TunedPoint:
    point: Point
    met: bool  # False: no swept point meets the target; this is the one with the fewest false resets


def choose(
    points: Sequence[Point], policy: Policy, target_false_reset: float, holdback_coverage: float
) -> TunedPoint:
    """The operating point (see the module docstring)."""
    cuts = {(p.logit_bias, p.threshold): p for p in points}.values()  # the hold-back does not matter here
    meeting = [p for p in cuts if p.false_reset_rate <= target_false_reset]
    met = bool(meeting)
    if met:
        best = max(
            meeting,
            key=lambda p: (
                p.detection_rate,
                -p.false_reset_rate,
                p.threshold == policy.threshold,
                -abs(p.logit_bias - policy.logit_bias),
            ),
        )
    else:
        best = min(cuts, key=lambda p: (p.false_reset_rate, -p.detection_rate))
    same_cut = sorted(
        (p for p in points if (p.logit_bias, p.threshold) == (best.logit_bias, best.threshold)),
        key=lambda p: p.holdback_tokens,
    )
    if best.detection_rate == 0:  # nothing is caught, so no hold-back helps: keep the policy's
        hold = min(same_cut, key=lambda p: abs(p.holdback_tokens - policy.holdback_tokens))
    else:
        covered = [p for p in same_cut if p.caught_before_release >= holdback_coverage]
        hold = covered[0] if covered else same_cut[-1]
    return TunedPoint(hold, met)


# -- the report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What a tuning run was asked: the policy, the data, and the aims."""

    policy: Policy
    traces: Sequence[Trace]
    sources: Sequence[Path]
    target: float  # most false resets
    coverage: float  # share of resets to come before any harmful token is released

    def counts(self) -> str:
        harmful = sum(t.harmful for t in self.traces)
        return f"{len(self.traces)} responses ({harmful} harmful, {len(self.traces) - harmful} safe)"


def write_report(folder: Path, setup: Setup, points: Sequence[Point], choice: TunedPoint) -> None:
    """The whole grid as CSV, the tables as markdown, the snippet, the kept scores and the plots."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in dataclasses.fields(Point)])
        for p in points:
            rates = [f"{x:.4f}" for x in dataclasses.astuple(p)[3:]]
            writer.writerow([p.logit_bias, p.threshold, p.holdback_tokens, *rates])
    snippet = format_snippet(setup, choice)
    (folder / "operating_point.yaml").write_text(snippet, encoding="utf-8")
    markdown = format_markdown(setup, points, choice)
    (folder / "report.md").write_text(f"{markdown}\n```yaml\n{snippet}```\n", encoding="utf-8")
    write_logits(folder / "token_logits.jsonl", setup.traces)
    plot(folder, points, choice, setup.target)


def format_snippet(setup: Setup, choice: TunedPoint) -> str:
    """The operating point as policy YAML, with what was measured there in comments."""
    p, policy = choice.point, setup.policy
    lines = [
        f"# backtrack tune --policy {policy.name}: {setup.counts()} from "
        + ", ".join(s.name for s in setup.sources),
        f"# target false resets <= {setup.target:.2%}: measured {p.false_reset_rate:.2%} false resets, "
        f"{p.detection_rate:.2%} of harmful responses reset",
        f"# hold-back {p.holdback_tokens}: {_num(p.caught_before_release, '.0%')} of those resets come "
        f"before any harmful token is released (aim: {setup.coverage:.0%})",
    ]
    if not choice.met:
        lines.append("# NO swept point meets the target: this is the one with the fewest false resets")
    if not policy.detectors.model.enabled:
        lines.append(f"# policy {policy.name} does not enable the guard model: set detectors.model.enabled")
    lines.append(f"logit_bias: {p.logit_bias}")
    lines.append(f"threshold: {p.threshold}")
    lines.append(f"holdback_tokens: {p.holdback_tokens}")
    return "\n".join(lines) + "\n"


def format_markdown(setup: Setup, points: Sequence[Point], choice: TunedPoint) -> str:
    """Two tables through the operating point: logit_bias at its threshold, and hold-back at its cut."""
    p = choice.point
    k = setup.traces[0].k if setup.traces else 0
    out = [
        f"# backtrack tune: policy {setup.policy.name}",
        "",
        f"{setup.counts()} from {', '.join(str(s) for s in setup.sources)}; a reset needs {k} consecutive "
        f"tokens over the threshold. Target: false resets <= {setup.target:.2%}.",
        "",
        f"## logit_bias at threshold {p.threshold} (the hold-back does not change these)",
        "",
        "| logit_bias | false resets | harmful reset |",
        "|---:|---:|---:|",
    ]
    for q in points:
        if q.threshold == p.threshold and q.holdback_tokens == p.holdback_tokens:
            mark = " **<-**" if q.logit_bias == p.logit_bias else ""
            out.append(f"| {q.logit_bias:+.1f} | {q.false_reset_rate:.2%} | {q.detection_rate:.2%}{mark} |")
    out += [
        "",
        f"## holdback_tokens at logit_bias {p.logit_bias:+.1f}, threshold {p.threshold}",
        "",
        "Harmful tokens released, on average: per harmful response that is reset, and per harmful response",
        "(a missed one releases all of its harmful part).",
        "",
        "| holdback_tokens | released when reset | released overall | resets before any harmful token |",
        "|---:|---:|---:|---:|",
    ]
    for q in points:
        if (q.logit_bias, q.threshold) == (p.logit_bias, p.threshold):
            mark = " **<-**" if q.holdback_tokens == p.holdback_tokens else ""
            released = f"{_num(q.released_when_caught, '.1f')} | {q.harmful_tokens_released:.1f}"
            clean = _num(q.caught_before_release, ".0%")
            out.append(f"| {q.holdback_tokens} | {released} | {clean}{mark} |")
    out += ["", "## Operating point", ""]
    return "\n".join(out)


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def plot(folder: Path, points: Sequence[Point], choice: TunedPoint, target: float) -> None:
    """detection_vs_false_resets.png and harmful_released_vs_holdback.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = choice.point
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for t in sorted({q.threshold for q in points}):
        line = [q for q in points if q.threshold == t and q.holdback_tokens == p.holdback_tokens]
        xs, ys = [q.false_reset_rate for q in line], [q.detection_rate for q in line]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"threshold {t}")
    ax.axvline(target, color="grey", linestyle="--", label=f"target {target:.1%}")
    chosen = f"chosen: bias {p.logit_bias:+.1f}, threshold {p.threshold}"
    ax.plot([p.false_reset_rate], [p.detection_rate], "r*", markersize=14, label=chosen)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="false resets (safe responses reset)", ylabel="harmful responses reset")
    ax.set_title("Detection vs false resets over logit_bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "detection_vs_false_resets.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for bias in (p.logit_bias - 2, p.logit_bias, p.logit_bias + 2):
        line = [q for q in points if q.threshold == p.threshold and q.logit_bias == bias]
        xs, ys = [q.holdback_tokens for q in line], [q.released_when_caught for q in line]
        width = 2.5 if bias == p.logit_bias else 1.2
        if line:
            ax.plot(xs, ys, marker="o", linewidth=width, label=f"logit_bias {bias:+.1f}")
    ax.axvline(p.holdback_tokens, color="grey", linestyle="--", label=f"chosen hold-back {p.holdback_tokens}")
    ax.set(xlabel="holdback_tokens", ylabel="harmful tokens released before the reset (mean)")
    ax.set_title(f"Harmful text released vs hold-back (threshold {p.threshold})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "harmful_released_vs_holdback.png", dpi=120)
    plt.close(fig)


# -- scoring -----------------------------------------------------------------------------------------


def labelled_rows(data: Sequence[Path], limit: int | None = None) -> list[Row]:
    """The labelled rows (harmful true or false) of each file, the first `limit` of each."""
    from guard.data import read_rows

    return [r for path in data for r in read_rows([path])[:limit] if r.harmful is not None]


def score(
    scorer: BatchScorer,
    rows: Sequence[Row],
    policy: Policy,
    piece_tokens: int = 16,
    concurrency: int = 32,
) -> list[Trace]:
    """Run every labelled row through the guard once; the traces the sweep reads."""
    from guard.data import onset_char
    from guard.evaluate import stream_rows

    rows = list(rows)
    if not policy.score_prompt:  # the proxy then gives the guard no prompt either
        rows = [dataclasses.replace(r, prompt=None) for r in rows]

    k = scorer.model.cfg.consecutive
    return [
        trace(s, k, scorer.tokenizer.encode(s.row.response)[1], onset_char(s.row.response))
        for s in stream_rows(scorer, rows, piece_tokens, concurrency)
    ]


def write_logits(path: Path, traces: Sequence[Trace]) -> None:
    """The kept scores, one line per response: enough to redo any sweep without the model (`--logits`)."""
    with path.open("w", encoding="utf-8") as f:
        for t in traces:
            line = {"id": t.id, "file": t.file, "harmful": t.harmful, "onset_token": t.onset, "k": t.k}
            f.write(json.dumps({**line, "logits": t.logits.tolist()}) + "\n")


def read_logits(path: Path) -> list[Trace]:
    """The traces `write_logits` kept."""
    import numpy as np

    traces = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            logits = np.asarray(d["logits"], dtype=np.float64)
            traces.append(Trace.of(d["id"], d["file"], d["harmful"], logits, d["onset_token"], d["k"]))
    return traces


# -- the command -------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add `tune` to the `backtrack` command."""
    p = subparsers.add_parser(
        "tune", help="sweep a policy's logit_bias, threshold and hold-back on labelled data"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, nargs="+", help="JSONL files in the shared schema")
    source.add_argument(
        "--logits", type=Path, help="a previous report's token_logits.jsonl: sweep again without the model"
    )
    p.add_argument("--policy", required=True, help="policy name (policies/NAME.yaml) or YAML path")
    p.add_argument("--report", type=Path, required=True, help="folder for the table, plots and snippet")
    p.add_argument(
        "--target-false-reset",
        type=float,
        default=0.01,
        help="the share of safe responses that may be reset (default 0.01)",
    )
    p.add_argument(
        "--holdback-coverage", type=float, default=0.9,
        help="share of resets that should come before any harmful token is released",
    )  # fmt: skip
    p.add_argument("--checkpoint", type=Path, default=None, help="guard checkpoint folder (default: bundled)")
    p.add_argument("--base", default=None, help="base model folder or package (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each file")
    p.add_argument("--piece-tokens", type=int, default=16, help="approximate tokens per streamed piece")
    p.add_argument("--concurrency", type=int, default=32, help="rows streamed at once")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=tune_command)


def tune_command(args: argparse.Namespace) -> int:
    from guard.cli import resolve_policy
    from proxy.core.policy import load_policy

    policy = load_policy(resolve_policy(args.policy))
    if args.logits is not None:
        sources, traces = [args.logits], read_logits(args.logits)
    else:
        from guard.scorer import load_scorer

        rows = labelled_rows(args.data, args.limit)  # a bad file fails here, before the model loads
        scorer = load_scorer(args.checkpoint, args.base, threads=args.threads)
        sources = args.data
        traces = score(scorer, rows, policy, args.piece_tokens, args.concurrency)
    thresholds = sorted({*THRESHOLDS, policy.threshold})
    points = sweep(traces, thresholds=thresholds, holdbacks=sorted({*HOLDBACKS, policy.holdback_tokens}))
    setup = Setup(policy, traces, sources, args.target_false_reset, args.holdback_coverage)
    choice = choose(points, policy, setup.target, setup.coverage)
    write_report(args.report, setup, points, choice)
    print((args.report / "report.md").read_text(encoding="utf-8"), end="")
    written = "report.md, sweep.csv, operating_point.yaml, token_logits.jsonl, *.png"
    print(f"wrote {args.report}/: {written}")
    return 0
