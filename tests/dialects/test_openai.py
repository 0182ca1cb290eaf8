import json

from proxy.core.engine import Piece, ResetEvent
from proxy.core.policy import Action
from proxy.dialects.openai import (
    DONE,
    ChoiceFinish,
    ChoicePiece,
    Done,
    OpenAICodec,
    OpenAIDecoder,
    OpenAIEncoder,
    UpstreamFailure,
    Usage,
    in_band_error,
)
from proxy.dialects.sse import SSEDecoder
from tests.transcripts import feed_all, splits

ENVELOPE = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "x_vendor": {"k": 1}}


def chunk(choices, **extra):
    return b"data: " + json.dumps({**ENVELOPE, "choices": choices, **extra}).encode() + b"\n\n"


TRANSCRIPT = (
    chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    + chunk(
        [{"index": 0, "delta": {"content": "Hé"}, "logprobs": {"content": [{"t": 1}]}, "finish_reason": None}]
    )
    + chunk([{"index": 1, "delta": {"content": " there"}, "finish_reason": None}])
    + chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t1"}]}, "finish_reason": None}])
    + chunk([{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 42}])
    + chunk([], usage={"prompt_tokens": 3, "completion_tokens": 2})
    + DONE
)


def test_decoder_events_are_the_same_at_every_split():
    expected = feed_all(OpenAIDecoder, [TRANSCRIPT])
    kinds = [type(e).__name__ for e in expected]
    assert kinds == ["ChoicePiece", "ChoicePiece", "ChoicePiece", "ChoicePiece", "ChoiceFinish", "Usage",
                     "Done"]  # fmt: skip
    for parts in splits(TRANSCRIPT):
        assert feed_all(OpenAIDecoder, parts) == expected


def test_decoder_keeps_everything_but_the_text_untouched():
    events = feed_all(OpenAIDecoder, [TRANSCRIPT])
    role, text, other, tool = events[:4]
    assert role == ChoicePiece(0, Piece("", {"index": 0, "delta": {"role": "assistant", "content": ""}}))
    assert isinstance(text, ChoicePiece) and text.piece.text == "Hé"
    assert text.piece.extra["logprobs"] == {"content": [{"t": 1}]}
    assert isinstance(other, ChoicePiece) and other.index == 1
    assert isinstance(tool, ChoicePiece) and tool.piece.text == ""
    assert tool.piece.extra["delta"]["tool_calls"] == [{"index": 0, "id": "t1"}]
    assert events[4] == ChoiceFinish(0, "stop", {"index": 0, "stop_reason": 42})
    assert isinstance(events[5], Usage) and events[5].chunk["usage"]["completion_tokens"] == 2
    assert events[6] == Done()


def test_decoder_reports_upstream_errors_and_malformed_events():
    events = feed_all(
        OpenAIDecoder, [b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n']
    )
    assert events == [UpstreamFailure({"message": "overloaded", "type": "server_error"})]
    (event,) = feed_all(OpenAIDecoder, [b"data: {not json\n\n"])
    assert isinstance(event, UpstreamFailure) and "malformed" in event.error["message"]


def test_completions_text_lives_in_choices_text():
    choice = {"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}
    wire = (
        b"data: "
        + json.dumps({"id": "x", "object": "text_completion", "choices": [choice]}).encode()
        + b"\n\n"
    )
    (event,) = OpenAIDecoder(chat=False).feed(wire)
    assert isinstance(event, ChoicePiece) and event.piece.text == "Hi"


def decode_chunk(wire: bytes) -> dict:
    (event,) = SSEDecoder().feed(wire)
    return json.loads(event.data)


def test_encoder_rebuilds_the_upstream_chunk_with_new_text():
    decoder = OpenAIDecoder()
    events = decoder.feed(TRANSCRIPT)
    text = events[1]
    assert isinstance(text, ChoicePiece)
    rebuilt = decode_chunk(OpenAIEncoder().piece(decoder.template, 0, Piece("Hé", text.piece.extra)))
    assert rebuilt == {**ENVELOPE, "choices": [
        {"index": 0, "delta": {"content": "Hé"}, "logprobs": {"content": [{"t": 1}]}, "finish_reason": None}
    ]}  # fmt: skip


def test_reset_chunk_carries_the_backtrack_object_on_an_empty_delta():
    event = ResetEvent("violence", Action.REFUSE, 0.91234, "model", 12, 30, "dropped", "default")
    obj = decode_chunk(OpenAIEncoder().reset(ENVELOPE, 0, event))
    assert obj["choices"] == [{"index": 0, "delta": {}, "finish_reason": None}]
    assert obj["backtrack"] == {
        "event": "reset", "retract_chars": 12, "category": "violence", "policy": "default", "score": 0.9123,
    }  # fmt: skip
    assert "dropped" not in json.dumps(obj)


def test_finish_chunk_and_in_band_error():
    obj = decode_chunk(OpenAIEncoder().finish(ENVELOPE, 2, "content_filter"))
    assert obj["choices"] == [{"index": 2, "delta": {}, "finish_reason": "content_filter"}]
    events = SSEDecoder().feed(in_band_error("upstream stream broke"))
    assert json.loads(events[0].data)["error"]["message"] == "upstream stream broke"
    assert events[1].data == "[DONE]"


def test_a_choice_whose_delta_is_not_an_object_is_a_malformed_stream():
    (event,) = OpenAIDecoder().feed(chunk([{"index": 0, "delta": "text", "finish_reason": None}]))
    assert isinstance(event, UpstreamFailure) and "malformed choice" in event.error["message"]


def test_a_null_content_stays_null_and_text_replaces_it():
    extra = {"index": 0, "delta": {"content": None, "tool_calls": [{"index": 0, "id": "t1"}]}}
    obj = decode_chunk(OpenAIEncoder().piece(ENVELOPE, 0, Piece("", extra)))
    assert obj["choices"][0]["delta"] == {"content": None, "tool_calls": [{"index": 0, "id": "t1"}]}
    obj = decode_chunk(OpenAIEncoder().piece(ENVELOPE, 0, Piece("Hi", extra)))
    assert obj["choices"][0]["delta"]["content"] == "Hi"


# -- chunks sent as they came -------------------------------------------------------------------------


def codec_pieces(codec: OpenAICodec, wire: bytes) -> list[ChoicePiece]:
    return [e for e in codec.feed(wire) if isinstance(e, ChoicePiece)]


def test_a_whole_piece_goes_out_as_the_upstream_sent_it():
    codec = OpenAICodec(chat=True)
    codec.begin_attempt()
    wire = b'data: {"id": "c1", "created": 1, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
    (event,) = codec_pieces(codec, wire)
    assert codec.piece(0, event.piece) == wire


def test_a_piece_cut_by_a_reset_is_encoded_with_only_its_kept_text():
    codec = OpenAICodec(chat=True)
    codec.begin_attempt()
    (event,) = codec_pieces(codec, chunk([{"index": 0, "delta": {"content": "Hi [RESET]bad"}}]))
    sent = decode_chunk(codec.piece(0, Piece("Hi ", event.piece.extra)))
    assert sent["choices"][0]["delta"]["content"] == "Hi "
    assert "bad" not in json.dumps(sent)


def test_a_finishing_or_many_choice_chunk_is_encoded_again():
    codec = OpenAICodec(chat=True)
    codec.begin_attempt()
    two = [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]
    _, second = codec_pieces(codec, chunk(two))
    assert decode_chunk(codec.piece(1, second.piece))["choices"] == [
        {"index": 1, "delta": {"content": "b"}, "finish_reason": None}
    ]
    (last,) = codec_pieces(codec, chunk([{"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]))
    # The piece's chunk says nothing of the finish: the finish chunk that follows carries it, once.
    assert decode_chunk(codec.piece(0, last.piece))["choices"][0]["finish_reason"] is None


def test_a_regenerated_answer_keeps_the_first_id_and_sends_its_role_once():
    codec = OpenAICodec(chat=True)
    codec.begin_attempt()
    role = [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
    (event,) = codec_pieces(codec, chunk(role))
    codec.piece(0, event.piece)
    codec.begin_attempt()
    again = b"data: " + json.dumps({**ENVELOPE, "id": "c2", "choices": role}).encode() + b"\n\n"
    (event,) = codec_pieces(codec, again)
    sent = decode_chunk(codec.piece(0, event.piece))
    assert sent["id"] == "c1"
    assert sent["choices"][0]["delta"] == {"content": ""}
