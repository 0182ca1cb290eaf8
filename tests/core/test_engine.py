"""The stream engine on scripted verdicts: what is released, when, and what a reset does."""

from proxy.core.detectors import MarkerStream, Reset, Verdict
from proxy.core.engine import (
    Finish,
    Flagged,
    Piece,
    Regenerate,
    Release,
    ResetEvent,
    State,
    StreamEngine,
)
from proxy.core.policy import Action, Policy
from proxy.core.tokens import ApproxTokenizer


def policy(**kw) -> Policy:
    kw.setdefault("holdback_tokens", 3)
    return Policy(name="p", **kw)


class Scripted:
    """A fake guard stream: resets at the first occurrence of a word, with that word as category."""

    def __init__(self, word: str = "BAD") -> None:
        self.word = word
        self.text = ""

    def feed_sync(self, text: str, *, final: bool = False) -> Verdict:
        self.text += text
        at = self.text.find(self.word)
        if at >= 0:
            return Verdict(len(self.text), Reset(at, self.word.lower(), 0.9, "scripted"), 0.9)
        return Verdict(len(self.text))


def drive(engine: StreamEngine, pieces: list[str], make=Scripted) -> list:
    """What the shell does: feed, score, hand over the verdict; at the end judge the rest and finish."""
    stream = make()
    out: list = []

    def score(final: bool) -> None:
        nonlocal stream
        while engine.state is State.STREAMING:
            step = engine.on_verdict(stream.feed_sync(engine.take_unscored(), final=final))
            out.extend(step)
            if any(isinstance(o, ResetEvent) and o.action is Action.CONTINUE for o in step):
                stream = make()
                continue
            break

    for text in pieces:
        out.extend(engine.feed(Piece(text)))
        score(final=False)
    score(final=True)
    out.extend(engine.finish("stop"))
    return out


def released(outputs: list) -> str:
    return "".join(o.piece.text for o in outputs if isinstance(o, Release))


def shown(outputs: list) -> str:
    """What a client that honours retract_chars ends up displaying."""
    text = ""
    for o in outputs:
        if isinstance(o, Release):
            text += o.piece.text
        elif isinstance(o, ResetEvent):
            text = text[: len(text) - o.retract_chars]
    return text


TOKENS = ApproxTokenizer().split("One two three four five six seven.")


def test_text_is_held_back_until_it_is_holdback_tokens_behind_the_head():
    engine = StreamEngine(policy(holdback_tokens=3))
    guard = Scripted()
    releases = []
    for text in TOKENS:
        step = engine.feed(Piece(text))
        step += engine.on_verdict(guard.feed_sync(engine.take_unscored()))
        releases.append(released(step))
    # Each token comes out once three newer ones have arrived.
    assert releases == ["", "", "", "One", " two", " three", " four", " five"]
    assert released(engine.finish("stop")) == " six seven."


def test_nothing_is_released_before_the_guard_vouches_for_it():
    engine = StreamEngine(policy(holdback_tokens=0))
    assert engine.feed(Piece("Hello")) == []
    assert engine.on_verdict(Verdict(scored_until=3)) == []  # the piece is released whole or not at all
    assert released(engine.on_verdict(Verdict(scored_until=5))) == "Hello"


def test_benign_text_comes_out_identical_whatever_the_split():
    text = "Sure. Here is a plan: water the plants daily, and repot them in spring!"
    for cut in range(1, len(text)):
        assert released(drive(StreamEngine(policy()), [text[:cut], text[cut:]])) == text
    assert released(drive(StreamEngine(policy()), ApproxTokenizer().split(text))) == text


def test_refuse_drops_held_text_and_answers_with_the_refusal():
    pieces = ApproxTokenizer().split("Fine words here, then BAD things follow and more.")
    out = drive(StreamEngine(policy(holdback_tokens=3, refusal_message="No.")), pieces)
    reset = next(o for o in out if isinstance(o, ResetEvent))
    assert (reset.category, reset.action, reset.detector) == ("bad", Action.REFUSE, "scripted")
    before = released(out[: out.index(reset)])
    # " here" was three tokens behind the head when " BAD" arrived; ",", " then", " BAD" were not.
    assert before == "Fine words here"
    assert reset.retract_chars == len(before)
    assert reset.discarded.startswith(", then BAD")
    assert shown(out) == "No."
    assert out[-1] == Finish("stop")
    assert "BAD" not in released(out)


def test_truncate_keeps_what_was_shown_and_ends_with_content_filter():
    pieces = ApproxTokenizer().split("Fine words here, then BAD things.")
    out = drive(StreamEngine(policy(actions={"default": Action.TRUNCATE})), pieces)
    reset = next(o for o in out if isinstance(o, ResetEvent))
    assert reset.retract_chars == 0
    assert shown(out) == "Fine words here"
    assert out[-1] == Finish("content_filter")


def test_regenerate_asks_again_and_starts_a_fresh_attempt():
    engine = StreamEngine(policy(actions={"default": Action.REGENERATE}, max_resets=1))
    out = drive(engine, ApproxTokenizer().split("One two three BAD four"))
    assert isinstance(out[-1], Regenerate) or Regenerate() in out
    assert engine.state is State.REGENERATING
    assert engine.feed(Piece("ignored: the rest of the abandoned attempt")) == []
    engine.begin_attempt()
    out = drive(engine, ApproxTokenizer().split("A safe answer instead."))
    assert released(out) == "A safe answer instead."
    assert out[-1] == Finish("stop")


def test_past_max_resets_the_action_becomes_refuse():
    engine = StreamEngine(policy(actions={"default": Action.REGENERATE}, max_resets=1, refusal_message="No."))
    drive(engine, ["BAD one"])
    engine.begin_attempt()
    out = drive(engine, ["BAD again"])
    reset = next(o for o in out if isinstance(o, ResetEvent))
    assert reset.action is Action.REFUSE
    assert shown(out) == "No."
    assert engine.resets == 2


def test_give_up_after_a_failed_regeneration_refuses():
    engine = StreamEngine(policy(actions={"default": Action.REGENERATE}, refusal_message="No."))
    drive(engine, ["BAD"])
    assert shown(engine.give_up()) == "No."
    assert engine.state is State.DONE


def test_flag_lets_the_text_through_and_records_it():
    text = "Fine words here, then BAD things follow."
    out = drive(StreamEngine(policy(actions={"default": Action.FLAG})), ApproxTokenizer().split(text))
    (flag,) = [o for o in out if isinstance(o, Flagged)]
    assert (flag.category, flag.policy) == ("bad", "p")
    assert flag.text.startswith("BAD")
    assert released(out) == text
    assert not any(isinstance(o, ResetEvent) for o in out)


MARKED = "Sure, here is how to do it: first take the thing [RESET]I can't help with that, sorry."


def test_the_upstream_marker_never_reaches_the_client_at_any_split():
    for holdback in (0, 3, 24):
        p = policy(holdback_tokens=holdback)
        expected = None
        for cut in range(1, len(MARKED)):
            out = drive(StreamEngine(p), [MARKED[:cut], MARKED[cut:]], make=lambda: MarkerStream("[RESET]"))
            assert "[RESET]" not in released(out) and "RES" not in released(out)
            (reset,) = [o for o in out if isinstance(o, ResetEvent)]
            assert (reset.category, reset.action) == ("upstream_reset", Action.CONTINUE)
            # What the client displays after mending is the same whatever the split.
            expected = expected or shown(out)
            assert shown(out) == expected == "I can't help with that, sorry."


def test_marker_with_a_long_holdback_drops_everything_before_it():
    out = drive(StreamEngine(policy(holdback_tokens=24)), ApproxTokenizer().split(MARKED),
                make=lambda: MarkerStream("[RESET]"))  # fmt: skip
    reset = next(o for o in out if isinstance(o, ResetEvent))
    assert reset.retract_chars == 0  # nothing had been released: 13 tokens < 24
    assert reset.discarded == "Sure, here is how to do it: first take the thing [RESET]"
    assert released(out) == "I can't help with that, sorry."


def test_fail_open_releases_unjudged_text_and_fail_closed_refuses():
    engine = StreamEngine(policy(holdback_tokens=0, fail_mode="open"))
    engine.feed(Piece("unjudged"))
    assert released(engine.on_guard_failure()) == "unjudged"

    engine = StreamEngine(policy(holdback_tokens=0, fail_mode="closed", refusal_message="No."))
    engine.feed(Piece("unjudged"))
    out = engine.on_guard_failure()
    reset = next(o for o in out if isinstance(o, ResetEvent))
    assert (reset.category, reset.action) == ("guard_unavailable", Action.REFUSE)
    assert shown(out) == "No."


def test_zero_text_pieces_keep_their_place_and_payload():
    engine = StreamEngine(policy(holdback_tokens=0))
    out = engine.feed(Piece("", {"role": "assistant"}))  # nothing before it: out at once
    out += engine.feed(Piece("Hi"))
    out += engine.feed(Piece("", {"tool_calls": [1]}))  # waits behind the unjudged text
    assert len(out) == 1
    out += engine.on_verdict(Verdict(2))
    assert [o.piece.extra for o in out if isinstance(o, Release)] == [
        {"role": "assistant"},
        None,
        {"tool_calls": [1]},
    ]


def test_scoring_is_due_every_score_every_tokens():
    engine = StreamEngine(policy(score_every_tokens=3))
    engine.feed(Piece("one two"))
    assert not engine.scoring_due()
    engine.feed(Piece(" three"))
    assert engine.scoring_due()
    assert engine.take_unscored() == "one two three"
    assert not engine.scoring_due()
    engine.feed(Piece(" four"))
    assert engine.take_unscored() == " four"


def test_finish_before_everything_is_judged_is_a_bug_in_the_caller():
    engine = StreamEngine(policy())
    engine.feed(Piece("text"))
    try:
        engine.finish("stop")
    except RuntimeError as exc:
        assert "judged" in str(exc)
    else:
        raise AssertionError("finish() must refuse unjudged text")


class CharTokens:
    """Every character a guard token: a piece of several characters is a word of several tokens."""

    def token_starts(self, text: str) -> list[int]:
        return list(range(len(text)))


def test_a_piece_the_hold_back_cut_falls_inside_is_split_there_keeping_its_payload() -> None:
    engine = StreamEngine(policy(holdback_tokens=2), CharTokens())
    stream = Scripted()
    steps: list[list[tuple[str, str]]] = []
    for text in ["abcdef", "g", "h"]:
        step = engine.feed(Piece(text, extra=text))
        step += engine.on_verdict(stream.feed_sync(engine.take_unscored()))
        steps.append([(o.piece.text, o.piece.extra) for o in step if isinstance(o, Release)])
    # Two tokens behind the head: the first four tokens of "abcdef" go out at once (whole, it would
    # have waited for 4 more chunks); the rest is one token past the cut, then whole.
    assert steps == [[("abcd", "abcdef")], [], [("ef", "abcdef")]]
    assert released(engine.finish("stop")) == "gh"
