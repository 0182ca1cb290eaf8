"""`retraction`: what a client that ignores reset events sees when a reset takes back shown text."""

import pytest

from proxy.core.detectors import MarkerStream
from proxy.core.engine import Finish, Flagged, Piece, Regenerate, Release, ResetEvent, State, StreamEngine
from proxy.core.errors import ConfigError
from proxy.core.policy import Action, Policy, parse_model
from proxy.core.tokens import ApproxTokenizer
from tests.core.test_engine import Scripted, drive, released, shown

NOTICE = "\n\n[The answer above was withdrawn.]\n\n"
TEXT = "Fine words here, then BAD things follow and more."
MARKED = "Sure, first the tension wrench goes in and then [RESET]I can't help with that."


def pieces(text: str = TEXT) -> list[str]:
    return ApproxTokenizer().split(text)


def policy(retraction: str, **kw) -> Policy:
    kw.setdefault("holdback_tokens", 3)
    return Policy(name="p", retraction=retraction, refusal_message="No.", **kw)


def the_reset(out: list) -> ResetEvent:
    return next(o for o in out if isinstance(o, ResetEvent))


def plain(outputs: list) -> str:
    """What a client that ignores reset events displays from a stream: every text, the notice too."""
    text = ""
    for o in outputs:
        if isinstance(o, Release):
            text += o.piece.text
        elif isinstance(o, ResetEvent):
            text += o.notice
    return text


def test_notice_is_the_default_and_its_text_is_configurable():
    assert Policy(name="p").retraction == "notice"
    assert Policy(name="p").retraction_notice == NOTICE
    with pytest.raises(ConfigError, match="'retraction' has value 'hide'"):
        parse_model(Policy, {"name": "p", "retraction": "hide"}, "policies/p.yaml")
    with pytest.raises(ConfigError, match="'retraction_notice'"):
        parse_model(Policy, {"name": "p", "retraction_notice": ""}, "policies/p.yaml")


def test_event_splices_the_continuation_onto_the_shown_text():
    out = drive(StreamEngine(policy("event")), pieces())
    reset = the_reset(out)
    assert (reset.retract_chars, reset.notice) == (len("Fine words here"), "")
    assert plain(out) == "Fine words hereNo."  # the splice issue 15 is about
    assert shown(out) == "No."


def test_notice_rides_on_the_reset_between_the_shown_text_and_the_continuation():
    out = drive(StreamEngine(policy("notice")), pieces())
    reset = the_reset(out)
    assert reset.action is Action.REFUSE
    assert reset.notice == NOTICE
    assert plain(out) == "Fine words here" + NOTICE + "No."
    assert shown(out) == "No."  # a mending client erases the shown text and skips the notice
    assert out[-1] == Finish("stop")


def test_notice_text_comes_from_the_policy():
    out = drive(StreamEngine(policy("notice", retraction_notice=" [withdrawn] ")), pieces())
    assert plain(out) == "Fine words here [withdrawn] No."


def test_with_nothing_shown_all_three_behave_alike():
    results = []
    for mode in ("event", "notice", "cut"):
        out = drive(StreamEngine(policy(mode, holdback_tokens=40)), pieces())
        reset = the_reset(out)
        results.append((reset.action, reset.retract_chars, reset.notice, plain(out), out[-1]))
    assert results == [(Action.REFUSE, 0, "", "No.", Finish("stop"))] * 3


def test_a_truncate_keeps_the_shown_text_whatever_the_retraction():
    for mode in ("event", "notice", "cut"):
        out = drive(StreamEngine(policy(mode, actions={"default": Action.TRUNCATE})), pieces())
        reset = the_reset(out)
        assert (reset.action, reset.retract_chars, reset.notice) == (Action.TRUNCATE, 0, "")
        assert shown(out) == plain(out) == "Fine words here"
        assert out[-1] == Finish("content_filter")


def test_a_flag_changes_nothing_whatever_the_retraction():
    for mode in ("event", "notice", "cut"):
        out = drive(StreamEngine(policy(mode, actions={"default": Action.FLAG})), pieces())
        assert not any(isinstance(o, ResetEvent) for o in out)
        assert any(isinstance(o, Flagged) for o in out)
        assert released(out) == TEXT


def test_cut_ends_the_choice_with_content_filter_and_still_retracts():
    for action in (Action.REFUSE, Action.REGENERATE, Action.INJECT):
        engine = StreamEngine(policy("cut", actions={"default": action}))
        out = drive(engine, pieces())
        reset = the_reset(out)
        assert reset.action is Action.TRUNCATE  # what was done, for the metrics and the audit
        assert (reset.retract_chars, reset.notice) == (len("Fine words here"), "")
        assert not any(isinstance(o, Regenerate) for o in out)
        assert plain(out) == "Fine words here"  # nothing spliced on
        assert shown(out) == ""  # a mending client removes it
        assert out[-1] == Finish("content_filter")
        assert engine.state is State.DONE


def test_notice_before_a_regenerated_attempt_is_no_part_of_it():
    engine = StreamEngine(policy("notice", actions={"default": Action.REGENERATE}))
    first = drive(engine, pieces())
    assert the_reset(first).notice == NOTICE and Regenerate() in first
    engine.begin_attempt()
    second = drive(engine, pieces("Another try, and BAD again here."))
    reset = the_reset(second)
    # Only the new attempt's released text is retracted: a mending client never displayed the notice.
    assert reset.retract_chars == len(released(second[: second.index(reset)]))
    assert reset.notice == NOTICE


def test_the_upstreams_own_marker_gets_the_notice_or_the_cut():
    def marker() -> MarkerStream:
        return MarkerStream("[RESET]")

    noticed = drive(StreamEngine(policy("notice")), pieces(MARKED), make=marker)
    cut = drive(StreamEngine(policy("cut")), pieces(MARKED), make=marker)

    assert the_reset(noticed).action is Action.CONTINUE
    before = released(noticed[: noticed.index(the_reset(noticed))])
    assert before and plain(noticed) == before + NOTICE + "I can't help with that."
    assert shown(noticed) == "I can't help with that."
    assert the_reset(cut).action is Action.TRUNCATE
    assert plain(cut) == before and shown(cut) == ""
    assert cut[-1] == Finish("content_filter")


def test_fail_closed_after_shown_text_cuts_under_cut():
    engine = StreamEngine(policy("cut", fail_mode="closed"))
    out = engine.feed(Piece("Fine"))
    guard = Scripted()
    for text in (" words", " here", " and", " more"):
        out += engine.feed(Piece(text))
        out += engine.on_verdict(guard.feed_sync(engine.take_unscored()))
    out += engine.feed(Piece(" unjudged"))
    out += engine.on_guard_failure()
    reset = the_reset(out)
    assert reset.retract_chars > 0 and reset.action is Action.TRUNCATE
    assert out[-1] == Finish("content_filter")
