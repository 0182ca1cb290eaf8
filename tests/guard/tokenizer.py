"""A tiny WordPiece tokenizer and random BERTs on it for the guard tests, made on the spot (no download)."""

from __future__ import annotations

from pathlib import Path

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
    """How many tokens the vocabulary `write_tokenizer` saved in `folder` has."""
    return len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())


def write_tiny_bert(folder: Path, layers: int) -> Path:
    """A random BERT (hidden 32, 4 heads, 64 positions) of `layers` layers with `write_tokenizer`'s
    vocabulary, saved in `folder` as a local HF folder."""
    import torch
    from transformers import BertConfig, BertModel

    write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab_size(folder),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(folder))
    return folder
