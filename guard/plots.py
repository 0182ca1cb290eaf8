"""PNG plots for `backtrack eval --report DIR`: PR curve, the logit-bias trade-off, reset positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.evaluate import Scored

BIASES = [b / 2 for b in range(-24, 11)]  # -12 … +5 in steps of 0.5


def bias_sweep(scored: Sequence[Scored], threshold: float, k: int) -> list[tuple[float, float, float, float]]:
    """Per bias: (bias, false resets: ordinary answers, labelled safe rows; detection of harmful rows)."""
    from guard.evaluate import ORDINARY_FILES, is_labelled_file

    cut = math.log(threshold / (1 - threshold))
    benign = [s.agg_logit(k) for s in scored if s.row.file in ORDINARY_FILES]
    safe = [s.agg_logit(k) for s in scored if is_labelled_file(s.row.file) and s.row.harmful is False]
    harmful = [s.agg_logit(k) for s in scored if s.row.harmful]

    def rate(aggs: list[float], b: float) -> float:
        return sum(a + b >= cut for a in aggs) / max(1, len(aggs))

    return [(b, rate(benign, b), rate(safe, b), rate(harmful, b)) for b in BIASES]


def write_report(
    folder: Path,
    scored: Sequence[Scored],
    rows: Sequence[dict[str, Any]],
    bias: float,
    threshold: float,
    k: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6, 5))
    files: dict[str, list[dict[str, Any]]] = {}
    for s, r in zip(scored, rows, strict=True):
        if r["harmful"] is not None:
            files.setdefault(s.row.file, []).append(r)
            files.setdefault("all", []).append(r)
    for name, rs in sorted(files.items()):
        if not any(r["harmful"] for r in rs) or all(r["harmful"] for r in rs):
            continue
        ranked = sorted(rs, key=lambda r: -r["max_score"])
        pos = sum(bool(r["harmful"]) for r in rs)
        tp, precision, recall = 0, [], []
        for i, r in enumerate(ranked, 1):
            tp += bool(r["harmful"])
            precision.append(tp / i)
            recall.append(tp / pos)
        ax.plot(recall, precision, label=name, linewidth=2.5 if name == "all" else 1.2)
    ax.set(xlabel="recall (harmful responses reset)", ylabel="precision", title="PR curve", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "pr_curve.png", dpi=120)
    plt.close(fig)

    sweep = bias_sweep(scored, threshold, k)
    fig, ax = plt.subplots(figsize=(6, 5))
    for col, label in ((1, "ordinary answers"), (2, "safe rows of labelled files")):
        ax.plot([p[col] for p in sweep], [p[3] for p in sweep], marker="o", markersize=3, label=label)
    for p in sweep[::4]:
        ax.annotate(f"{p[0]:+.0f}", (p[1], p[3]), fontsize=7)
    here = next((p for p in sweep if p[0] == bias), None)
    if here:
        ax.plot([here[1], here[2]], [here[3], here[3]], "r*", markersize=12, label=f"policy bias {bias:+.1f}")
    ax.legend(fontsize=8)
    ax.set(xlim=(0, 0.6), xlabel="false resets (share of safe responses)", ylabel="harmful responses reset")
    ax.set_title(f"logit_bias sweep (threshold {threshold}, {k} consecutive tokens)")
    fig.tight_layout()
    fig.savefig(folder / "bias_sweep.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    harm = [r["reset_at_token"] for r in rows if r["reset"] and r["harmful"]]
    safe = [r["reset_at_token"] for r in rows if r["reset"] and not r["harmful"]]
    ax.hist([harm, safe], bins=30, label=["harmful", "safe (false resets)"], stacked=True)
    ax.axvline(128, color="grey", linestyle="--")
    ax.set(xlabel="response token where the reset fired", ylabel="responses", title="Reset positions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "reset_positions.png", dpi=120)
    plt.close(fig)
