"""The aiohttp application: `create_app(settings)` builds everything; handlers stay thin.

Resources live under typed `AppKey`s, each set up and torn down by its own `cleanup_ctx` generator:
the upstream client session, the built-in demo upstream (only when no upstream is configured), the
guard model (only when a policy enables it), and the live policies with their guards (`proxy.reload`),
which a reload swaps while streams in flight keep the policy they started with.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.audit import RequestInfo
from proxy.config import Settings
from proxy.dialects import anthropic, ollama, openai
from proxy.dialects.base import DialectRequest
from proxy.errors import BacktrackError, ClientError, PayloadTooLarge, TooManyRequests, UpstreamError
from proxy.guarded import GuardedResponse, Labels
from proxy.guards import CompositeGuard, Guard, MarkerGuard, PatternGuard
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.relay import Relay, error_response
from proxy.reload import POLICY_STORE, PolicyStore, admin_reload, watch_ctx
from proxy.selection import forwarded_headers
from proxy.shared import SHARED, fleet_reloads, shared_ctx
from proxy.upstream import Upstream, client_timeout, read_body

log = logging.getLogger("backtrack")

DEMO_CORPUS = Path(__file__).parent / "demo" / "corpus.jsonl"
DEMO_TOKENS_PER_SECOND = 40.0

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)
SCORER = web.AppKey("scorer", object)


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    # Shared state after the policies (it follows their reloads), before the file watcher.
    shared = functools.partial(shared_ctx, settings, app[METRICS])
    app.cleanup_ctx.extend([upstream_ctx, guard_ctx, shared, watch_ctx])
    app.on_cleanup.append(close_metrics)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/api/chat", ollama_chat)
    app.router.add_post("/api/generate", ollama_generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/reloads", fleet_reloads)
    return app


# -- resources ---------------------------------------------------------------------------------------


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    demo: web.AppRunner | None = None
    url = settings.upstream.url
    if url is None:
        demo, url = await start_demo_upstream()
        log.info("no upstream configured: serving the built-in demo upstream at %s", url)
    if settings.upstream.api_key_env and settings.upstream.key() is None:
        # Without this the client's own Authorization would go upstream, which the operator did not mean.
        log.warning(
            "upstream.api_key_env names %s, which is not set: clients' own keys are forwarded",
            settings.upstream.api_key_env,
        )
    # No pool limit: aiohttp's default of 100 connections would silently queue the 101st stream (with
    # no timeout) until one of the first hundred ended.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=client_timeout(settings.upstream),
        auto_decompress=True,
    )
    app[UPSTREAM] = Upstream(settings.upstream, url, session)
    try:
        yield
    finally:
        await session.close()
        if demo is not None:
            await demo.cleanup()


async def start_demo_upstream() -> tuple[web.AppRunner, str]:
    from proxy.replay import create_replay_app, load_rows

    runner = web.AppRunner(create_replay_app(load_rows(DEMO_CORPUS), DEMO_TOKENS_PER_SECOND))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def guard_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    scorer: Any = None
    if settings.needs_model:
        from guard.scorer import load_scorer

        scorer = await asyncio.to_thread(
            load_scorer,
            settings.guard_checkpoint,
            settings.guard.base,
            max_batch_tokens=settings.guard.max_batch_tokens,
            queue_size=settings.guard.queue_size,
        )
        scorer.on_batch = app[METRICS].guard_batch_size.observe
        await scorer.start()
        app[SCORER] = scorer
    app[POLICY_STORE] = PolicyStore(
        settings, functools.partial(build_guard, scorer=scorer), app[METRICS], model_loaded=scorer is not None
    )
    try:
        yield
    finally:
        if scorer is not None:
            await scorer.stop()


async def close_metrics(app: web.Application) -> None:
    app[METRICS].close()


def build_guard(policy: Policy, scorer: Any = None) -> Guard:
    """The detectors a policy enables, read side by side."""
    detectors = policy.detectors
    parts: list[Guard] = []
    if detectors.marker.enabled:
        parts.append(MarkerGuard(detectors.marker.token))
    if detectors.patterns:
        rules = [(rx, rule.category) for rule in detectors.patterns for rx in rule.regex]
        words = [(w, rule.category) for rule in detectors.patterns for w in rule.words]
        parts.append(PatternGuard(rules, words))
    if detectors.model.enabled:
        parts.append(scorer.guard(logit_bias=policy.logit_bias, threshold=policy.threshold))
    if not parts:
        parts.append(PatternGuard([]))  # no detector: text still flows through the hold-back
    return parts[0] if len(parts) == 1 else CompositeGuard(parts)


# -- errors ------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our errors are translated here, once, into the API's own error format."""
    try:
        return await handler(request)
    except BacktrackError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        response = error_response(exc, request.path)
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = ClientError(f"{exc.reason}: {request.method} {request.path}", status=exc.status)
        return error_response(error, request.path)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(BacktrackError("internal error in the proxy"), request.path)


# -- handlers ----------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await relay(request, functools.partial(openai.parse_request, chat=True))


async def completions(request: web.Request) -> web.StreamResponse:
    return await relay(request, functools.partial(openai.parse_request, chat=False))


async def messages(request: web.Request) -> web.StreamResponse:
    return await relay(request, anthropic.parse_request)


async def ollama_chat(request: web.Request) -> web.StreamResponse:
    return await relay(request, functools.partial(ollama.parse_request, chat=True))


async def ollama_generate(request: web.Request) -> web.StreamResponse:
    return await relay(request, functools.partial(ollama.parse_request, chat=False))


async def relay(request: web.Request, parse: Callable[[bytes], DialectRequest]) -> web.StreamResponse:
    """Guard one response in the dialect `parse` reads: the same loop for every route."""
    app = request.app
    live = app[POLICY_STORE].live  # read once: a reload mid-stream does not change this request's policy
    tenant = live.authenticate(request.headers)
    req = parse(await read_request(request))
    policy, guard = live.choose(tenant, req.model, request.path, request.headers)
    shared = app[SHARED]
    policy, guard = await shared.escalate(live, tenant, policy, guard)  # the tenant's strikes
    metrics = app[METRICS]
    route = request.path
    labels = Labels(policy.name, route, metrics.model_label(req.model))
    info = RequestInfo.of(request.headers, request.path, tenant, req.model, req.prompt)
    observe = shared.observer(live, policy, info)  # resets and flags: audit events, strikes
    guarded = GuardedResponse(policy, guard, req.prompt, metrics, labels, on_event=observe)
    headers = forwarded_headers(request.headers, tenant)
    relay = Relay(req, app[UPSTREAM], guarded, request.path, headers)
    metrics.streams.labels(labels.policy, route, labels.model).inc()
    active = metrics.active_streams.labels(route)
    active.inc()
    try:
        if req.stream:
            return await relay.stream(request)
        return await relay.complete()
    except ConnectionResetError:
        log.info("client went away mid-stream on %s; upstream request closed", route)
        return web.Response(status=499)
    except BacktrackError as exc:
        if exc.kind == "upstream_error":
            metrics.upstream_errors.labels(route, type(exc).__name__).inc()
        raise
    finally:
        active.dec()
        guarded.close()


async def read_request(request: web.Request) -> bytes:
    limit = request.app[SETTINGS].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.") from None


async def models(request: web.Request) -> web.Response:
    tenant = request.app[POLICY_STORE].live.authenticate(request.headers)
    headers = forwarded_headers(request.headers, tenant)
    async with request.app[UPSTREAM].request("GET", "/v1/models", headers) as up:
        body = await read_body(up, limit=4 * 1024 * 1024)
        try:
            json.loads(body)
        except ValueError:
            raise UpstreamError("upstream answered /v1/models with something that is not JSON") from None
        return web.Response(body=body, status=up.status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = POLICY_STORE in request.app and UPSTREAM in request.app
    body: dict[str, object] = {"status": "ready" if ready else "starting"}
    if SHARED in request.app:  # still ready without the store: the proxy serves through its outages
        body["shared_state"] = request.app[SHARED].status()
    return web.json_response(body, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
