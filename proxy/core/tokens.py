"""Token counting for the hold-back buffer.

The hold-back is measured in guard tokens. When a guard model is loaded the engine counts with its
tokenizer; otherwise it uses `ApproxTokenizer`: a word, a run of punctuation, or a run of whitespace
attached to the next word counts as one token. On English text this is within ~25% of BPE counts, and it
is local: tokenizing a suffix that starts at a token boundary gives the same tokens as the whole text.
"""

from __future__ import annotations

import re
from typing import Protocol

_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+", re.UNICODE)


class TokenCounter(Protocol):
    def token_starts(self, text: str) -> list[int]:
        """Character offsets at which the tokens of `text` start, ascending, the first one 0."""
        ...


class ApproxTokenizer:
    """Regex approximation of a subword tokenizer (see module docstring)."""

    def token_starts(self, text: str) -> list[int]:
        return [m.start() for m in _TOKEN.finditer(text)]

    def split(self, text: str) -> list[str]:
        """The token-sized pieces of `text`; joined they give `text` back."""
        return [m.group() for m in _TOKEN.finditer(text)]
