"""A tiny WordPiece tokenizer for the guard tests' random models, written on the spot (no download)."""

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
