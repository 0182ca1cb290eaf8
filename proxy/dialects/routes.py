"""The route table: which API a path belongs to, how its requests are parsed, how its errors look.

Every decision that depends on the route is read from here, once: the proxy's router, its error
responses (before the headers), and the stand-in upstream's error responses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from proxy.dialects import anthropic, ollama, openai
from proxy.dialects.base import JSON, DialectRequest


@dataclass(frozen=True)
class Route:
    path: str
    api: str  # "openai", "anthropic" or "ollama": the error format and the reset's wire shape
    parse: Callable[[bytes], DialectRequest]


ROUTES: dict[str, Route] = {
    r.path: r
    for r in (
        Route("/v1/chat/completions", "openai", functools.partial(openai.parse_request, chat=True)),
        Route("/v1/completions", "openai", functools.partial(openai.parse_request, chat=False)),
        Route("/v1/messages", "anthropic", anthropic.parse_request),
        Route("/api/chat", "ollama", functools.partial(ollama.parse_request, chat=True)),
        Route("/api/generate", "ollama", functools.partial(ollama.parse_request, chat=False)),
    )
}


def api_of(path: str) -> str:
    """The API a path belongs to; anything unknown answers like OpenAI (the most common client)."""
    route = ROUTES.get(path)
    if route is not None:
        return route.api
    return "ollama" if path.startswith("/api/") else "openai"


def error_body(
    path: str, message: str, *, status: int, kind: str, param: str | None = None, code: str | None = None
) -> JSON:
    """An error in the format of the API that `path` belongs to."""
    api = api_of(path)
    if api == "anthropic":
        return anthropic.error_object(message, status)
    if api == "ollama":
        return ollama.error_object(message, status)
    return openai.error_object(message, kind, code, param)
