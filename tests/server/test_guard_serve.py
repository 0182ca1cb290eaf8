"""`backtrack guard-serve` with the bundled checkpoint, run as a user runs it (a subprocess on a real
port), as the judge of a proxy that loads no model: a policy's remote detector with `protocol: backtrack`.

The proxy's guard is the one behind HTTP: a harmful answer is reset before its harmful part is shown, an
ordinary one passes untouched, and calls from many streams are scored in shared forward passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from guard.scorer import BUNDLED
from tests.harness import Harness, metric, running
from tests.server.test_remote_judges import BENIGN, HARMFUL, PROMPT, REFUSAL, SHOWN, ask, judge_policy

pytestmark = pytest.mark.skipif(
    not (BUNDLED / "guard.safetensors").exists(), reason="no bundled guard checkpoint in guard/checkpoint/"
)


@pytest.fixture
async def guard_serve() -> AsyncIterator[str]:
    """`backtrack guard-serve --port P` until /healthz answers (the model loads first)."""
    async with running("guard-serve") as (root, _):
        yield root


def served_policy(root: str) -> dict[str, Any]:
    """The shipped default policy's reset rule and hold-back, with the guard behind HTTP."""
    detector = {"protocol": "backtrack", "url": root, "every_tokens": 4, "timeout_seconds": 5.0}
    return judge_policy(
        detector, holdback_tokens=24, logit_bias=-1.75, threshold=0.5, guard_timeout_seconds=10.0
    )


async def test_guard_serve_judges_for_a_proxy_without_a_model(harness: Harness, guard_serve: str) -> None:
    upstream = await harness.replay([HARMFUL, BENIGN], tokens_per_second=200)
    settings = harness.settings(upstream, served_policy(guard_serve))
    assert not settings.needs_model  # this proxy loads no guard of its own
    proxy = await harness.proxy(upstream, served_policy(guard_serve))

    text, resets = await ask(harness, proxy, BENIGN["prompt"])
    assert (text, resets) == (BENIGN["response"], [])

    text, resets = await ask(harness, proxy, PROMPT)
    assert [(r["category"], r["policy"]) for r in resets] == [("unsafe", "test")]
    assert text.endswith(REFUSAL)
    assert "gunpowder" not in SHOWN[PROMPT]
    async with aiohttp.ClientSession() as session:
        assert (
            await metric(session, proxy, 'backtrack_judge_calls_total{detector="judge",policy="test"}') >= 3
        )


async def test_guard_serve_scores_many_callers_in_shared_forward_passes(guard_serve: str) -> None:
    body = {
        "prompt": PROMPT,
        "text": HARMFUL["response"],
        "final": True,
        "logit_bias": -1.75,
        "threshold": 0.5,
    }
    async with aiohttp.ClientSession() as session:

        async def score() -> dict[str, Any]:
            async with session.post(f"{guard_serve}/v1/guard/score", json=body) as resp:
                assert resp.status == 200
                answer: dict[str, Any] = await resp.json()
                return answer

        answers = await asyncio.gather(*(score() for _ in range(16)))
        passes = await metric(session, guard_serve, "backtrack_guard_batch_size_count")
        # Stateless calls: the same text gets the same verdict whichever batch it was scored in.
        assert len({(a["reset"]["at"], a["scored_until"]) for a in answers}) == 1
        assert answers[0]["scored_until"] == len(HARMFUL["response"])
        assert passes < 16

        async with session.post(f"{guard_serve}/v1/guard/score", json={"text": 3}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "'text' must be a string"
