"""`backtrack guard-serve`'s HTTP app: one guard model behind `POST /v1/guard/score`, for replicas
that share a guard instead of loading one each (a policy's remote detector, `protocol: backtrack`).

Each request carries the prompt and the whole text so far, so the service keeps no per-stream state
(any replica, any guard-serve instance behind a load balancer, can answer any call). Requests from all
callers are scored together: every request opens a stream on the one `BatchScorer`, whose worker batches
all waiting streams into one forward pass. A full queue answers 503, which the caller's retries and fail
mode handle. `GET /healthz` answers once the model is loaded; `GET /metrics` shows the batch sizes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import web

from proxy.core.detectors import GuardStream
from proxy.core.errors import BacktrackError, ClientError, GuardError, Unauthorized
from proxy.core.judges import GUARD_PATH, read_score_request, score_answer
from proxy.state.metrics import Metrics


class Opens(Protocol):
    def open(self, prompt: str | None) -> GuardStream: ...


class Scorer(Protocol):
    """What the app needs of `guard.scorer.BatchScorer` (the server layer does not import torch)."""

    on_batch: Callable[[int], None] | None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def guard(self, logit_bias: float, threshold: float) -> Opens: ...


SCORER = web.AppKey("guard_scorer", Scorer)
API_KEY = web.AppKey("guard_api_key", str)
GUARD_METRICS = web.AppKey("guard_metrics", Metrics)
# Request bodies hold a prompt and an answer so far: 4 MiB is far past any the guard reads whole.
MAX_BODY_BYTES = 4 * 1024 * 1024


def create_guard_app(scorer: Scorer, api_key: str | None = None) -> web.Application:
    """The guard service for `scorer` (a `guard.scorer.BatchScorer`, started and stopped with the app);
    with `api_key`, every score request needs `Authorization: Bearer KEY`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[SCORER] = scorer
    app[API_KEY] = api_key or ""
    app[GUARD_METRICS] = Metrics()
    scorer.on_batch = app[GUARD_METRICS].guard_batch_size.observe
    app.cleanup_ctx.append(_scorer_ctx)
    app.router.add_post(GUARD_PATH, _score)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _scorer_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[SCORER].start()
    yield
    await app[SCORER].stop()


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BacktrackError as exc:
        status = 503 if isinstance(exc, GuardError) else exc.status
        return web.json_response({"error": {"message": exc.message, "type": exc.kind}}, status=status)


async def _score(request: web.Request) -> web.Response:
    key = request.app[API_KEY]
    if key:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise Unauthorized("a missing or wrong API key")
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClientError("the body is not JSON") from None
    req = read_score_request(body)
    guard = request.app[SCORER].guard(logit_bias=req.logit_bias, threshold=req.threshold)
    stream = guard.open(req.prompt)
    try:
        verdict = await stream.feed(req.text, final=req.final)
    finally:
        stream.close()
    return web.json_response(score_answer(verdict))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[GUARD_METRICS].exposition(), content_type="text/plain")
