"""Fixtures for the guard tests: tiny random models built on the spot (no download, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guard.tokenizer import write_tiny_bert


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer BERT (hidden 32) with a WordPiece tokenizer, as a local HF folder."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=3)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guard checkpoint on the tiny base whose head fires on some tokens (random but not constant)."""
    import torch

    from guard.model import from_base, save_checkpoint

    torch.manual_seed(1)
    model = from_base(str(tiny_base), n_trainable_layers=1, max_prompt_tokens=8, consecutive=2)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    torch.nn.init.zeros_(model.head.bias)
    folder = tmp_path_factory.mktemp("tiny-guard")
    save_checkpoint(model, folder)
    return folder
