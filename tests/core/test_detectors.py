import asyncio

from proxy.core.detectors import (
    CompositeGuard,
    MarkerGuard,
    PatternGuard,
    Reset,
    Verdict,
    combine,
)


async def feed_parts(stream, parts: list[str]) -> list[Verdict]:
    verdicts = [await stream.feed(p) for p in parts]
    verdicts.append(await stream.feed("", final=True))
    return verdicts


TEXT = "Sure, here you go [RESET]Sorry, I can't."


async def test_marker_is_found_at_every_split_with_its_continuation():
    for cut in range(len(TEXT) + 1):
        verdicts = await feed_parts(MarkerGuard().open(None), [TEXT[:cut], TEXT[cut:]])
        reset = verdicts[-1].reset
        assert reset == Reset(18, "upstream_reset", 1.0, "marker", 25)
        assert TEXT[reset.resume_at :] == "Sorry, I can't."


async def test_marker_stream_never_vouches_for_a_possible_marker_start():
    stream = MarkerGuard().open(None)
    assert (await stream.feed("Hello [RE")).scored_until == len("Hello ")
    assert (await stream.feed("ally")).scored_until == len("Hello [REally")
    assert (await stream.feed(" [")).scored_until == len("Hello [REally ")
    assert (await stream.feed("", final=True)).scored_until == len("Hello [REally [")


async def test_patterns_do_not_judge_a_trailing_partial_word():
    guard = PatternGuard([], words=[("kill", "violence")])
    stream = guard.open(None)
    v = await stream.feed("what a kill")
    assert v.reset is None and v.scored_until == len("what a ")
    v = await stream.feed("joy it was")
    assert v.reset is None  # "killjoy" is not "kill"
    v = await stream.feed(" to kill him.")
    assert v.reset == Reset(len("what a killjoy it was to "), "violence", 1.0, "patterns")


async def test_patterns_match_at_every_split():
    text = "You could mix bleach and ammonia at home."
    guard = PatternGuard([(r"bleach\s+and\s+ammonia", "chemical")])
    for cut in range(len(text) + 1):
        verdicts = await feed_parts(guard.open(None), [text[:cut], text[cut:]])
        assert verdicts[-1].reset == Reset(14, "chemical", 1.0, "patterns")


async def test_composite_takes_the_earliest_reset_and_the_least_vouched_text():
    guard = CompositeGuard([MarkerGuard(), PatternGuard([], words=[("bomb", "weapons")])])
    stream = guard.open("a prompt")
    v = await stream.feed("build a bomb then [RESET]no")
    assert v.reset is not None and (v.reset.category, v.reset.at) == ("weapons", 8)
    assert guard.name == "marker+patterns"


def test_combine():
    a = Verdict(10, None, 0.2)
    b = Verdict(4, Reset(7, "x", 0.9, "m"), 0.9)
    assert combine([a, b]) == Verdict(4, Reset(7, "x", 0.9, "m"), 0.9)


def test_streams_are_independent():
    guard = MarkerGuard()
    one, two = guard.open(None), guard.open(None)
    asyncio.run(one.feed("[RESET]"))
    assert asyncio.run(two.feed("fine")).reset is None
