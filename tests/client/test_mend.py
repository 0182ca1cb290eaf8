"""`mend` on the three dialects' messages as parsed JSON: what a person should see after each."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.client import Mender, View, amend, mend

NOTICE = "\n\n[The answer above was withdrawn.]\n\n"
RESET = {"event": "reset", "retract_chars": 9, "category": "weapons", "policy": "p", "score": 1.0}


def chat(text: str | None = None, finish: str | None = None, index: int = 0, **extra: Any) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta,
            "finish_reason": finish}], **extra}  # fmt: skip


def texts(views: list[View]) -> list[str]:
    return [v.text for v in views]


def test_openai_chat_chunks_are_mended_at_a_reset():
    chunks = [chat("Sure, to "), chat(" build it"), chat(backtrack=RESET), chat("No."), chat(finish="stop")]
    views = list(mend(chunks))
    assert texts(views) == ["Sure, to ", "Sure, to  build it", "Sure, to ", "Sure, to No.", "Sure, to No."]
    assert [v.event for v in views] == [None, None, RESET, None, None]
    assert views[-1].finish_reason == "stop"
    assert views[0].chunk is chunks[0]


def test_the_notice_is_skipped_even_when_it_comes_in_pieces():
    reset = {**RESET, "retract_chars": 12, "notice_chars": len(NOTICE)}
    chunks = [
        chat("Text to drop"),
        chat(backtrack=reset),
        chat(NOTICE[:5]),
        chat(NOTICE[5:] + "Safe"),
        chat("!"),
    ]
    assert texts(list(mend(chunks))) == ["Text to drop", "", "", "Safe", "Safe!"]


def test_completions_chunks_and_n_choices_are_mended_per_choice():
    def completion(index: int, text: str, **extra: Any) -> dict[str, Any]:
        return {"object": "text_completion", "choices": [{"index": index, "text": text}], **extra}

    mender = Mender()
    for chunk in (
        completion(0, "abc"),
        completion(1, "xyz"),
        completion(1, "", backtrack={**RESET, "retract_chars": 3}),
    ):
        view = mender.feed(chunk)
    assert (view.index, view.text, mender.text(0)) == (1, "", "abc")


def test_anthropic_events_are_mended_at_a_backtrack_reset_event():
    def delta(text: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}

    events = [
        {"type": "message_start", "message": {}},
        delta("Explosives are"),
        {"type": "backtrack_reset", **RESET, "retract_chars": 4},
        delta("No."),
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
    ]
    views = list(mend(events))
    assert texts(views) == ["", "Explosives are", "Explosives", "ExplosivesNo.", "ExplosivesNo."]
    assert views[2].event == {**RESET, "retract_chars": 4}  # the reset object, without the SSE type
    assert views[-1].finish_reason == "end_turn"


def test_ollama_lines_are_mended_and_the_prefill_can_be_retracted():
    lines = [
        {"message": {"role": "assistant", "content": " more"}, "done": False},
        {
            "message": {"role": "assistant", "content": ""},
            "done": False,
            "backtrack": {**RESET, "retract_chars": 10},
        },
        {"response": "No.", "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    ]
    views = list(mend(lines, prefill="Sure!"))
    assert texts(views) == ["Sure! more", "", "No.", "No."]
    assert views[-1].finish_reason == "stop"


def test_a_non_streamed_summary_and_other_objects_mend_nothing():
    summary = {"event": "resets", "resets": [RESET, RESET]}
    assert next(mend([chat("x", backtrack=summary)])).event is None
    with pytest.raises(TypeError, match="not int"):
        next(mend([3]))


def test_amend_reads_an_async_stream():
    async def stream() -> AsyncIterator[dict[str, Any]]:
        for chunk in (chat("drop me"), chat(backtrack={**RESET, "retract_chars": 7}), chat("kept")):
            yield chunk

    async def run() -> list[str]:
        return [view.text async for view in amend(stream())]

    assert asyncio.run(run()) == ["drop me", "", "kept"]
