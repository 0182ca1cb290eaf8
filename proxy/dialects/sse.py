"""Server-sent events, sans-IO: `SSEDecoder.feed(bytes) -> list[SSEEvent]` and `encode_sse`.

Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; `data` lines accumulate; a blank
line dispatches; lines starting with ':' are comments. Bytes are split into lines before decoding, which
is safe for UTF-8 because no multi-byte sequence contains CR or LF.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            cut, skip = _line_end(self._buffer)
            if cut < 0:
                break
            line, self._buffer = self._buffer[:cut], self._buffer[cut + skip :]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream. Unlike a browser, dispatch an unterminated last event: an upstream that closes
        right after `data: [DONE]` without the blank line has still said it is done."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events += self.feed(b"\n")
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def _line_end(buffer: bytes) -> tuple[int, int]:
    """(index, length) of the first line ending, or (-1, 0) if none is complete yet."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr < 0 or (0 <= lf < cr):
        return (lf, 1) if lf >= 0 else (-1, 0)
    if cr == len(buffer) - 1:
        return (-1, 0)  # a CR at the end may be the first half of CRLF
    return (cr, 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, 1)


def encode_sse(data: str, event: str | None = None) -> bytes:
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()
