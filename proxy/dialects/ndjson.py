"""Newline-delimited JSON, sans-IO: `NDJSONDecoder.feed(bytes) -> list[Line | BadLine | TooLong]`.

One JSON value per line. Lines end at LF (a CR before it is JSON whitespace and is stripped with the
rest); blank lines are skipped. Bytes are split before decoding, which is safe for UTF-8 because no
multi-byte sequence contains LF, and JSON text never holds a raw LF inside a string. A line over
`max_line_bytes` ends the decoding with one `TooLong` (see `lines.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.dialects.lines import MAX_LINE_BYTES, LineSplitter, TooLong

__all__ = ["BadLine", "Line", "NDJSONDecoder", "TooLong", "encode_line"]


@dataclass(frozen=True, slots=True)
class Line:
    value: Any  # the parsed JSON value


@dataclass(frozen=True, slots=True)
class BadLine:
    text: str  # a line that is not JSON, cut short for error messages


class NDJSONDecoder:
    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._lines = LineSplitter(cr=False, max_line_bytes=max_line_bytes)

    @property
    def buffered(self) -> int:
        """Bytes held for a line not complete yet."""
        return len(self._lines)

    def feed(self, chunk: bytes) -> list[Line | BadLine | TooLong]:
        """Every complete line in the bytes so far; an incomplete last line waits for more."""
        return _parse_all(self._lines.feed(chunk))

    def flush(self) -> list[Line | BadLine | TooLong]:
        """End of stream: a last line without its LF still counts."""
        return _parse_all(self._lines.flush())


def _parse_all(lines: list[bytes | TooLong]) -> list[Line | BadLine | TooLong]:
    out: list[Line | BadLine | TooLong] = []
    for raw in lines:
        line = raw if isinstance(raw, TooLong) else _parse(raw)
        if line is not None:
            out.append(line)
    return out


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
