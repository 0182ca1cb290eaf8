"""Line framing under SSE and NDJSON: linear scanning, and a bound on a line that never ends."""

import pytest

from proxy.dialects.anthropic import AnthropicCodec
from proxy.dialects.base import UpstreamFailure
from proxy.dialects.lines import MAX_LINE_BYTES, LineSplitter, TooLong
from proxy.dialects.ndjson import Line, NDJSONDecoder
from proxy.dialects.ollama import OllamaCodec
from proxy.dialects.openai import OpenAICodec
from proxy.dialects.sse import SSEDecoder, SSEEvent

CHUNK = b"x" * (64 * 1024)


@pytest.mark.parametrize(
    ("make", "start", "after"),
    [
        (SSEDecoder, b"data: ", b"\n\ndata: late\n\n"),
        (NDJSONDecoder, b"", b'\n{"a": 1}\n'),
    ],
    ids=["sse", "ndjson"],
)
def test_a_line_that_never_ends_stays_bounded_and_fails_once(
    make: type[SSEDecoder] | type[NDJSONDecoder], start: bytes, after: bytes
) -> None:
    decoder = make()
    events: list[object] = list(decoder.feed(start))
    most = 0
    for _ in range(8 * 1024 * 1024 // len(CHUNK)):
        events += decoder.feed(CHUNK)
        most = max(most, decoder.buffered)
    assert events == [TooLong(MAX_LINE_BYTES)]
    assert most <= MAX_LINE_BYTES and decoder.buffered == 0
    assert decoder.feed(after) == [] and decoder.flush() == []


def test_an_sse_event_of_endless_data_lines_is_bounded_too():
    decoder = SSEDecoder(max_line_bytes=100)
    assert decoder.feed(b"data: 0123456789\n" * 20) == [TooLong(100, "event")]
    assert decoder.buffered == 0


def test_a_whole_line_over_the_limit_in_one_chunk_fails():
    assert NDJSONDecoder(max_line_bytes=10).feed(b'{"a": "01234567"}\n') == [TooLong(10)]
    assert LineSplitter(cr=True, max_line_bytes=10).feed(b"ok\r" + b"y" * 11 + b"\r\n") == [
        b"ok",
        TooLong(10),
    ]


def test_every_codec_turns_a_long_line_into_an_upstream_failure():
    for codec in (
        OpenAICodec(chat=True, max_line_bytes=1000),
        AnthropicCodec("c", max_line_bytes=1000),
        OllamaCodec("l", chat=True, max_line_bytes=1000),
    ):
        events = codec.feed(b"data: " + b"x" * 2000)
        assert len(events) == 1 and isinstance(events[0], UpstreamFailure)
        assert events[0].error["message"] == "upstream sent a line over 1000 bytes"
        assert codec.feed(b"\n\n") == [] and codec.flush() == []


def test_a_long_line_split_in_many_chunks_comes_out_whole():
    text = "é" * 100_000  # 200 kB, under the limit
    wire = f"data: {text}\r\n\r\n".encode()
    decoder = SSEDecoder()
    events = [e for i in range(0, len(wire), 4096) for e in decoder.feed(wire[i : i + 4096])]
    assert events == [SSEEvent(text)]
    assert decoder.buffered == 0


def test_line_ends_found_in_new_bytes_only_still_split_correctly():
    splitter = LineSplitter(cr=True)
    assert splitter.feed(b"a") == []
    assert splitter.feed(b"b\r") == []  # a CR at the end may be half a CRLF
    assert splitter.feed(b"\nc\rd") == [b"ab", b"c"]
    assert splitter.feed(b"\n\n") == [b"d", b""]
    assert splitter.feed(b"e\r") == []
    assert splitter.flush() == [b"e"]
    lf = NDJSONDecoder()
    assert (
        lf.feed(b'{"a"') == []
        and lf.feed(b": 1}\r") == []
        and lf.feed(b'\n{"b": 2}\n{')
        == [
            Line({"a": 1}),
            Line({"b": 2}),
        ]
    )
    assert lf.buffered == 1
