"""Fixtures for the guard tests: tiny random models built on the spot (no download, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guard.tokenizer import vocab_size, write_tokenizer


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer BERT (hidden 32) with a WordPiece tokenizer, as a local HF folder."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab_size(folder),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(folder))
    return folder


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
