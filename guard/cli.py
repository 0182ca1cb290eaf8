"""`backtrack train` and `backtrack eval`, for the proxy's CLI to register.

torch and transformers are imported inside the commands, so that `backtrack serve` starts fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent


def register(subparsers: Any) -> None:
    """Add `train` and `eval` to an argparse subparsers object."""
    p = subparsers.add_parser("train", help="train the guard model (resumable)")
    p.add_argument("--config", type=Path, default=PACKAGE / "train.yaml", help="training YAML")
    p.add_argument("--out", type=Path, default=Path("/tmp/backtrack-guard-run"), help="run folder (resumes)")
    p.add_argument("--export", type=Path, default=None, help="write the final checkpoint here too")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval", help="stream labelled responses through the guard and measure it")
    p.add_argument("--data", type=Path, nargs="*", default=[], help="JSONL files in the shared schema")
    p.add_argument(
        "--calibration-of",
        type=Path,
        default=None,
        help="also score the calibration slice this training YAML held out of its train files",
    )
    p.add_argument("--scores", type=Path, required=True, help="per-row output JSONL")
    p.add_argument("--report", type=Path, default=None, help="folder for PNG plots")
    p.add_argument(
        "--policy", default=None, help="policy YAML path or name in policies/ (default: checkpoint's)"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="guard checkpoint folder (default: bundled)")
    p.add_argument("--base", default=None, help="base model folder or package (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each file")
    p.add_argument("--piece-tokens", type=int, default=16, help="approximate tokens per streamed piece")
    p.add_argument("--concurrency", type=int, default=32, help="rows streamed at once")
    p.add_argument("--dump-logits", type=Path, default=None, help="also write every row's per-token logits")
    p.add_argument("--sweep", action="store_true", help="print the best logit_bias per aggregation k")
    p.add_argument(
        "--fast", action="store_true", help="batched full-sequence passes instead of streaming (same logits)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="the guard's arithmetic (default: fp32)",
    )
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another run's --scores on the same data: print the share of same decisions and both AUPRCs",
    )
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from guard.train import train

    train(args.config, args.out, args.export)
    return 0


def resolve_policy(name_or_path: str) -> Path:
    """A YAML path as given, else `policies/NAME.yaml` in the working directory or the repository."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        return path
    for root in (Path.cwd(), PACKAGE.parent):
        candidate = root / "policies" / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"policy {name_or_path!r}: no such file and no policies/{name_or_path}.yaml")


def operating_point(checkpoint: Path | None, policy: str | None) -> tuple[float, float]:
    """(logit_bias, threshold) from the policy, else the checkpoint's recommended operating point."""
    if policy is not None:
        from proxy.core.policy import load_policy

        p = load_policy(resolve_policy(policy))
        return p.logit_bias, p.threshold
    from guard.scorer import BUNDLED

    meta = json.loads(((checkpoint or BUNDLED) / "guard.json").read_text(encoding="utf-8"))
    op = meta.get("operating_point", {})
    return float(op.get("logit_bias", 0.0)), float(op.get("threshold", 0.5))


def _eval(args: argparse.Namespace) -> int:
    from guard.data import Row, calibration_rows, read_rows
    from guard.evaluate import run_eval
    from guard.scorer import load_scorer

    if not args.data and args.calibration_of is None:
        raise SystemExit("backtrack eval: give --data FILE... and/or --calibration-of TRAIN.yaml")
    extra: list[Row] = []
    if args.calibration_of is not None:
        from guard.train import load_config

        cfg = load_config(args.calibration_of)
        extra = calibration_rows(read_rows(cfg["train_files"]), float(cfg.get("calibration_fraction", 0.0)))
    bias, threshold = operating_point(args.checkpoint, args.policy)
    scorer = load_scorer(args.checkpoint, args.base, threads=args.threads, precision=args.precision)
    run_eval(
        scorer,
        args.data,
        args.scores,
        bias,
        threshold,
        report=args.report,
        piece_tokens=args.piece_tokens,
        concurrency=args.concurrency,
        limit=args.limit,
        logits_out=args.dump_logits,
        sweep=args.sweep,
        fast=args.fast,
        extra_rows=extra,
        compare=args.compare,
    )
    return 0
