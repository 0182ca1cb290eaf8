"""`GuardedResponse` against a guard whose time grows with the text it is given (as a model's does)."""

from __future__ import annotations

import asyncio

from proxy.core.detectors import MarkerGuard, PatternGuard, Verdict
from proxy.core.engine import Release, ResetEvent
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


def _piece(text: str):  # type: ignore[no-untyped-def]
    from proxy.core.engine import Piece

    return Piece(text)
