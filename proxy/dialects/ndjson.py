"""Newline-delimited JSON, sans-IO: `NDJSONDecoder.feed(bytes) -> list[Line | BadLine]` and `encode_line`.

One JSON value per line. Lines end at LF (a CR before it is JSON whitespace and is stripped with the
rest); blank lines are skipped. Bytes are split before decoding, which is safe for UTF-8 because no
multi-byte sequence contains LF, and JSON text never holds a raw LF inside a string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Line:
    value: Any  # the parsed JSON value


@dataclass(frozen=True, slots=True)
class BadLine:
    text: str  # a line that is not JSON, cut short for error messages


class NDJSONDecoder:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Line | BadLine]:
        """Every complete line in the bytes so far; an incomplete last line waits for more."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line for raw in lines if (line := _parse(raw)) is not None]

    def flush(self) -> list[Line | BadLine]:
        """End of stream: a last line without its LF still counts."""
        rest, self._buffer = self._buffer, b""
        line = _parse(rest)
        return [] if line is None else [line]


def _parse(raw: bytes) -> Line | BadLine | None:
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        return Line(json.loads(text))
    except ValueError:
        return BadLine(text[:80])


def encode_line(value: Any) -> bytes:
    """One compact JSON line, non-ASCII kept as UTF-8 (as Ollama writes it)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
