"""A LiteLLM callback that reads every streamed answer with Backtrack's guard, for `backtrack bench all`.

It runs inside LiteLLM's proxy, not Backtrack's: the bench copies this file next to a LiteLLM config
that names `litellm_guard.handler` among its callbacks, and starts LiteLLM with this repository on
PYTHONPATH (for `guard` and `proxy`) and the guard's settings as JSON in `BACKTRACK_BENCH_GUARD`:
`checkpoint`, `logit_bias`, `threshold`, and optionally `precision` (default fp32) and torch `threads`
(default 1). LiteLLM's streaming iterator hook gives it each chunk: the chunk goes out once the guard has
scored its text (Backtrack with `holdback_tokens: 0` does the same); a reset ends the answer there. The
scorer is the proxy's own `BatchScorer`, batching all of LiteLLM's live streams.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litellm.integrations.custom_logger import CustomLogger  # type: ignore[import-not-found]

# `bench.litellm_peer.HOOK_SETTINGS_ENV`: this module runs where the bench's own imports may not.
SETTINGS_ENV = "BACKTRACK_BENCH_GUARD"


class BacktrackGuard(CustomLogger):  # type: ignore[misc]
    """LiteLLM's streaming guardrail hook around Backtrack's guard model."""

    def __init__(self) -> None:
        super().__init__()
        self._guard: Any = None
        self._loading = asyncio.Lock()

    async def _model_guard(self) -> Any:
        # The scorer's worker must live on LiteLLM's event loop, so the model loads with the first request.
        async with self._loading:
            if self._guard is None:
                from guard.scorer import load_scorer

                settings = json.loads(os.environ[SETTINGS_ENV])
                # One thread by default: torch's default of one per core had its workers contend with
                # LiteLLM's event loop on the same two cores (40-47 CPU-ms per chunk at one unthrottled
                # stream; 6-7 with one thread).
                scorer = await asyncio.to_thread(
                    load_scorer,
                    Path(settings["checkpoint"]),
                    threads=int(settings.get("threads", 1)),
                    precision=settings.get("precision", "fp32"),
                )
                await scorer.start()
                self._guard = scorer.guard(
                    logit_bias=float(settings["logit_bias"]), threshold=float(settings["threshold"])
                )
        return self._guard

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any]
    ) -> AsyncIterator[Any]:
        guard = await self._model_guard()
        stream = guard.open(_prompt(request_data))
        try:
            async for chunk in response:
                text = "".join(choice.delta.content or "" for choice in chunk.choices)
                if text and (await stream.feed(text)).reset is not None:
                    return
                yield chunk
        finally:
            stream.close()


def _prompt(request_data: dict[str, Any]) -> str | None:
    """The last user message's text, which the guard reads before the answer."""
    for message in reversed(request_data.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            content: str = message["content"]
            return content
    return None


# LiteLLM resolves `callbacks` entries to module attributes: the one instance it calls.
handler = BacktrackGuard()
