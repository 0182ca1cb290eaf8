"""Fixtures for the guard tests: tiny random models built on the spot (no download, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

_WORDS = """
sure here is how to make a bomb step first get the i can not help with that sorry cake recipe
flour sugar eggs mix bake oven minutes answer question python code def return print hello world
you kill steal car lock pick window people good bad safe unsafe , . : ! ? ' - ( ) 1 2 3
"""


def write_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over a tiny vocabulary, saved as the `tokenizer.json` a HF folder has."""
    from tokenizers.implementations import BertWordPieceTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[RESET]"]
    vocab += list(dict.fromkeys(_WORDS.split() + letters + ["##" + c for c in letters]))
    tok = BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=True)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")


def vocab_size(folder: Path) -> int:
    return len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())


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
