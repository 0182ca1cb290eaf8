"""`/playground`: a page that shows one stream mended live, and the debug channel that feeds it.

The page is plain files in `static/` (no build step, nothing fetched from elsewhere): `index.html`,
`playground.css`, `playground.js`, and `mend.js`, the dependency-free ES module that any browser client
may copy to mend a stream (it applies reset events to what it displays).

Access. Everything here is off unless `server.playground: true`: the routes are not even added. With
tenants configured the page and its files need the admin token, as a bearer token or as the password of
HTTP Basic auth (so that a browser can ask for it); the page's own API requests still need a tenant key.

The debug channel. What the page shows beyond a client's view (the hold-back window, each verdict's
score, the text a reset dropped) is exactly what no client may ever get, so it takes a secret:

- at start the proxy draws a random token (`secrets.token_urlsafe`), kept in this process only and
  handed out in one place: the playground page (a new process, a new token);
- a streamed request on an SSE route (OpenAI chat and completions, Anthropic messages) that carries
  `X-Backtrack-Debug: TOKEN` gets extra events `event: backtrack_debug`, whose data is one of
      {"event": "start", "policy", "threshold", "holdback_tokens", "detectors"}
      {"event": "upstream", "index", "attempt", "text"}     a delta as the upstream sent it
      {"event": "verdict", "index", "attempt", "score", "scored_until", "received", "released", "held",
       "reset"}                                              after each verdict, the text still held back
  where `reset`, when the verdict reset, is {"category", "detector", "action", "retract_chars", "dropped"};
- without the header a request gets none of this; with a wrong token it is refused (403: a page left open
  across a restart holds a stale token); the header never goes upstream.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from proxy.core.detectors import Verdict
from proxy.core.engine import Flagged, Output, ResetEvent, StreamEngine
from proxy.core.errors import Forbidden
from proxy.core.policy import Policy
from proxy.dialects.base import DialectRequest
from proxy.dialects.sse import encode_sse
from proxy.server.keys import POLICIES, SETTINGS

DEBUG_HEADER = "X-Backtrack-Debug"
DEBUG_EVENT = "backtrack_debug"
# The files of the page, and the media types they are served with (ES modules must be JavaScript).
STATIC = {
    "mend.js": "text/javascript",
    "playground.js": "text/javascript",
    "playground.css": "text/css",
}
# Nothing but the page's own files and requests: no inline script, no other origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}


def static_text(name: str) -> str:
    return resources.files("proxy.server").joinpath("static", name).read_text(encoding="utf-8")


@dataclass
class DebugTap:
    """One debugged stream's extra events, written out between the codec's own (`take`)."""

    policy: Policy
    out: bytearray = field(default_factory=bytearray)
    attempts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        detectors = self.policy.detectors
        switches = (("marker", detectors.marker.enabled), ("model", detectors.model.enabled))
        enabled = [name for name, on in switches if on]
        self._event(
            event="start",
            policy=self.policy.name,
            threshold=self.policy.threshold,
            holdback_tokens=self.policy.holdback_tokens,
            detectors=[*enabled, *(["patterns"] if detectors.patterns else [])],
        )

    def _event(self, **data: Any) -> None:
        self.out += encode_sse(json.dumps(data, ensure_ascii=False), DEBUG_EVENT)

    def piece(self, index: int, text: str) -> None:
        if text:
            self._event(event="upstream", index=index, attempt=self.attempts.get(index, 0), text=text)

    def attempt(self, index: int) -> None:
        """Choice `index` is asked for again: what the upstream sends next is a new attempt."""
        self.attempts[index] = self.attempts.get(index, 0) + 1

    def verdict(self, index: int, engine: StreamEngine, verdict: Verdict, outputs: list[Output]) -> None:
        score = verdict.score if verdict.reset is None else max(verdict.score, verdict.reset.score)
        reset: dict[str, Any] | None = None
        for o in outputs:
            if isinstance(o, ResetEvent):
                reset = {
                    "category": o.category, "detector": o.detector, "action": o.action.value,
                    "retract_chars": o.retract_chars, "dropped": o.discarded,
                }  # fmt: skip
            elif isinstance(o, Flagged):
                reset = {"category": o.category, "detector": o.detector, "action": "flag", "dropped": ""}
        attempt = engine.attempt
        self._event(
            event="verdict",
            index=index,
            attempt=self.attempts.get(index, 0),
            score=round(score, 4),
            scored_until=verdict.scored_until,
            received=attempt.received_chars,
            released=attempt.released_chars,
            held="".join(p.text for p in attempt.held),
            reset=reset,
        )

    def take(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out


class Playground:
    """The page's routes and the debug token; one per app (bound into the handlers, no global)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(32)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/playground", self.page)
        app.router.add_get("/playground/{name}", self.static)

    def tap(self, request: web.Request, req: DialectRequest, policy: Policy) -> DebugTap | None:
        """The debug channel for this request, when it carries the right token and streams SSE."""
        presented = request.headers.get(DEBUG_HEADER)
        if presented is None:
            return None
        if not hmac.compare_digest(presented.strip().encode(), self.token.encode()):
            raise Forbidden(f"{DEBUG_HEADER}: the debug token is wrong (reload the playground page).")
        if not req.stream or req.codec().media_type != "text/event-stream":
            return None
        return DebugTap(policy)

    async def page(self, request: web.Request) -> web.Response:
        denied = check_access(request)
        if denied is not None:
            return denied
        html = static_text("index.html").replace("{{CONFIG}}", _script_json(page_config(request, self.token)))
        return web.Response(
            text=html,
            content_type="text/html",
            charset="utf-8",
            headers=PAGE_HEADERS,
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        denied = check_access(request)
        if denied is not None:
            return denied
        return web.Response(
            text=static_text(name),
            content_type=STATIC[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )


def check_access(request: web.Request) -> web.Response | None:
    """None when the request may see the page: always without tenants, else with the admin token."""
    settings = request.app[SETTINGS]
    if not request.app[POLICIES].live.policy_set.tenants:
        return None
    expected = settings.admin_token
    if expected is None:
        raise Forbidden(f"With tenants the playground needs the admin token: set {settings.admin.token_env}.")
    token = _presented_token(request.headers.get("Authorization", ""))
    if token is None:
        return web.Response(
            status=401,
            text="The playground needs the admin token (as the password, any user name).\n",
            headers={"WWW-Authenticate": 'Basic realm="backtrack playground", charset="UTF-8"'},
        )
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Forbidden("The admin token is wrong.")
    return None


def _presented_token(authorization: str) -> str | None:
    """A bearer token, or the password of Basic auth (what a browser's own prompt sends)."""
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, _, password = decoded.partition(":")
        return password or None
    return None


def page_config(request: web.Request, token: str) -> dict[str, Any]:
    """What the page needs to know: the debug token, the policies it can ask for, the demo prompts."""
    settings = request.app[SETTINGS]
    policy_set = request.app[POLICIES].live.policy_set
    tenants = bool(policy_set.tenants)
    allowed = set(policy_set.anonymous_allowed_policies) | {policy_set.default_policy}
    policies = [
        {
            "name": name,
            "threshold": p.threshold,
            "holdback_tokens": p.holdback_tokens,
            "description": p.description,
            # With tenants the key decides; the page cannot know which it will be given.
            "selectable": tenants or name in allowed,
        }
        for name, p in sorted(policy_set.policies.items())
    ]
    return {
        "debugToken": token,
        "debugHeader": DEBUG_HEADER,
        "defaultPolicy": policy_set.default_policy,
        "policies": policies,
        "tenants": tenants,
        "demoPrompts": demo_prompts() if settings.upstream.url is None else [],
    }


def demo_prompts() -> list[str]:
    """The prompts the built-in demo upstream answers."""
    text = resources.files("proxy.replay").joinpath("demo", "corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.split("\n") if line.strip()]


def _script_json(data: Any) -> str:
    """JSON safe inside `<script type="application/json">`: no `</script>` or `<!--` can close it early."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
