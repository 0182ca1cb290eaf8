from proxy.dialects.ndjson import BadLine, Line, NDJSONDecoder, encode_line
from tests.transcripts import feed_all, splits

TRANSCRIPT = (
    b'{"message":{"content":"H\xc3\xa9"},"done":false}\n'
    b"\n"
    b'{"message":{"content":" line\\nbreak"},"done":false}\r\n'
    b"{not json}\n"
    b'{"done":true,"eval_count":2}'  # no LF at the end: flush still reads it
)


def test_lines_are_the_same_at_every_split():
    expected = feed_all(NDJSONDecoder, [TRANSCRIPT])
    assert expected == [
        Line({"message": {"content": "Hé"}, "done": False}),
        Line({"message": {"content": " line\nbreak"}, "done": False}),
        BadLine("{not json}"),
        Line({"done": True, "eval_count": 2}),
    ]
    for parts in splits(TRANSCRIPT):
        assert feed_all(NDJSONDecoder, parts) == expected


def test_an_incomplete_line_waits_for_its_end():
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"a":') == []
    assert decoder.feed(b"1}\n") == [Line({"a": 1})]
    assert decoder.flush() == []


def test_encode_line_is_compact_utf8_with_one_lf():
    assert encode_line({"content": "Hé", "done": False}) == '{"content":"Hé","done":false}\n'.encode()
