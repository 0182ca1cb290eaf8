"""The proxy's request handlers: the guarded routes, /v1/models, health, metrics, and error translation.

Handlers stay thin: choose the route's dialect and the request's policy, then hand over to the relay.
Our errors are translated once, in `error_middleware`, into the format of the route's API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.core.errors import BacktrackError, ClientError, PayloadTooLarge, TooManyRequests, UpstreamError
from proxy.core.selection import forwarded_headers
from proxy.dialects import routes
from proxy.dialects.base import JSON, DialectRequest
from proxy.dialects.routes import Route
from proxy.server.choice import GuardedResponse, Labels
from proxy.server.keys import METRICS, POLICIES, SETTINGS, SHARED, UPSTREAM
from proxy.server.limits import SHUTDOWN, ClientGone, StreamWatch
from proxy.server.playground import Playground
from proxy.server.relay import Relay
from proxy.server.upstream import read_body
from proxy.state.audit import RequestInfo

log = logging.getLogger("backtrack")


def error_body(path: str, error: BacktrackError) -> JSON:
    """`error` in the format of the API that `path` belongs to."""
    return routes.error_body(path, error.message, status=error.status, kind=error.kind)


def error_response(error: BacktrackError, path: str = "", policy: str | None = None) -> web.Response:
    headers = {"X-Backtrack-Policy": policy} if policy else None
    return web.json_response(error_body(path, error), status=error.status, headers=headers)


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
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(BacktrackError("internal error in the proxy"), request.path)


async def relay(
    request: web.Request, route: Route, playground: Playground | None = None
) -> web.StreamResponse:
    """Guard one response on one of the routes of `proxy.dialects.routes`: the same loop for each.

    `playground` (bound when it is enabled) gives a request with its debug token the debug channel."""
    app = request.app
    live = app[POLICIES].live  # read once: a reload mid-stream does not change this request's policy
    tenant = live.authenticate(request.headers)
    req = parse_request(route, await read_request(request))
    policy, guard = live.choose(tenant, req.model, request.path, request.headers)
    shared = app[SHARED]
    policy, guard = await shared.escalate(live, tenant, policy, guard)  # the tenant's strikes
    metrics = app[METRICS]
    path = request.path
    labels = Labels(policy.name, path, metrics.model_label(req.model))
    info = RequestInfo.of(request.headers, request.path, tenant, req.model, req.prompt)
    observe = shared.observer(live, policy, info)  # resets and flags: audit events, strikes
    tap = playground.tap(request, req, policy) if playground is not None else None
    guarded = GuardedResponse(policy, guard, req.prompt, metrics, labels, on_event=observe, tap=tap)
    # The debug token is the proxy's own: `Upstream.headers` forwards only its allowlist, so it stays here.
    headers = forwarded_headers(request.headers, tenant)
    relay = Relay(req, app[UPSTREAM], guarded, request.path, headers)
    metrics.streams.labels(labels.policy, path, labels.model).inc()
    active = metrics.active_streams.labels(path)
    active.inc()
    try:
        if req.stream:
            watch = StreamWatch(request, app[SETTINGS].server, app[SHUTDOWN])
            return await relay.stream(request, watch)
        return await relay.complete()
    except ConnectionError as exc:
        # The upstream request is closed already (its block exited); nothing more is written.
        reason = exc.reason if isinstance(exc, ClientGone) else "left"
        metrics.client_disconnects.labels(path, reason).inc()
        log.info("client went away mid-stream on %s (%s); upstream request closed", path, reason)
        return relay.response or web.Response(status=499)
    except BacktrackError as exc:
        if exc.kind == "upstream_error":
            metrics.upstream_errors.labels(path, type(exc).__name__).inc()
        raise
    finally:
        active.dec()
        guarded.close()


def parse_request(route: Route, raw: bytes) -> DialectRequest:
    try:
        return route.parse(raw)
    except RecursionError:  # json's decoder gives up on deep nesting this way
        raise ClientError("The request body is nested too deeply.") from None


async def read_request(request: web.Request) -> bytes:
    server = request.app[SETTINGS].server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")
    try:
        async with asyncio.timeout(server.body_timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.") from None
    except TimeoutError:
        raise ClientError(
            f"The request body did not arrive within {server.body_timeout_seconds:g} s.", status=408
        ) from None
    except (HttpProcessingError, aiohttp.ClientPayloadError):
        # A broken Content-Encoding or chunking; the parser's message may quote the body: not repeated.
        raise ClientError("The request body could not be read (bad encoding or framing).") from None


async def models(request: web.Request) -> web.Response:
    tenant = request.app[POLICIES].live.authenticate(request.headers)
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
    ready = POLICIES in request.app and UPSTREAM in request.app
    body: dict[str, object] = {"status": "ready" if ready else "starting"}
    if SHARED in request.app:  # still ready without the store: the proxy serves through its outages
        body["shared_state"] = request.app[SHARED].status()
    return web.json_response(body, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
