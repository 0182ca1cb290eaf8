"""The guard's tokenizer, whole and incremental.

Streams arrive in arbitrary pieces, but the guard must see exactly the tokens of the whole text. A
BERT-family tokenizer never joins characters across whitespace into one token, so text up to the last
whitespace can be tokenized now and the rest later with the same result; the trailing partial word is
held back until more text arrives or the stream ends. `tests/guard/test_tokenize.py` checks this at every
split point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    """A folder's `tokenizer.json` with character offsets; also a `TokenCounter` for the hold-back."""

    def __init__(self, folder: Path) -> None:
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` and the character offset where each starts."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def token_starts(self, text: str) -> list[int]:
        return self.encode(text)[1]


class GuardTokenizer(TextTokenizer):
    """A BERT-family tokenizer: the guard's input is `[CLS] prompt [SEP] response`."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        special = _special_tokens(folder)
        cls_id = self.tok.token_to_id(special.get("cls_token", "[CLS]"))
        sep_id = self.tok.token_to_id(special.get("sep_token", "[SEP]"))
        if cls_id is None or sep_id is None:
            raise ValueError(f"{folder}: tokenizer has no cls/sep token")
        self.cls_id: int = cls_id
        self.sep_id: int = sep_id

    def prompt_ids(self, prompt: str | None, max_tokens: int) -> list[int]:
        """`[CLS] prompt [SEP]`, the prompt cut to its last `max_tokens` tokens (none for a null prompt)."""
        ids = self.encode(prompt)[0][-max_tokens:] if prompt and max_tokens > 0 else []
        return [self.cls_id, *ids, self.sep_id]


def _special_tokens(folder: Path) -> dict[str, str]:
    path = folder / "special_tokens_map.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        k: v["content"] if isinstance(v, dict) else v for k, v in data.items() if isinstance(v, str | dict)
    }


@dataclass
class IncrementalTokenizer:
    """Feeds text piece by piece; yields the tokens whose extent can no longer change."""

    tok: TextTokenizer
    text: str = ""
    done_until: int = 0  # characters before this are tokenized for good
    ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def feed(self, text: str, *, final: bool = False) -> tuple[list[int], list[int]]:
        """New stable token ids and their start offsets (into all text fed so far)."""
        self.text += text
        cut = len(self.text) if final else _last_space(self.text, self.done_until)
        if cut <= self.done_until:
            return [], []
        ids, starts = self.tok.encode(self.text[self.done_until : cut])
        starts = [s + self.done_until for s in starts]
        self.done_until = cut
        self.ids += ids
        self.starts += starts
        return ids, starts


def _last_space(text: str, lo: int) -> int:
    """Index of the last whitespace character at or after `lo` (the cut goes before it), or `lo`."""
    for i in range(len(text) - 1, lo - 1, -1):
        if text[i].isspace():
            return i
    return lo
