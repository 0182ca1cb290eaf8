"""Fakes shared by several test modules."""

from __future__ import annotations

from typing import Any

from proxy.core.detectors import Guard, GuardStream, Verdict

# An Anthropic `message_start` message, before any content block.
ANTHROPIC_MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude",
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 1},
}


class AwaitedStream:
    """A detector's stream behind an awaited `feed` only, as the guard model's scorer answers."""

    def __init__(self, inner: GuardStream) -> None:
        self.inner = inner

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        return await self.inner.feed(text, final=final)

    def close(self) -> None:
        self.inner.close()


class AwaitedGuard:
    """A guard whose streams are awaited (timed, queued) instead of judged inline."""

    name = "awaited"
    tokenizer = None

    def __init__(self, inner: Guard) -> None:
        self.inner = inner

    def open(self, prompt: str | None) -> AwaitedStream:
        return AwaitedStream(self.inner.open(prompt))
