"""Training on a tiny model: it runs, checkpoints, resumes where it stopped, and exports a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from guard.model import load_checkpoint
from guard.train import (
    ExtraLosses,
    aggregated_max,
    early_response,
    load_config,
    lr_at,
    monotone_penalty,
    train,
)

ROWS = [
    {
        "source": "s",
        "id": str(i),
        "prompt": "how to make a bomb",
        "harmful": i % 2 == 0,
        "category": None,
        "response": "sure , here is how : step 1 get the bomb"
        if i % 2 == 0
        else "i can not help with that , sorry .",
    }
    for i in range(12)
]


def write_config(tmp_path: Path, tiny_base: Path, epochs: int) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"""seed: 1
base: {tiny_base}
train_files: [rows.jsonl]
max_rows_per_file: {{}}
window_fraction: 0.0
model: {{n_trainable_layers: 1, max_prompt_tokens: 8, consecutive: 2, dropout: 0.0}}
max_response_tokens: 16
min_onset: 2
batch_size: 4
epochs: {epochs}
lr: 1.0e-3
head_lr: 1.0e-2
weight_decay: 0.0
warmup_steps: 1
seq_loss_weight: 1.0
checkpoint_every: 2
time_budget_minutes: 5
threads: 1
""",
        encoding="utf-8",
    )
    return cfg


def test_train_checkpoints_resumes_and_exports(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(write_config(tmp_path, tiny_base, epochs=1), out)
    assert torch.load(out / "state.pt")["step"] == 3  # 12 rows / batch 4
    final = train(write_config(tmp_path, tiny_base, epochs=2), out)  # resumes at step 3, runs epoch 2
    assert torch.load(out / "state.pt")["step"] == 6
    model, meta = load_checkpoint(final)
    assert meta["train"]["steps"] == 6 and model.cfg.n_trainable_layers == 1


def test_aggregated_max_is_the_k_consecutive_rule() -> None:
    logits = torch.tensor([[5.0, -1.0, 3.0, 2.0, 9.0], [5.0, 6.0, 0.0, 0.0, 0.0]])
    response = torch.tensor([[True] * 5, [False, True, True, False, False]])
    assert aggregated_max(logits, response, 2).tolist() == [2.0, 0.0]
    assert aggregated_max(logits, response, 1).tolist() == [9.0, 6.0]


def test_schedule_ends_with_the_time_budget_when_that_comes_first() -> None:
    assert lr_at(0, 100, 10) == 0.1
    assert lr_at(10, 100, 10) == 1.0
    assert lr_at(55, 100, 10) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, time_used=0.5) == pytest.approx(0.5)  # half the budget spent
    assert lr_at(20, 100, 10, time_used=1.2) == 0.0


def test_the_early_window_is_the_first_response_tokens() -> None:
    response = torch.tensor(
        [[False, False, True, True, True, True], [False, True, True, False, False, False]]
    )
    assert early_response(response, 2).tolist() == [
        [False, False, True, True, False, False],
        [False, True, True, False, False, False],
    ]


def test_the_monotone_penalty_counts_only_drops_inside_a_harmful_run() -> None:
    logit = torch.logit(torch.tensor([[0.2, 0.9, 0.5, 0.7, 0.1], [0.9, 0.1, 0.9, 0.1, 0.9]]))
    targets = torch.tensor([[-1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    penalty = monotone_penalty(logit, targets)
    # row 0: pairs (0.9, 0.5), (0.5, 0.7), (0.7, 0.1): drops 0.4 and 0.6 over 3 pairs; the drop from the
    # ignored token 0 does not count. Row 1 is safe: no harmful run, no penalty.
    assert penalty.tolist() == pytest.approx([1.0 / 3, 0.0], abs=1e-6)


def test_the_extra_losses_change_what_is_learned(tiny_base: Path, tmp_path: Path) -> None:
    plain = write_config(tmp_path, tiny_base, epochs=1)
    model, _ = load_checkpoint(train(plain, tmp_path / "plain"))
    extras = tmp_path / "extras.yaml"
    extras.write_text(
        plain.read_text(encoding="utf-8")
        + "early_loss_weight: 1.0\nearly_loss_tokens: 4\nmonotone_loss_weight: 1.0\n"
        + "safe_weight_in_mixed_files: 2.0\n",
        encoding="utf-8",
    )
    assert ExtraLosses.from_config(yaml.safe_load(extras.read_text(encoding="utf-8"))) == ExtraLosses(
        1.0, 4, 1.0
    )
    other, _ = load_checkpoint(train(extras, tmp_path / "extras"))
    assert not torch.equal(model.head.weight, other.head.weight)


def test_a_config_that_extends_another_overrides_its_keys_and_resolves_each_files_paths(
    tmp_path: Path,
) -> None:
    (tmp_path / "runs").mkdir()
    base = {"train_files": ["data/a.jsonl"], "init_from": "ckpt", "epochs": 2, "lr": 1e-4}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    child = {"extends": "../base.yaml", "epochs": 1, "init_from": "other"}
    (tmp_path / "runs" / "child.yaml").write_text(yaml.safe_dump(child), encoding="utf-8")

    cfg = load_config(tmp_path / "runs" / "child.yaml")

    assert cfg == {
        "train_files": [(tmp_path / "data" / "a.jsonl").resolve()],  # the base's, relative to the base
        "init_from": (tmp_path / "runs" / "other").resolve(),  # the child's, relative to the child
        "epochs": 1,
        "lr": 1e-4,
    }
