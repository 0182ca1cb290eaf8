"""Server-sent events, sans-IO: `SSEDecoder.feed(bytes) -> list[SSEEvent | TooLong]` and `encode_sse`.

Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; `data` lines accumulate; a blank
line dispatches; lines starting with ':' are comments. Bytes are split into lines before decoding, which
is safe for UTF-8 because no multi-byte sequence contains CR or LF. A line, or an event's data, over
`max_line_bytes` ends the decoding with one `TooLong`: buffering more would let an upstream that never
ends a line take the proxy's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.dialects.lines import MAX_LINE_BYTES, LineSplitter, TooLong

__all__ = ["SSEDecoder", "SSEEvent", "TooLong", "encode_sse"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._lines = LineSplitter(cr=True, max_line_bytes=max_line_bytes)
        self._data: list[str] = []
        self._size = 0  # bytes in `_data`, bounded like a line
        self._event = ""
        self._id: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an event not complete yet."""
        return len(self._lines) + self._size

    def feed(self, chunk: bytes) -> list[SSEEvent | TooLong]:
        return self._decode(self._lines.feed(chunk))

    def flush(self) -> list[SSEEvent | TooLong]:
        """End of stream. Unlike a browser, dispatch an unterminated last event: an upstream that closes
        right after `data: [DONE]` without the blank line has still said it is done."""
        lines = self._lines.flush()
        if self._data or lines:
            lines.append(b"")
        return self._decode(lines)

    def _decode(self, lines: list[bytes | TooLong]) -> list[SSEEvent | TooLong]:
        events: list[SSEEvent | TooLong] = []
        for line in lines:
            event = line if isinstance(line, TooLong) else self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            if isinstance(event, TooLong):
                self._data, self._size = [], 0
                break
        return events

    def _line(self, line: str) -> SSEEvent | TooLong | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._size, self._event = [], 0, ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._lines.max_line_bytes:
                self._lines.stop()  # nothing more is read: the event cannot be finished
                return TooLong(self._lines.max_line_bytes, "event")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def encode_sse(data: str, event: str | None = None) -> bytes:
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()
