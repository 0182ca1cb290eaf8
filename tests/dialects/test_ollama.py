import json

import pytest

from proxy.core.engine import Piece, ResetEvent
from proxy.core.errors import ClientError
from proxy.core.policy import Action
from proxy.dialects.base import ChoiceFinish, ChoicePiece, Done, UpstreamFailure
from proxy.dialects.ollama import OllamaCodec, parse_request
from tests.transcripts import feed_all, splits

HEAD = {"model": "llama", "created_at": "2026-11-30T07:00:00Z"}


def line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def chat(content: str, **rest: object) -> dict:
    return {**HEAD, "message": {"role": "assistant", "content": content}, "done": False, **rest}


THINKING = {**HEAD, "message": {"role": "assistant", "content": "", "thinking": "Hmm."}, "done": False}
FINAL = {
    **HEAD,
    "message": {"role": "assistant", "content": ""},
    "done": True,
    "done_reason": "stop",
    "total_duration": 5,
    "prompt_eval_count": 3,
    "eval_count": 2,
}
LINES = [THINKING, chat("Hé"), chat(""), chat(" there"), FINAL]
TRANSCRIPT = b"".join(line(x) for x in LINES)


def test_decoder_events_are_the_same_at_every_split():
    expected = feed_all(lambda: OllamaCodec("llama", chat=True), [TRANSCRIPT])
    assert expected == [
        ChoicePiece(0, Piece("", THINKING)),
        ChoicePiece(0, Piece("Hé", chat("Hé"))),
        ChoicePiece(0, Piece(" there", chat(" there"))),
        ChoiceFinish(0, "stop", FINAL),
        Done(),
    ]
    for parts in splits(TRANSCRIPT):
        assert feed_all(lambda: OllamaCodec("llama", chat=True), parts) == expected


def test_generate_text_lives_in_response():
    wire = line({**HEAD, "response": "Hi", "done": False}) + line({**HEAD, "response": "", "done": True})
    events = feed_all(lambda: OllamaCodec("llama", chat=False), [wire])
    assert isinstance(events[0], ChoicePiece) and events[0].piece.text == "Hi"
    assert isinstance(events[1], ChoiceFinish) and events[1].reason is None


def test_error_lines_and_malformed_lines_are_upstream_failures():
    events = feed_all(lambda: OllamaCodec("llama", chat=True), [b'{"error": "model not found"}\n{oops\n'])
    assert events == [UpstreamFailure({"message": "model not found"})]  # nothing after it counts
    (event,) = feed_all(lambda: OllamaCodec("llama", chat=True), [b"{oops\n"])
    assert isinstance(event, UpstreamFailure) and "malformed" in event.error["message"]


def lines(wire: bytes) -> list[dict]:
    return [json.loads(x) for x in wire.splitlines()]


RESET = ResetEvent("weapons", Action.REFUSE, 1.0, "patterns", 2, 3, "dropped", "default")


def test_an_untouched_stream_is_re_encoded_as_it_came():
    codec = OllamaCodec("llama", chat=True)
    out = b""
    for e in codec.feed(TRANSCRIPT):
        if isinstance(e, ChoicePiece):
            out += codec.piece(0, e.piece)
        elif isinstance(e, ChoiceFinish):
            out += codec.finish(0, e.reason, e.choice)
    assert lines(out + codec.end()) == [THINKING, chat("Hé"), chat(" there"), FINAL]


def test_a_reset_rides_on_an_ordinary_line_and_the_done_line_keeps_the_upstreams_counters():
    codec = OllamaCodec("llama", chat=False)
    events = codec.feed(line({**HEAD, "response": "Hi", "done": False}))
    assert isinstance(events[0], ChoicePiece)
    wire = codec.piece(0, events[0].piece) + codec.reset(0, RESET) + codec.piece(0, Piece("No."))
    wire += codec.finish(0, "stop", None)
    codec.feed(
        line(
            {**HEAD, "response": "", "done": True, "done_reason": "stop", "context": [1, 2], "eval_count": 7}
        )
    )
    wire += codec.end()

    assert lines(wire) == [
        {**HEAD, "response": "Hi", "done": False},
        {
            **HEAD,
            "response": "",
            "done": False,
            "backtrack": {
                "event": "reset",
                "retract_chars": 2,
                "category": "weapons",
                "policy": "default",
                "score": 1.0,
            },
        },
        {**HEAD, "response": "No.", "done": False},
        {
            **HEAD,
            "response": "",
            "done": True,
            "done_reason": "stop",
            "eval_count": 7,
        },  # no context: it was reset
    ]


def test_a_cut_ends_with_done_reason_content_filter_even_without_the_upstreams_last_line():
    codec = OllamaCodec("llama", chat=True)
    codec.feed(line(chat("Hi")))
    codec.finish(0, "content_filter", None)
    assert lines(codec.end()) == [
        {
            **HEAD,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "content_filter",
        }
    ]


def test_in_band_errors_are_ollama_error_lines():
    codec = OllamaCodec("llama", chat=True)
    assert lines(codec.error("upstream stream broke", "upstream_error")) == [
        {"error": "upstream stream broke"}
    ]


def test_the_request_streams_by_default_and_gives_prompt_prefill_and_bodies():
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Sure"}],
    }
    req = parse_request(json.dumps(body).encode(), chat=True)
    assert (req.stream, req.prompt, req.prefill) == (True, "Tell me", "Sure")
    assert req.regenerate_body("Be safe.")["messages"] == [
        {"role": "system", "content": "Be safe."},
        {"role": "user", "content": "Tell me"},
    ]
    injected = req.inject_body("Sure, x[RESET]")
    assert injected is not None and injected["messages"][-1] == {
        "role": "assistant",
        "content": "Sure, x[RESET]",
    }

    gen = parse_request(b'{"model": "llama", "prompt": "Tell me", "stream": false}', chat=False)
    assert (gen.stream, gen.prompt, gen.prefill, gen.inject_body("x")) == (False, "Tell me", "", None)
    assert gen.regenerate_body("Be safe.")["prompt"] == "Be safe.\n\nTell me"


@pytest.mark.parametrize("body", [b"{", b'{"model": "m"}', b'{"model": "m", "messages": [], "stream": 1}'])
def test_bad_requests_are_client_errors(body: bytes):
    with pytest.raises(ClientError):
        parse_request(body, chat=True)
