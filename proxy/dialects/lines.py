"""Bytes into lines, sans-IO and bounded: the framing under both SSE and NDJSON.

`LineSplitter.feed(bytes) -> list[bytes | TooLong]` scans only the bytes that arrived since the last
call (the scan position is remembered), so a long line costs linear time however it is split. A line
longer than `max_line_bytes` is not buffered further: the splitter yields one `TooLong` and from then
on ignores its input, because a stream whose framing is lost cannot be trusted to resume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE_BYTES = 1024 * 1024  # far above any real chunk; a line past it is a broken or hostile upstream
_LINE_END = {True: re.compile(rb"[\r\n]"), False: re.compile(rb"\n")}


@dataclass(frozen=True, slots=True)
class TooLong:
    limit: int
    what: str = "line"

    @property
    def message(self) -> str:
        return f"upstream sent a {self.what} over {self.limit} bytes"


class LineSplitter:
    """Lines without their endings. `cr`: a lone CR and CRLF end lines too (SSE); else only LF (NDJSON,
    where a CR before the LF stays on the line as JSON whitespace)."""

    def __init__(self, *, cr: bool, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.failed = False
        self._cr = cr
        self._buffer = bytearray()
        self._scan = 0  # bytes before it hold no line end

    def __len__(self) -> int:
        """The bytes buffered: the start of a line whose end has not come yet."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes | TooLong]:
        if self.failed:
            return []
        buffer = self._buffer
        if not buffer and len(chunk) <= self.max_line_bytes and not (self._cr and b"\r" in chunk):
            # The common case, an upstream chunk that starts a line: split in one call. No line of it can
            # be over the limit, and its unfinished last line (if any) holds no line end.
            *lines, rest = chunk.split(b"\n")
            if rest:
                buffer += rest
                self._scan = len(rest)
            return list(lines)
        buffer += chunk
        out: list[bytes | TooLong] = []
        start = 0
        pattern = _LINE_END[self._cr]
        while (found := pattern.search(buffer, self._scan)) is not None:
            cut = found.start()
            skip = 1
            if buffer[cut] == 0x0D:  # CR
                if cut + 1 == len(buffer):
                    self._scan = cut
                    break  # the first half of a CRLF, perhaps: wait for the next byte
                skip = 2 if buffer[cut + 1] == 0x0A else 1
            if cut - start > self.max_line_bytes:
                return [*out, self._fail()]
            out.append(bytes(buffer[start:cut]))
            start = self._scan = cut + skip
        else:
            self._scan = len(buffer)
        if start:
            del buffer[:start]
            self._scan -= start
        if len(buffer) > self.max_line_bytes:
            out.append(self._fail())
        return out

    def flush(self) -> list[bytes | TooLong]:
        """End of input: a last line without its ending still counts."""
        if self.failed or not self._buffer:
            return []
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scan = 0
        if self._cr and rest.endswith(b"\r"):
            rest = rest[:-1]
        return [rest]

    def stop(self) -> None:
        """Read nothing more: what is buffered is dropped and every later input ignored."""
        self.failed = True
        self._buffer = bytearray()
        self._scan = 0

    def _fail(self) -> TooLong:
        self.stop()
        return TooLong(self.max_line_bytes)
