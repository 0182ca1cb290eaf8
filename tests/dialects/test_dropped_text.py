"""What the guard dropped stays dropped, and only judged text reaches the client.

DESIGN.md: no field of any response carries text that the guard dropped. Each test plants `SECRET` in
the upstream's answer wherever a dialect can repeat it (logprobs, token context, thinking, tool calls,
other blocks, a finishing message), drops it the way the relay does, and looks for it in what the client
gets. Then the decoders' side: data in another dialect, event types unknown to the decoder and bodies
that end before the dialect's terminator fail the stream instead of passing through unjudged.
"""

import json

from proxy.core.engine import Piece, ResetEvent
from proxy.core.policy import Action
from proxy.dialects import anthropic, ollama, openai
from proxy.dialects.anthropic import AnthropicCodec
from proxy.dialects.base import ChoiceFinish, ChoicePiece, Done, Passthrough, UpstreamFailure
from proxy.dialects.ollama import OllamaCodec
from proxy.dialects.openai import OpenAICodec
from tests.fakes import ANTHROPIC_MESSAGE
from tests.transcripts import feed_all

SECRET = "SECRET"
RESET = ResetEvent("violence", Action.REFUSE, 0.9, "model", 6, 30, SECRET, "default")


def openai_request(**body: object) -> openai.OpenAIRequest:
    raw = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return openai.parse_request(json.dumps(raw).encode(), chat=True)


def sse(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


def anthropic_sse(event: dict) -> bytes:
    return sse(event, event["type"])


# -- 1. non-streamed answers ---------------------------------------------------------------------------


def test_openai_chat_answer_reset_drops_logprobs_tool_calls_refusal_and_audio():
    req = openai_request(logprobs=True)
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": f"a {SECRET} plan",
                    "refusal": SECRET,
                    "tool_calls": [{"id": "t1", "function": {"name": "f", "arguments": SECRET}}],
                    "audio": {"id": "a1", "transcript": SECRET},
                    "reasoning_content": SECRET,
                },
                "logprobs": {"content": [{"token": SECRET, "logprob": -0.1, "bytes": [83]}]},
                "finish_reason": "stop",
            }
        ],
    }
    req.set_answer_choice(answer, 0, "Sorry.", "stop")
    assert SECRET not in json.dumps(answer)
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Sorry."}
    assert choice["logprobs"] is None


def test_openai_completion_answer_reset_drops_logprobs():
    req = openai.parse_request(b'{"model": "m", "prompt": "hi", "logprobs": 1}', chat=False)
    answer = {
        "choices": [{"index": 0, "text": SECRET, "logprobs": {"tokens": [SECRET]}, "finish_reason": "stop"}]
    }
    req.set_answer_choice(answer, 0, "", "content_filter")
    assert SECRET not in json.dumps(answer)
    assert answer["choices"][0]["logprobs"] is None


def test_an_unchanged_openai_answer_keeps_its_logprobs():
    req = openai_request(logprobs=True)
    choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "logprobs": {"content": []}}
    answer = {"choices": [choice]}
    req.set_answer_choice(answer, 0, None, "stop")
    assert answer["choices"][0]["logprobs"] == {"content": []}


def test_anthropic_answer_reset_is_one_text_block():
    req = anthropic.parse_request(b'{"model": "c", "messages": [{"role": "user", "content": "hi"}]}')
    answer = {
        **ANTHROPIC_MESSAGE,
        "content": [
            {"type": "thinking", "thinking": SECRET, "signature": "s"},
            {"type": "redacted_thinking", "data": SECRET},
            {"type": "text", "text": SECRET, "citations": [{"cited_text": SECRET}]},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": SECRET}},
        ],
        "stop_reason": "stop_sequence",
        "stop_sequence": SECRET,
    }
    req.set_answer_choice(answer, 0, "Sorry.", "stop")
    assert answer["content"] == [{"type": "text", "text": "Sorry."}]
    assert SECRET not in json.dumps(answer)


def test_ollama_answer_reset_drops_context_thinking_tool_calls_and_logprobs():
    chat = ollama.parse_request(b'{"model": "l", "messages": [{"role": "user", "content": "hi"}]}', chat=True)
    answer = {
        "model": "l",
        "message": {"role": "assistant", "content": SECRET, "thinking": SECRET,
                    "tool_calls": [{"function": {"name": "f", "arguments": {"q": SECRET}}}]},
        "logprobs": [{"token": SECRET, "logprob": -0.1}],
        "done": True,
        "done_reason": "stop",
        "eval_count": 3,
    }  # fmt: skip
    chat.set_answer_choice(answer, 0, "Sorry.", "stop")
    assert SECRET not in json.dumps(answer)
    assert answer["message"] == {"role": "assistant", "content": "Sorry."}
    assert answer["eval_count"] == 3
    generate = ollama.parse_request(b'{"model": "l", "prompt": "hi", "stream": false}', chat=False)
    answer = {"model": "l", "response": SECRET, "thinking": SECRET, "context": [1, 2], "done": True}
    generate.set_answer_choice(answer, 0, "", "content_filter")
    assert SECRET not in json.dumps(answer)
    assert "context" not in answer and answer["response"] == ""


# -- 1. streamed answers -------------------------------------------------------------------------------


def test_openai_piece_cut_by_a_reset_loses_the_logprobs_of_the_dropped_start():
    codec = OpenAICodec(chat=True)
    extra = {
        "index": 0,
        "delta": {"content": f"{SECRET}[RESET]ok"},
        "logprobs": {"content": [{"token": SECRET}]},
    }
    out = codec.piece(0, Piece("ok", extra))
    assert SECRET not in out.decode()
    whole = codec.piece(0, Piece(f"{SECRET}[RESET]ok", extra))
    assert json.loads(whole.split(b"data: ")[1])["choices"][0]["logprobs"] is not None


def test_openai_finishing_chunk_of_dropped_text_carries_none_of_it():
    codec = OpenAICodec(chat=True)
    choice = {"index": 0, "delta": {"content": SECRET}, "logprobs": {"content": [{"token": SECRET}]},
              "finish_reason": "stop"}  # fmt: skip
    events = codec.feed(sse({"id": "c", "choices": [choice]}) + b"data: [DONE]\n\n")
    finish = next(e for e in events if isinstance(e, ChoiceFinish))
    # The relay drops the piece (reset), then finishes with the upstream's rest.
    out = codec.reset(0, RESET) + codec.finish(0, finish.reason, finish.choice) + codec.end()
    assert SECRET not in out.decode()


def ollama_relay_after_reset(codec: OllamaCodec, wire: bytes) -> bytes:
    """The client's bytes when every piece is dropped by a reset and the upstream then finishes."""
    out = b""
    for event in feed_all(lambda: codec, [wire]):
        if isinstance(event, ChoiceFinish):
            out += codec.reset(0, RESET) + codec.finish(0, "stop", event.choice)
    return out + codec.end()


def test_ollama_done_line_of_dropped_text_carries_none_of_it():
    message = {"role": "assistant", "content": SECRET, "thinking": SECRET,
               "tool_calls": [{"function": {"name": "f", "arguments": {"q": SECRET}}}]}  # fmt: skip
    done = {"model": "l", "message": message, "logprobs": [{"token": SECRET}], "done": True,
            "done_reason": "stop", "eval_count": 2}  # fmt: skip
    out = ollama_relay_after_reset(OllamaCodec("l", chat=True), json.dumps(done).encode() + b"\n")
    assert SECRET not in out.decode()
    assert json.loads(out.splitlines()[-1])["eval_count"] == 2


def test_ollama_generate_done_line_of_dropped_text_carries_none_of_it():
    done = {"model": "l", "response": SECRET, "thinking": SECRET, "context": [1], "done": True}
    out = ollama_relay_after_reset(OllamaCodec("l", chat=False), json.dumps(done).encode() + b"\n")
    assert SECRET not in out.decode()
    assert "context" not in json.loads(out.splitlines()[-1])


def test_ollama_done_line_tool_calls_travel_as_a_piece():
    done = {"model": "l", "message": {"role": "assistant", "content": "", "tool_calls": [{"id": 1}]},
            "done": True, "done_reason": "stop"}  # fmt: skip
    events = feed_all(lambda: OllamaCodec("l", chat=True), [json.dumps(done).encode() + b"\n"])
    assert [type(e) for e in events] == [ChoicePiece, ChoiceFinish, Done]
    assert isinstance(events[0], ChoicePiece) and events[0].piece.extra["message"]["tool_calls"] == [
        {"id": 1}
    ]


def test_ollama_piece_cut_by_a_reset_loses_its_logprobs():
    codec = OllamaCodec("l", chat=True)
    extra = {"model": "l", "message": {"role": "assistant", "content": f"{SECRET}ok"},
             "logprobs": [{"token": SECRET}], "done": False}  # fmt: skip
    assert SECRET not in codec.piece(0, Piece("ok", extra)).decode()


def test_anthropic_message_start_with_content_is_emptied():
    start = {
        "type": "message_start",
        "message": {**ANTHROPIC_MESSAGE, "content": [{"type": "text", "text": SECRET}]},
    }
    (event,) = AnthropicCodec("c").feed(anthropic_sse(start))
    assert isinstance(event, Passthrough) and SECRET not in json.dumps(event.chunk)


# -- 2. streams in another dialect, unknown events ------------------------------------------------------

OPENAI_CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"content": SECRET}, "finish_reason": None}]}  # fmt: skip
ANTHROPIC_DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": SECRET}}


def test_openai_chunks_on_the_anthropic_route_fail_the_stream():
    wire = sse(OPENAI_CHUNK) * 3 + b"data: [DONE]\n\n"
    events = feed_all(lambda: AnthropicCodec("c"), [wire])
    assert len(events) == 1 and isinstance(events[0], UpstreamFailure)
    assert SECRET not in json.dumps(events[0].error)


def test_anthropic_events_on_the_openai_route_fail_the_stream():
    wire = anthropic_sse({"type": "message_start", "message": ANTHROPIC_MESSAGE}) + anthropic_sse(
        ANTHROPIC_DELTA
    )
    events = feed_all(lambda: OpenAICodec(chat=True), [wire])
    assert len(events) == 1 and isinstance(events[0], UpstreamFailure)


def test_non_json_data_and_sse_on_ollama_fail_the_stream():
    events = feed_all(lambda: OpenAICodec(chat=True), [f"data: {SECRET}\n\n".encode()])
    assert len(events) == 1 and isinstance(events[0], UpstreamFailure)
    events = feed_all(lambda: OllamaCodec("l", chat=True), [sse(OPENAI_CHUNK)])
    assert len(events) == 1 and isinstance(events[0], UpstreamFailure)


def test_unknown_anthropic_events_and_deltas_never_reach_the_client_but_ping_does():
    unknown = {"type": "content_block_summary", "text": SECRET}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "shiny_delta", "text": SECRET}}
    wire = b"".join(anthropic_sse(e) for e in (unknown, delta, {"type": "ping"}, {"type": "message_stop"}))
    assert feed_all(lambda: AnthropicCodec("c"), [wire]) == [Passthrough({"type": "ping"}), Done()]


# -- 3. a body that ends before the terminator ----------------------------------------------------------


def is_incomplete(event: object) -> bool:
    return isinstance(event, UpstreamFailure) and "before it finished" in event.error["message"]


def test_openai_stream_cut_before_its_finish_fails():
    events = feed_all(lambda: OpenAICodec(chat=True), [sse(OPENAI_CHUNK)])
    assert isinstance(events[0], ChoicePiece) and is_incomplete(events[-1])


def test_openai_stream_with_every_choice_finished_but_no_done_is_whole():
    finished = {**OPENAI_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    events = feed_all(lambda: OpenAICodec(chat=True), [sse(OPENAI_CHUNK) + sse(finished)])
    assert not any(isinstance(e, UpstreamFailure) for e in events)


def test_anthropic_stream_cut_before_message_stop_fails():
    wire = anthropic_sse({"type": "message_start", "message": ANTHROPIC_MESSAGE}) + anthropic_sse(
        ANTHROPIC_DELTA
    )
    assert is_incomplete(feed_all(lambda: AnthropicCodec("c"), [wire])[-1])
    assert (
        feed_all(lambda: AnthropicCodec("c"), [wire + anthropic_sse({"type": "message_stop"})])[-1] == Done()
    )


def test_ollama_stream_cut_before_its_done_line_fails():
    wire = b'{"model": "l", "message": {"role": "assistant", "content": "hi"}, "done": false}\n'
    assert is_incomplete(feed_all(lambda: OllamaCodec("l", chat=True), [wire])[-1])
    assert feed_all(lambda: OllamaCodec("l", chat=True), [wire + b'{"done": true}'])[-1] == Done()


def test_an_empty_body_is_incomplete_in_every_dialect():
    for make in (
        lambda: OpenAICodec(chat=True),
        lambda: AnthropicCodec("c"),
        lambda: OllamaCodec("l", chat=True),
    ):
        assert [is_incomplete(e) for e in feed_all(make, [])] == [True]
