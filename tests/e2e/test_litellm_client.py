"""End to end with a wrapper client: LiteLLM's SDK -> the proxy -> replay-upstream (issue 15's case).

LiteLLM drops the `backtrack` object, as most wrappers and chat UIs do, so what it yields is what a
plain client shows: under `event` the refusal spliced onto the retracted start, under `notice` the
notice between them, under `cut` the retracted start and a content_filter finish.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from proxy.core.policy import Policy
from tests.harness import POLICY, WORDY, Harness, policy

with warnings.catch_warnings():  # its import warns (pydantic, deprecations): not this project's to fix
    warnings.simplefilter("ignore")
    litellm: Any = pytest.importorskip(
        "litellm",
        reason="litellm is not installed in this environment (the benchmark keeps it in "
        ".bench/litellm-venv; it is not a project requirement)",
    )

# LiteLLM warns as it lazily imports its parts (pydantic, deprecations): its warnings, not ours.
pytestmark = pytest.mark.filterwarnings("ignore")

REFUSAL = POLICY["refusal_message"]
NOTICE = Policy(name="x").retraction_notice
WORDY_SHOWN = "Explosives are chemicals."  # what a hold-back of 4 has let out when the guard reaches "bomb"


async def litellm_stream(proxy: str) -> tuple[str, str | None]:
    """The text LiteLLM's `acompletion(..., stream=True)` yields from the proxy, and the finish reason."""
    stream = await litellm.acompletion(
        model="openai/m", api_base=f"{proxy}/v1", api_key="sk-test", stream=True,
        messages=[{"role": "user", "content": WORDY["prompt"]}],
    )  # fmt: skip
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize(
    ("mode", "text", "finish"),
    [
        ("event", WORDY_SHOWN + REFUSAL, "stop"),
        ("notice", WORDY_SHOWN + NOTICE + REFUSAL, "stop"),
        ("cut", WORDY_SHOWN, "content_filter"),
    ],
)
async def test_litellm_shows_what_the_retraction_says(
    harness: Harness, mode: str, text: str, finish: str
) -> None:
    _, proxy, _ = await harness.proxy_client(harness.client, policy(retraction=mode), [WORDY])

    assert await litellm_stream(proxy) == (text, finish)
