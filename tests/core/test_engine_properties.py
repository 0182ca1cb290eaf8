"""Property-based tests of the stream engine: random pieces, a guard that objects at a random point.

Invariants, whatever the split of the text and the policy's hold-back:
- what is released of the upstream's text is a prefix of what was received, and only judged text;
- nothing at or after the point the guard objected to is ever released, in any later output;
- after a reset the only text released is the refusal, and the stream ends with exactly one finish;
- `retract_chars` is exactly what the client was shown of the abandoned attempt.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.detectors import Reset, Verdict
from proxy.core.engine import Finish, Output, Piece, Release, ResetEvent, State, StreamEngine
from proxy.core.policy import Policy

REFUSAL = "I can't help with that."
texts = st.text(alphabet=st.sampled_from("ab é漢😀 .\n"), min_size=1, max_size=120)


@st.composite
def transcripts(draw: st.DrawFn) -> tuple[list[str], int | None, Policy]:
    text = draw(texts)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if text[a:b]]
    unsafe_at = draw(st.none() | st.integers(0, len(text) - 1))
    policy = Policy(
        name="p",
        holdback_tokens=draw(st.integers(0, 8)),
        score_every_tokens=draw(st.integers(1, 4)),
        refusal_message=REFUSAL,
    )
    return pieces, unsafe_at, policy


def run(pieces: list[str], unsafe_at: int | None, policy: Policy) -> tuple[list[Output], list[int]]:
    """Drive the engine as the shell does, with an oracle guard; returns the outputs and, for each
    output, how far the guard had judged when it came out."""
    engine = StreamEngine(policy)
    fed = 0  # characters given to the guard
    scored = 0
    outputs: list[Output] = []
    judged: list[int] = []

    def verdict(text: str) -> Verdict:
        nonlocal fed
        fed += len(text)
        if unsafe_at is not None and unsafe_at < fed:
            return Verdict(fed, Reset(unsafe_at, "unsafe", 0.9, "oracle"))
        return Verdict(fed)

    def out(step: list[Output]) -> None:
        outputs.extend(step)
        judged.extend([scored] * len(step))

    for piece in pieces:
        out(engine.feed(Piece(piece)))
        if engine.state is State.STREAMING and engine.scoring_due():
            v = verdict(engine.take_unscored())
            scored = v.scored_until
            out(engine.on_verdict(v))
    if engine.state is State.STREAMING:
        v = verdict(engine.take_unscored())
        scored = v.scored_until
        out(engine.on_verdict(v))
        out(engine.finish("stop"))
    return outputs, judged


@settings(max_examples=300, deadline=None)
@given(transcripts())
def test_released_text_is_a_judged_prefix_and_nothing_past_the_unsafe_point_gets_out(
    case: tuple[list[str], int | None, Policy],
) -> None:
    pieces, unsafe_at, policy = case
    text = "".join(pieces)
    outputs, judged = run(pieces, unsafe_at, policy)

    resets = [i for i, o in enumerate(outputs) if isinstance(o, ResetEvent)]
    before = outputs[: resets[0]] if resets else outputs
    shown = "".join(o.piece.text for o in before if isinstance(o, Release))
    assert text.startswith(shown)
    released_at = [j for o, j in zip(before, judged[: len(before)], strict=True) if isinstance(o, Release)]
    length = 0
    for o, j in zip([o for o in before if isinstance(o, Release)], released_at, strict=True):
        length += len(o.piece.text)
        assert length <= j  # only judged text is released
    if unsafe_at is None:
        assert shown == text and not resets
    else:
        assert len(shown) <= unsafe_at
        (reset,) = [outputs[i] for i in resets]
        assert isinstance(reset, ResetEvent) and reset.retract_chars == len(shown)
        after = outputs[resets[0] + 1 :]
        assert "".join(o.piece.text for o in after if isinstance(o, Release)) == REFUSAL
    finishes = [o for o in outputs if isinstance(o, Finish)]
    assert len(finishes) == 1 and outputs[-1] is finishes[0]
