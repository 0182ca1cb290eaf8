import json

import pytest

from proxy.core.engine import Piece, ResetEvent
from proxy.core.errors import ClientError
from proxy.core.policy import Action
from proxy.dialects.anthropic import AnthropicCodec, parse_request
from proxy.dialects.base import ChoiceFinish, ChoicePiece, Done, Passthrough, UpstreamFailure
from proxy.dialects.sse import SSEDecoder
from tests.fakes import ANTHROPIC_MESSAGE
from tests.transcripts import feed_all, splits

MESSAGE = ANTHROPIC_MESSAGE


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


START = {"type": "message_start", "message": MESSAGE}
THINK_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "thinking", "thinking": ""},
}
THINK = {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}}
SIGN = {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}}
TEXT_START = {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}
TEXT = {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hé there"}}
TOOL_START = {
    "type": "content_block_start",
    "index": 2,
    "content_block": {"type": "tool_use", "id": "t1", "name": "weather", "input": {}},
}
TOOL = {
    "type": "content_block_delta",
    "index": 2,
    "delta": {"type": "input_json_delta", "partial_json": "{}"},
}
FINAL = {
    "type": "message_delta",
    "delta": {"stop_reason": "tool_use", "stop_sequence": None},
    "usage": {"output_tokens": 9},
}
EVENTS = [
    START,
    {"type": "ping"},
    THINK_START,
    THINK,
    SIGN,
    {"type": "content_block_stop", "index": 0},
    TEXT_START,
    TEXT,
    {"type": "content_block_stop", "index": 1},
    TOOL_START,
    TOOL,
    {"type": "content_block_stop", "index": 2},
    FINAL,
    {"type": "message_stop"},
]
TRANSCRIPT = b"".join(sse(e) for e in EVENTS)


def test_decoder_events_are_the_same_at_every_split():
    expected = feed_all(lambda: AnthropicCodec("claude"), [TRANSCRIPT])
    for parts in splits(TRANSCRIPT):
        assert feed_all(lambda: AnthropicCodec("claude"), parts) == expected


def test_only_text_deltas_carry_text_and_every_block_event_rides_in_order():
    events = feed_all(lambda: AnthropicCodec("claude"), [TRANSCRIPT])
    assert events[:2] == [Passthrough(START), Passthrough({"type": "ping"})]
    pieces = [e for e in events if isinstance(e, ChoicePiece)]
    assert [p.piece.extra for p in pieces] == EVENTS[2:12]
    assert [p.piece.text for p in pieces] == ["", "", "", "", "", "Hé there", "", "", "", ""]
    assert events[-2:] == [ChoiceFinish(0, "tool_use", FINAL), Done()]


def test_upstream_errors_and_malformed_events():
    wire = sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    events = feed_all(lambda: AnthropicCodec("m"), [wire])
    assert events == [UpstreamFailure({"type": "overloaded_error", "message": "Overloaded"})]
    (event,) = feed_all(lambda: AnthropicCodec("m"), [b"event: x\ndata: {oops\n\n"])
    assert isinstance(event, UpstreamFailure) and "malformed" in event.error["message"]


def decode(wire: bytes) -> list[tuple[str, dict]]:
    return [(e.event, json.loads(e.data)) for e in SSEDecoder().feed(wire)]


def relay(codec: AnthropicCodec, events: list) -> bytes:
    """What a relay without a guard would send: every event encoded as it comes."""
    out = b""
    for e in events:
        if isinstance(e, ChoicePiece):
            out += codec.piece(0, e.piece)
        elif isinstance(e, Passthrough):
            out += codec.passthrough(e)
        elif isinstance(e, ChoiceFinish):
            out += codec.finish(0, e.reason, e.choice)
    return out + codec.end()


def test_an_untouched_stream_is_re_encoded_as_it_came():
    codec = AnthropicCodec("claude")
    assert decode(relay(codec, codec.feed(TRANSCRIPT))) == [(e["type"], e) for e in EVENTS]


RESET = ResetEvent("weapons", Action.REFUSE, 0.91234, "patterns", 8, 3, "dropped", "default")


def test_a_reset_is_a_backtrack_reset_event_and_a_refusal_goes_into_the_open_text_block():
    codec = AnthropicCodec("claude")
    events = codec.feed(sse(START) + sse(TEXT_START) + sse(TEXT))
    wire = relay_until(codec, events) + codec.reset(0, RESET) + codec.piece(0, Piece("No."))
    wire += codec.finish(0, "stop", None) + codec.end()

    received = decode(wire)
    assert received[3] == (
        "backtrack_reset",
        {
            "type": "backtrack_reset",
            "event": "reset",
            "retract_chars": 8,
            "category": "weapons",
            "policy": "default",
            "score": 0.9123,
        },
    )
    assert received[4] == (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "No."}},
    )
    assert [name for name, _ in received[5:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert received[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert "dropped" not in wire.decode()


def relay_until(codec: AnthropicCodec, events: list) -> bytes:
    out = b""
    for e in events:
        out += codec.passthrough(e) if isinstance(e, Passthrough) else codec.piece(0, e.piece)
    return out


def test_a_cut_without_recovery_text_stops_with_refusal_and_keeps_the_upstreams_usage():
    codec = AnthropicCodec("claude")
    wire = relay_until(codec, codec.feed(sse(START) + sse(TEXT_START) + sse(TEXT)))
    wire += codec.finish(0, "content_filter", None)
    codec.feed(sse({**FINAL, "delta": {"stop_reason": "end_turn", "stop_sequence": None}}))  # comes later
    wire += codec.end()

    *_, (_, message_delta), (_, stop) = decode(wire)
    assert message_delta == {
        "type": "message_delta",
        "delta": {"stop_reason": "refusal", "stop_sequence": None},
        "usage": {"output_tokens": 9},
    }
    assert stop == {"type": "message_stop"}


def test_a_regenerated_attempt_gets_new_block_indices_and_no_second_message_start():
    codec = AnthropicCodec("claude")
    wire = relay_until(codec, codec.feed(sse(START) + sse(TEXT_START) + sse(TEXT)))
    wire += codec.reset(0, RESET)
    codec.begin_attempt()
    again = {**TEXT_START, "index": 0}
    wire += relay_until(codec, codec.feed(sse(START) + sse(again) + sse({**TEXT, "index": 0})))

    names = [(name, body.get("index")) for name, body in decode(wire)]
    assert names == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("backtrack_reset", None),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
    ]


def test_text_before_any_upstream_event_gets_a_made_up_message_start():
    codec = AnthropicCodec("claude")
    received = decode(codec.reset(0, RESET) + codec.piece(0, Piece("No.")) + codec.finish(0, "stop", None))
    assert received[0][1]["message"]["model"] == "claude"
    assert [name for name, _ in received] == [
        "message_start",
        "backtrack_reset",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    ]


def test_in_band_errors_are_anthropic_error_events():
    codec = AnthropicCodec("claude")
    codec.passthrough(Passthrough(START))
    assert decode(codec.error("upstream stream broke", "upstream_error")) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "upstream stream broke"}})
    ]


REQUEST = {
    "model": "claude",
    "max_tokens": 100,
    "system": "Be brief.",
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Tell me"}]},
        {"role": "assistant", "content": "Sure, here"},
    ],
}


def test_the_request_gives_prompt_prefill_and_the_bodies_to_ask_again():
    req = parse_request(json.dumps(REQUEST).encode())
    assert (req.prompt, req.prefill, req.stream, req.model) == ("Tell me", "Sure, here", False, "claude")
    again = req.regenerate_body("Be safe.")
    assert again["system"] == "Be safe.\n\nBe brief."
    assert again["messages"] == REQUEST["messages"][:1]
    injected = req.inject_body("Sure, here is how[RESET]")
    assert injected is not None
    assert injected["messages"][-1] == {"role": "assistant", "content": "Sure, here is how[RESET]"}
    assert len(injected["messages"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"messages": []}',
        b'{"model": "m", "messages": []}',
        b'{"model": "m", "messages": [{"role": "system"}]}',
    ],
)
def test_bad_requests_are_client_errors(body: bytes):
    with pytest.raises(ClientError):
        parse_request(body)


def test_a_non_streamed_answer_reset_drops_every_block_of_the_answer():
    req = parse_request(json.dumps(REQUEST).encode())
    answer = {
        **MESSAGE,
        "content": [
            {"type": "thinking", "thinking": "t"},
            {"type": "text", "text": "bad"},
            {"type": "tool_use", "id": "t1"},
        ],
        "stop_reason": "tool_use",
    }
    assert req.answer_choices(answer) == [(0, "bad", "tool_use")]
    req.set_answer_choice(answer, 0, "", "content_filter")
    assert answer["content"] == []
    assert answer["stop_reason"] == "refusal"
