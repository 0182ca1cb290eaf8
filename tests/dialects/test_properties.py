"""Properties of the framings and the dialect codecs, on generated transcripts.

- Any split of a transcript into chunks gives the events of the transcript fed whole (multi-byte
  characters land at every boundary, since the text is generated from all of Unicode).
- What an encoder writes decodes back to the text it was given.
- The client's stream, however the upstream's ends (whole, cut anywhere, garbage inside), ends with
  the dialect's terminator or an in-band error.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.engine import Piece, ResetEvent
from proxy.core.policy import Action
from proxy.dialects.anthropic import AnthropicCodec
from proxy.dialects.base import (
    ChoiceFinish,
    ChoicePiece,
    Codec,
    Done,
    Event,
    Passthrough,
    UpstreamFailure,
    Usage,
)
from proxy.dialects.lines import LineSplitter, TooLong
from proxy.dialects.ndjson import NDJSONDecoder, encode_line
from proxy.dialects.ollama import OllamaCodec
from proxy.dialects.openai import DONE, OpenAICodec, data_line
from proxy.dialects.sse import SSEDecoder, SSEEvent, encode_sse
from tests.fakes import ANTHROPIC_MESSAGE
from tests.transcripts import feed_all

# A few seconds per suite; no example database, so no `.hypothesis/` in the working tree.
BOUNDED = settings(max_examples=100, deadline=None, database=None)
ENDINGS = st.sampled_from([b"", b"data: {oops\n\n", b"{oops\n", b"\x00\xff"])  # after a cut
# Any character but surrogates (not encodable) and the line ends SSE data cannot hold.
TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00"), max_size=12)
DELTAS = st.lists(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=8), max_size=8)
RESET = ResetEvent("violence", Action.REFUSE, 0.9, "model", 3, 30, "dropped", "default")


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at `points` (any positions, in any order, repeated)."""
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


POINTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


# -- framings ------------------------------------------------------------------------------------------


@st.composite
def sse_transcripts(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    wire, expected = b"", []
    for _ in range(draw(st.integers(0, 5))):
        end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        if draw(st.booleans()):
            wire += b":" + draw(TEXT).encode() + end
        name = draw(st.sampled_from(["", "ping", "message_start", "délta"]))
        lines = draw(st.lists(TEXT, min_size=1, max_size=3))
        wire += (f"event: {name}".encode() + end) if name else b""
        wire += b"".join(b"data: " + line.encode() + end for line in lines) + end
        expected.append(SSEEvent("\n".join(lines), name or "message"))
    return wire, expected


@BOUNDED
@given(sse_transcripts(), POINTS)
def test_sse_any_split_gives_the_events_of_the_whole(
    transcript: tuple[bytes, list[SSEEvent]], points: list[int]
):
    wire, expected = transcript
    assert feed_all(SSEDecoder, [wire]) == expected
    assert feed_all(SSEDecoder, cut(wire, points)) == expected


@BOUNDED
@given(st.lists(st.text(min_size=0, max_size=10), max_size=6), POINTS)
def test_sse_encoding_round_trips(datas: list[str], points: list[int]):
    datas = [d.replace("\r", "").replace("\x00", "") for d in datas]
    datas = [d.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for d in datas]
    wire = b"".join(encode_sse(d, "e") for d in datas)
    assert [e.data for e in feed_all(SSEDecoder, cut(wire, points))] == datas


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(st.characters(blacklist_categories=["Cs"]), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@BOUNDED
@given(st.lists(JSON_VALUES, max_size=6), st.sampled_from([b"\n", b"\r\n"]), POINTS)
def test_ndjson_any_split_gives_the_lines_of_the_whole(values: list[Any], end: bytes, points: list[int]):
    wire = b"".join(encode_line(v)[:-1] + end for v in values)
    expected = feed_all(NDJSONDecoder, [wire])
    assert [line.value for line in expected] == values  # type: ignore[attr-defined]
    assert feed_all(NDJSONDecoder, cut(wire, points)) == expected


@BOUNDED
@given(st.binary(max_size=200), st.integers(1, 40), st.booleans(), POINTS)
def test_line_splitter_any_split_agrees_with_the_whole(data: bytes, limit: int, cr: bool, points: list[int]):
    def make() -> LineSplitter:
        return LineSplitter(cr=cr, max_line_bytes=limit)

    whole = feed_all(make, [data])
    assert feed_all(make, cut(data, points)) == whole
    assert sum(isinstance(x, TooLong) for x in whole) <= 1
    assert all(len(x) <= limit for x in whole if isinstance(x, bytes))


# -- dialect codecs ------------------------------------------------------------------------------------

DIALECTS: dict[str, Callable[[], Codec]] = {
    "chat": lambda: OpenAICodec(chat=True),
    "completions": lambda: OpenAICodec(chat=False),
    "anthropic": lambda: AnthropicCodec("claude"),
    "ollama-chat": lambda: OllamaCodec("llama", chat=True),
    "ollama-generate": lambda: OllamaCodec("llama", chat=False),
}


def upstream(dialect: str, deltas: list[str]) -> bytes:
    """A whole upstream answer of `deltas` in `dialect`."""
    if dialect in ("chat", "completions"):
        envelope = {"id": "c1", "created": 1, "model": "m"}

        def choice(text: str | None, reason: str | None) -> dict[str, Any]:
            if dialect == "completions":
                return {"index": 0, "text": text or "", "finish_reason": reason}
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}

        chunks = [choice(d, None) for d in deltas] + [choice(None, "stop")]
        return b"".join(data_line({**envelope, "choices": [c]}) for c in chunks) + DONE
    if dialect == "anthropic":
        events: list[dict[str, Any]] = [
            {"type": "message_start", "message": ANTHROPIC_MESSAGE},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            *(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}
                for d in deltas
            ),
            {"type": "ping"},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
            {"type": "message_stop"},
        ]
        return b"".join(encode_sse(json.dumps(e, ensure_ascii=False), e["type"]) for e in events)
    chat = dialect == "ollama-chat"

    def line(text: str, done: bool) -> bytes:
        body = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return encode_line(
            {"model": "llama", **body, "done": done, **({"done_reason": "stop"} if done else {})}
        )

    return b"".join(line(d, False) for d in deltas) + line("", True)


def text_of(events: list[Event]) -> str:
    return "".join(e.piece.text for e in events if isinstance(e, ChoicePiece))


@BOUNDED
@given(st.sampled_from(sorted(DIALECTS)), DELTAS, POINTS)
def test_codec_any_split_gives_the_events_of_the_whole(dialect: str, deltas: list[str], points: list[int]):
    wire = upstream(dialect, deltas)
    whole = feed_all(DIALECTS[dialect], [wire])
    assert text_of(whole) == "".join(deltas)
    assert whole[-1] == Done() and not any(isinstance(e, UpstreamFailure) for e in whole)
    assert feed_all(DIALECTS[dialect], cut(wire, points)) == whole
    assert feed_all(DIALECTS[dialect], [wire[i : i + 1] for i in range(len(wire))]) == whole


def relay(codec: Codec, parts: list[bytes], reset_at: int | None = None) -> bytes:
    """What a relay without a guard sends: every event encoded as it comes, a reset after piece number
    `reset_at`, an in-band error on a failure, the dialect's end when the upstream is done (or ended
    with every choice finished, as the relay's `_end_all` does)."""
    out, pieces = b"", 0
    for events in [*(codec.feed(p) for p in parts), codec.flush()]:
        for e in events:
            if isinstance(e, ChoicePiece):
                out += codec.piece(e.index, e.piece)
                pieces += 1
                if pieces == reset_at:
                    out += codec.reset(e.index, RESET)
            elif isinstance(e, ChoiceFinish):
                out += codec.finish(e.index, e.reason, e.choice)
            elif isinstance(e, Usage | Passthrough):
                out += codec.passthrough(e)
            elif isinstance(e, UpstreamFailure):
                return out + codec.error(str(e.error.get("message")), "upstream_error", e.error)
            elif isinstance(e, Done):
                return out + codec.end()
    return out + codec.end()  # every choice finished without the terminator: the relay ends the stream


def ends_properly(dialect: str, client: bytes) -> bool:
    """The client's stream ends with the dialect's terminator or an in-band error, as its decoder sees
    it before the body's end (a decoder's flush would report a missing terminator itself)."""
    events = DIALECTS[dialect]().feed(client)
    return bool(events) and isinstance(events[-1], Done | UpstreamFailure)


@BOUNDED
@given(
    st.sampled_from(sorted(DIALECTS)),
    DELTAS,
    st.integers(0, 10_000),
    ENDINGS,
    POINTS,
    st.none() | st.integers(1, 4),
)
def test_the_client_stream_always_ends_with_the_terminator_or_an_error(
    dialect: str, deltas: list[str], stop: int, garbage: bytes, points: list[int], reset_at: int | None
):
    wire = upstream(dialect, deltas)
    wire = wire[: stop % (len(wire) + 1)] + garbage
    client = relay(DIALECTS[dialect](), cut(wire, points), reset_at)
    assert ends_properly(dialect, client)


@BOUNDED
@given(st.sampled_from(sorted(DIALECTS)), DELTAS)
def test_encoded_pieces_decode_back_to_their_text(dialect: str, deltas: list[str]):
    client = relay(DIALECTS[dialect](), [upstream(dialect, deltas)])
    assert text_of(feed_all(DIALECTS[dialect], [client])) == "".join(deltas)


@BOUNDED
@given(
    st.sampled_from(sorted(DIALECTS)), st.lists(st.one_of(DELTAS.map(tuple), st.just("reset")), max_size=6)
)
def test_engine_outputs_in_any_order_encode_to_a_stream_that_decodes(dialect: str, outputs: list[Any]):
    """Text the engine made (no upstream message to rebuild) and resets, in any order, then the end."""
    codec = DIALECTS[dialect]()
    client, text = b"", ""
    for output in outputs:
        if output == "reset":
            client += codec.reset(0, RESET)
        else:
            for delta in output:
                client += codec.piece(0, Piece(delta))
                text += delta
    client += codec.finish(0, "stop", None) + codec.end()
    events = feed_all(DIALECTS[dialect], [client])
    assert text_of(events) == text and events[-1] == Done()
