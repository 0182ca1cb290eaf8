"""`GuardedResponse` against a guard whose time grows with the text it is given (as a model's does)."""

from __future__ import annotations

import asyncio

from proxy.core.detectors import Guard, GuardStream, MarkerGuard, PatternGuard, Verdict
from proxy.core.engine import Output, Release, ResetEvent
from proxy.core.policy import Policy
from proxy.server.choice import FEED_CHARS, GuardedResponse, Labels
from proxy.state.metrics import Metrics
from tests.fakes import AwaitedGuard, AwaitedStream

SECONDS_PER_CHAR = 0.5 / 20_000  # 20k characters take half a second: past the timeout below


class SlowStream(AwaitedStream):
    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        await asyncio.sleep(len(text) * SECONDS_PER_CHAR)
        return await super().feed(text, final=final)


class SlowGuard(AwaitedGuard):
    def open(self, prompt: str | None) -> SlowStream:
        return SlowStream(self.inner.open(prompt))


async def test_one_huge_delta_cannot_push_a_fail_open_guard_past_its_timeout() -> None:
    # 100 KB in one delta, the unsafe word near its end: judged as a whole it would take ~2.5 s.
    policy = Policy(name="p", fail_mode="open", guard_timeout_seconds=0.2, holdback_tokens=4)
    guard = SlowGuard(PatternGuard([], [("bomb", "weapons")]))
    guarded = GuardedResponse(policy, guard, None, Metrics(), Labels("p", "/r", "m"))
    choice = guarded.choice(0)
    delta = "word " * 20_000 + "now build the bomb like this"
    outputs = guarded.feed(choice, _piece(delta)) + await guarded.finish(choice, "stop")
    guarded.close()

    assert any(isinstance(o, ResetEvent) for o in outputs)
    released = "".join(o.piece.text for o in outputs if isinstance(o, Release))
    assert "bomb" not in released and "like this" not in released
    assert guarded.metrics.fail_open.labels("p")._value.get() == 0


def test_the_guard_is_fed_at_most_feed_chars_at_a_time() -> None:
    policy = Policy(name="p")
    guarded = GuardedResponse(policy, MarkerGuard(), None, Metrics(), Labels("p", "/r", "m"))
    engine = guarded.choice(0).engine
    engine.feed(_piece("x" * (2 * FEED_CHARS + 10)))
    sizes = []
    while not engine.all_sent:
        sizes.append(len(engine.take_unscored(FEED_CHARS)))
    assert sizes == [FEED_CHARS, FEED_CHARS, 10]


class GatedStream(AwaitedStream):
    """Answers only once its guard's gate is open, as a model's pass that takes its time."""

    def __init__(self, inner: GuardStream, guard: GatedGuard) -> None:
        super().__init__(inner)
        self.guard = guard

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        self.guard.fed.append(text)
        await self.guard.gate.wait()
        return await super().feed(text, final=final)


class GatedGuard(AwaitedGuard):
    def __init__(self, inner: Guard) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.fed: list[str] = []

    def open(self, prompt: str | None) -> GatedStream:
        return GatedStream(self.inner.open(prompt), self)


async def settled() -> None:
    """Let the tasks started so far run until they wait (a feed passes through a few steps first)."""
    for _ in range(20):
        await asyncio.sleep(0)


def released(outputs: list[Output]) -> str:
    return "".join(o.piece.text for o in outputs if isinstance(o, Release))


async def test_while_a_verdict_is_out_text_comes_in_and_the_next_feed_takes_it_all() -> None:
    guard = GatedGuard(PatternGuard([], [("bomb", "weapons")]))
    guarded = GuardedResponse(
        Policy(name="p", holdback_tokens=0), guard, None, Metrics(), Labels("p", "/r", "m")
    )
    choice = guarded.choice(0)
    assert guarded.feed(choice, _piece("one ")) == []  # nothing is judged yet
    assert await guarded.ask(choice) == []  # asked, not waited for
    await settled()
    for text in ("two ", "three "):
        assert guarded.feed(choice, _piece(text)) == []
        assert await guarded.ask(choice) == []
    assert guard.fed == ["one "]  # one feed out at a time
    guard.gate.set()
    await asyncio.wait(guarded.asking())
    assert guarded.answered() == [choice]
    assert released(await guarded.answer(choice)) == "one "
    await settled()
    assert guard.fed == ["one ", "two three "]  # what came meanwhile, in one feed
    assert released(await guarded.finish(choice, "stop")) == "two three "
    assert guarded.asking() == []
    guarded.close()


async def test_a_late_verdict_still_resets_before_its_text_is_released() -> None:
    guard = GatedGuard(PatternGuard([], [("bomb", "weapons")]))
    guarded = GuardedResponse(
        Policy(name="p", holdback_tokens=0), guard, None, Metrics(), Labels("p", "/r", "m")
    )
    choice = guarded.choice(0)
    guarded.feed(choice, _piece("build the bomb "))
    await guarded.ask(choice)
    outputs = guarded.feed(choice, _piece("like this"))  # arrives while the verdict is out
    guard.gate.set()
    outputs += await guarded.answer(choice) + await guarded.finish(choice, "stop")
    assert any(isinstance(o, ResetEvent) for o in outputs)
    assert "bomb" not in released(outputs) and "like this" not in released(outputs)
    guarded.close()


async def test_a_verdict_out_when_the_attempt_ends_is_dropped() -> None:
    guard = GatedGuard(PatternGuard([], [("bomb", "weapons")]))
    guarded = GuardedResponse(Policy(name="p"), guard, None, Metrics(), Labels("p", "/r", "m"))
    choice = guarded.choice(0)
    guarded.feed(choice, _piece("some text "))
    await guarded.ask(choice)
    task = guarded.asking()[0]
    guarded.abandon()  # the upstream broke: nothing more is judged or released
    await asyncio.sleep(0)
    assert task.cancelled() and guarded.asking() == [] and await guarded.answer(choice) == []
    guarded.close()


def _piece(text: str):  # type: ignore[no-untyped-def]
    from proxy.core.engine import Piece

    return Piece(text)
