from proxy.dialects.sse import SSEDecoder, SSEEvent, encode_sse
from tests.transcripts import feed_all, splits

TRANSCRIPT = (
    b": keep-alive comment\r\n"
    b'data: {"a": 1}\r\n\r\n'
    b"event: ping\ndata: first line\ndata: second line\n\n"
    b"id: 7\rdata: caf\xc3\xa9 \xe2\x9c\x93\r\r"
    b"data:no-space\n\n"
    b"data: [DONE]\n\n"
)

EXPECTED = [
    SSEEvent('{"a": 1}'),
    SSEEvent("first line\nsecond line", "ping"),
    SSEEvent("café ✓", id="7"),
    SSEEvent("no-space", id="7"),
    SSEEvent("[DONE]", id="7"),
]


def test_every_split_gives_the_same_events():
    for parts in splits(TRANSCRIPT):
        assert feed_all(SSEDecoder, parts) == EXPECTED, parts


def test_a_crlf_split_between_cr_and_lf_is_one_line_end():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == [SSEEvent("x")]


def test_an_unterminated_last_event_is_dispatched_at_the_end():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.flush() == [SSEEvent("[DONE]")]


def test_blank_lines_without_data_dispatch_nothing():
    assert feed_all(SSEDecoder, [b"\n\n\nevent: x\n\n"]) == []


def test_encode_round_trips_multiline_data_and_event_names():
    wire = encode_sse("one\ntwo", event="backtrack_reset")
    assert wire == b"event: backtrack_reset\ndata: one\ndata: two\n\n"
    assert feed_all(SSEDecoder, [wire]) == [SSEEvent("one\ntwo", "backtrack_reset")]
