"""Train the guard's top layers and reset head: `backtrack train --config guard/train.yaml --out DIR`.

The frozen lower layers are run once over every example and their output cached (fp16, in `DIR`), so
each epoch only runs the trained top layers. The run checkpoints every `checkpoint_every` steps into
`DIR/state.pt` and resumes from it when started again with the same `--out`; the batch order of an epoch
depends only on the seed and the epoch, so a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor
from tqdm import tqdm

from guard.data import IGNORE, Example, batches, build_examples, class_balanced_weights, read_rows
from guard.model import GuardModel, from_base, load_checkpoint, resolve_base, save_checkpoint
from guard.tokenize import GuardTokenizer


def load_config(path: Path) -> dict[str, Any]:
    """A training config; `extends: BASE.yaml` reads BASE first and overrides its top-level keys (each
    file's paths relative to itself), so a one-change experiment says only its change."""
    own: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    base = own.pop("extends", None)
    cfg = load_config(path.parent / base) if base else {}
    if "train_files" in own:
        own["train_files"] = [(path.parent / p).resolve() for p in own["train_files"]]
    if own.get("init_from"):
        own["init_from"] = (path.parent / own["init_from"]).resolve()
    cfg.update(own)
    return cfg


@dataclass
class Batch:
    x: Tensor  # (B, T, C) frozen-layer output
    targets: Tensor  # (B, T) in {IGNORE, 0, 1}
    response: Tensor  # (B, T) bool, response positions
    harmful: Tensor  # (B,) float
    weight: Tensor  # (B,) loss weight: file weight, class-balanced


def collate(examples: list[Example], cached: list[Tensor], weights: list[float]) -> Batch:
    T = max(len(e.ids) for e in examples)
    C = cached[0].shape[1]
    x = torch.zeros(len(examples), T, C)
    targets = torch.full((len(examples), T), IGNORE)
    response = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (e, h) in enumerate(zip(examples, cached, strict=True)):
        x[b, : len(e.ids)] = h.float()
        targets[b, e.n_prompt : len(e.ids)] = torch.tensor(e.targets)
        response[b, e.n_prompt : len(e.ids)] = True
    harmful = torch.tensor([float(e.harmful) for e in examples])
    weight = torch.tensor(weights)
    return Batch(x, targets, response, harmful, weight)


def aggregated_max(logits: Tensor, response: Tensor, k: int) -> Tensor:
    """Per row, max over response tokens of the min logit over the k tokens ending there: (B, T) -> (B,).

    This is the scorer's reset rule (k consecutive tokens over threshold) as one number per row.
    """
    big = torch.finfo(logits.dtype).max
    masked = logits.masked_fill(~response, -big)
    run = masked
    for j in range(1, k):
        shifted = F.pad(masked[:, :-j], (j, 0), value=-big)
        run = torch.minimum(run, shifted)
    # A row shorter than k has no run at all: a floor keeps its loss finite.
    return run.max(dim=1).values.clamp(min=-30.0)


@dataclass(frozen=True)
class ExtraLosses:
    """Loss terms beyond the token and response-level ones; all off by default (v1 and v2's recipes).

    - `early_weight`, `early_tokens`: the response-level loss once more, for harmful rows only, on the
      first `early_tokens` response tokens: a harmful answer must be reset early, not only at some point.
    - `monotone_weight`: Kelp's monotone loss: inside a harmful run, the reset probability must not fall
      back from one token to the next.
    """

    early_weight: float = 0.0
    early_tokens: int = 0
    monotone_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ExtraLosses:
        return cls(
            float(cfg.get("early_loss_weight", 0.0)),
            int(cfg.get("early_loss_tokens", 0)),
            float(cfg.get("monotone_loss_weight", 0.0)),
        )


def early_response(response: Tensor, n: int) -> Tensor:
    """The first `n` response positions of each row: (B, T) bool -> (B, T) bool."""
    return response & (response.cumsum(dim=1) <= n)


def monotone_penalty(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row, the mean drop of the reset probability between consecutive harmful-target tokens.

    (B, T) logits and targets -> (B,); rows without two consecutive targets of 1 give 0.
    """
    p = torch.sigmoid(logits)
    pairs = (targets[:, 1:] == 1) & (targets[:, :-1] == 1)  # (B, T-1)
    drop = F.relu(p[:, :-1] - p[:, 1:]) * pairs
    return drop.sum(1) / pairs.sum(1).clamp(min=1)


def loss_fn(
    model: GuardModel, batch: Batch, seq_weight: float, extra: ExtraLosses = ExtraLosses()
) -> tuple[Tensor, dict[str, float]]:
    logits = model.upper(batch.x)  # (B, T)
    labelled = batch.targets != IGNORE
    per_token = F.binary_cross_entropy_with_logits(
        logits, batch.targets.clamp(min=0).float(), reduction="none"
    )
    # Each example weighs the same whatever its length: long benign answers must not drown the rest.
    per_example = (per_token * labelled).sum(1) / labelled.sum(1).clamp(min=1)
    token_loss = (per_example * batch.weight).mean()
    agg = aggregated_max(logits, batch.response, model.cfg.consecutive)
    seq_loss = (
        F.binary_cross_entropy_with_logits(agg, batch.harmful, reduction="none") * batch.weight
    ).mean()
    loss = token_loss + seq_weight * seq_loss
    parts = {"tok": token_loss.item(), "seq": seq_loss.item()}
    if extra.early_tokens and extra.early_weight:
        early = early_response(batch.response, extra.early_tokens)
        agg_early = aggregated_max(logits, early, model.cfg.consecutive)
        early_loss = (
            F.binary_cross_entropy_with_logits(agg_early, batch.harmful, reduction="none")
            * batch.weight
            * batch.harmful
        ).sum() / batch.harmful.sum().clamp(min=1)
        loss = loss + extra.early_weight * early_loss
        parts["early"] = early_loss.item()
    if extra.monotone_weight:
        mono = monotone_penalty(logits, batch.targets)
        loss = loss + extra.monotone_weight * (mono * batch.weight).mean()
        parts["mono"] = mono.mean().item()
    return loss, parts


@torch.no_grad()
def cache_lower(model: GuardModel, examples: list[Example], batch_size: int) -> list[Tensor]:
    """Frozen layers' output per example, fp16 (B, T_e, C): computed once, reused every epoch."""
    model.eval()
    out: list[Tensor] = [torch.empty(0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in tqdm(range(0, len(order), batch_size), desc="cache frozen layers", unit="batch"):
        idx = order[start : start + batch_size]
        T = max(len(examples[i].ids) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        types = torch.zeros(len(idx), T, dtype=torch.long)
        for b, i in enumerate(idx):
            e = examples[i]
            ids[b, : len(e.ids)] = torch.tensor(e.ids)
            types[b, e.n_prompt : len(e.ids)] = 1
        h = model.lower(ids, types)
        for b, i in enumerate(idx):
            out[i] = h[b, : len(examples[i].ids)].to(torch.float16).clone()
    return out


def lr_at(step: int, total: int, warmup: int, time_used: float = 0.0) -> float:
    """Warmup, then cosine decay to 0 over the planned steps or the time budget, whichever ends first.

    `time_used` is the share of the wall-time budget spent so far: a run that the budget will stop
    before its last planned step still ends its schedule at a low learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_used)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(config_path: Path, out: Path, export: Path | None = None) -> Path:
    """Run (or resume) training; returns the folder of the final guard checkpoint."""
    cfg = load_config(config_path)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    model = from_base(cfg["base"], **cfg["model"])
    if cfg.get("init_from"):
        # A warm restart: the trained layers start from an earlier guard (the lower layers are the
        # base's either way); a fresh optimizer and schedule run from there.
        earlier, _ = load_checkpoint(cfg["init_from"], base=cfg["base"])
        if earlier.cfg.n_trainable_layers != model.cfg.n_trainable_layers:
            raise ValueError(
                f"init_from {cfg['init_from']}: trained layers differ from model.n_trainable_layers"
            )
        model.load_state_dict(earlier.trainable_state(), strict=False)
    tok = GuardTokenizer(resolve_base(cfg["base"]))
    examples = build_examples(read_rows(cfg["train_files"]), tok, cfg, random.Random(cfg["seed"]))
    n_harm = sum(e.harmful for e in examples)
    weights = class_balanced_weights(examples)
    per_file: dict[str, list[int]] = {}
    for e in examples:
        counts = per_file.setdefault(e.file, [0, 0])
        counts[0] += 1
        counts[1] += e.harmful
    print(
        f"{len(examples)} examples, {n_harm} harmful, {sum(len(e.ids) for e in examples)} tokens", flush=True
    )

    cache_path = out / "frozen_cache.pt"
    if cache_path.exists():
        cached: list[Tensor] = torch.load(cache_path)
    else:
        cached = cache_lower(model, examples, cfg["batch_size"])
        torch.save(cached, cache_path)

    model.freeze_lower()
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": cfg["lr"]}, {"params": head, "lr": cfg["head_lr"]}],
        weight_decay=cfg["weight_decay"],
    )
    steps_per_epoch = math.ceil(len(examples) / cfg["batch_size"])
    total = steps_per_epoch * cfg["epochs"]
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        started -= state["elapsed"]
        print(f"resumed at step {step}", flush=True)

    def checkpoint() -> None:
        state = {
            "model": model.trainable_state(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.monotonic() - started,
        }
        torch.save(state, out / "state.tmp")
        (out / "state.tmp").replace(state_path)

    extra = ExtraLosses.from_config(cfg)
    model.train()
    budget = cfg["time_budget_minutes"] * 60
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    for epoch in range(step // steps_per_epoch, cfg["epochs"]):
        order = list(batches(examples, cfg["batch_size"], random.Random(cfg["seed"] * 1000 + epoch)))
        for idx in order[step - epoch * steps_per_epoch :]:
            scale = lr_at(step, total, cfg["warmup_steps"], (time.monotonic() - started) / budget)
            for group, base_lr in zip(opt.param_groups, (cfg["lr"], cfg["head_lr"]), strict=True):
                group["lr"] = base_lr * scale
            batch = collate([examples[i] for i in idx], [cached[i] for i in idx], [weights[i] for i in idx])
            loss, parts = loss_fn(model, batch, cfg["seq_loss_weight"], extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(body + head, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(
                epoch=epoch, loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}
            )
            if step % cfg["checkpoint_every"] == 0:
                checkpoint()
            if time.monotonic() - started > budget:
                break
        else:
            continue
        print(f"time budget reached at step {step}/{total}", flush=True)
        break
    bar.close()
    checkpoint()
    model.eval()
    wall = time.monotonic() - started
    final = export or out / "checkpoint"
    save_checkpoint(
        model,
        final,
        {
            "train": {
                "steps": step,
                "total_steps": total,
                "examples": len(examples),
                "examples_per_file": per_file,  # [examples, harmful], late windows included
                "wall_seconds": round(wall),
                "threads": cfg["threads"],
            }
        },
    )
    print(f"saved {final} after {wall / 60:.1f} min", flush=True)
    return final
