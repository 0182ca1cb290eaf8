"""The aiohttp application: `create_app(settings)` builds everything; the handlers stay thin.

Resources live under the typed `AppKey`s of `proxy.server.keys`, each set up and torn down by its own
`cleanup_ctx` generator, in this order: the upstream client session (and the built-in demo upstream when
no upstream is configured), the guard model (only when a policy enables it) with the live policies and
their guards (`proxy.state.policies`), the shared state (`proxy.state.shared`), and the file watcher.
A reload swaps the live policies while streams in flight keep the policy they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.core.config import Settings
from proxy.core.detectors import CompositeGuard, Guard, MarkerGuard, PatternGuard
from proxy.core.policy import Policy
from proxy.dialects.routes import ROUTES
from proxy.server import admin, handlers
from proxy.server.cascade import CascadeGuard
from proxy.server.judges import Judges
from proxy.server.keys import METRICS, POLICIES, SETTINGS, SHARED, UPSTREAM
from proxy.server.limits import SHUTDOWN, ProxyRunner, Shutdown
from proxy.server.playground import Playground
from proxy.server.reload import watch_ctx
from proxy.server.upstream import Upstream, client_timeout
from proxy.state.metrics import Metrics, StoreMetrics
from proxy.state.policies import PolicyRegistry
from proxy.state.shared import CLOSE_FLUSH_TIMEOUT, Shared
from proxy.state.store import open_store

__all__ = ["ProxyRunner", "create_app"]

log = logging.getLogger("backtrack")

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "replay" / "demo" / "corpus.jsonl"
DEMO_TOKENS_PER_SECOND = 40.0


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(
        client_max_size=settings.server.max_body_bytes, middlewares=[handlers.error_middleware]
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[METRICS].init_routes(ROUTES)
    app[SHUTDOWN] = Shutdown()
    app.on_shutdown.append(begin_shutdown)
    # Shared state after the policies (it follows their reloads), before the file watcher.
    shared = functools.partial(shared_ctx, settings, app[METRICS])
    app.cleanup_ctx.extend([upstream_ctx, model_ctx, shared, watch_ctx])
    app.on_cleanup.append(close_metrics)
    # The playground's routes and debug token exist only when it is enabled (`server.playground`).
    playground = Playground() if settings.server.playground else None
    for route in ROUTES.values():
        app.router.add_post(route.path, functools.partial(handlers.relay, route=route, playground=playground))
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics_handler)
    app.router.add_post("/admin/reload", admin.admin_reload)
    app.router.add_get("/admin/reloads", admin.fleet_reloads)
    if playground is not None:
        playground.add_routes(app)
    return app


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
        await app[UPSTREAM].close()
        await session.close()
        if demo is not None:
            await demo.cleanup()


async def start_demo_upstream() -> tuple[web.AppRunner, str]:
    from proxy.replay.app import create_replay_app, load_rows

    runner = web.AppRunner(create_replay_app(load_rows(DEMO_CORPUS), DEMO_TOKENS_PER_SECOND))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def model_ctx(app: web.Application) -> AsyncIterator[None]:
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
            threads=settings.guard.threads,
            precision=settings.guard.precision,
        )
        scorer.on_batch = app[METRICS].guard_batch_size.observe
        await scorer.start()
    judges = Judges(app[METRICS])
    build = functools.partial(build_guard, scorer=scorer, judges=judges)
    app[POLICIES] = PolicyRegistry(settings, build, app[METRICS], model_loaded=scorer is not None)
    metrics = app[METRICS]
    metrics.init_policies(settings.policies)
    # Policies a reload adds get their series too.
    app[POLICIES].listeners.append(lambda _, live, __: metrics.init_policies(live.policy_set.policies))
    try:
        yield
    finally:
        await judges.close()
        if scorer is not None:
            await scorer.stop()


async def begin_shutdown(app: web.Application) -> None:
    """The server stops: streams still running after the grace period end in-band (`StreamWatch`)."""
    app[SHUTDOWN].begin(app[SETTINGS].server.shutdown_grace_seconds)


async def close_metrics(app: web.Application) -> None:
    app[METRICS].close()


def build_guard(policy: Policy, scorer: Any = None, judges: Judges | None = None) -> Guard:
    """The detectors a policy enables, read side by side; a cascade's two stages as one of them."""
    detectors = policy.detectors
    named: dict[str, Guard] = {}
    if detectors.marker.enabled:
        named["marker"] = MarkerGuard(detectors.marker.token)
    if detectors.patterns:
        rules = [(rx, rule.category) for rule in detectors.patterns for rx in rule.regex]
        words = [(w, rule.category) for rule in detectors.patterns for w in rule.words]
        named["patterns"] = PatternGuard(rules, words)
    if detectors.model.enabled:
        named["model"] = scorer.guard(logit_bias=policy.logit_bias, threshold=policy.threshold)
    if detectors.remote or policy.cascade is not None:
        if judges is None:
            raise ValueError("remote detectors and cascades need the app's `Judges`")
        for remote in detectors.remote:
            named[remote.name] = judges.remote(remote, policy)
        if policy.cascade is not None:
            trigger, verifier = named.pop(policy.cascade.trigger), named.pop(policy.cascade.verifier)
            named["cascade"] = CascadeGuard(trigger, verifier, policy, judges.metrics, judges.judge_metrics)
    parts = list(named.values())
    if not parts:
        parts.append(PatternGuard([]))  # no detector: text still flows through the hold-back
    return parts[0] if len(parts) == 1 else CompositeGuard(parts)


async def shared_ctx(settings: Settings, metrics: Metrics, app: web.Application) -> AsyncIterator[None]:
    """Open the store and run its tasks; on the way out, flush what the spool still holds.

    Bind `settings` and `metrics` with `functools.partial`; it runs after the policies are loaded.
    """
    config = settings.file.redis
    store = open_store(settings.redis_url, prefix=config.prefix, audit_maxlen=config.audit_maxlen)
    policies = app[POLICIES]
    shared = Shared(store, StoreMetrics(metrics.registry), policies, config)
    await shared.check()  # an outage at start is tolerated: the proxy serves, the spool waits
    await shared.skip_past_reloads()
    policies.listeners.append(shared.on_reload)
    app[SHARED] = shared
    tasks = [
        asyncio.create_task(shared.health(), name="store-health"),
        asyncio.create_task(shared.audit.run(), name="audit-spool"),
        asyncio.create_task(shared.listen(), name="fleet-reload"),
    ]
    try:
        yield
    finally:
        policies.listeners.remove(shared.on_reload)
        shared.closing = True
        shared.audit.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await shared.settle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.audit.flush(), CLOSE_FLUSH_TIMEOUT)
        if shared.audit.spool:
            log.error("%d audit events could not be written before shutdown", len(shared.audit.spool))
        await store.close()
