"""The admin endpoints: `POST /admin/reload` and `GET /admin/reloads`, behind the admin token."""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from proxy.core.errors import ConfigError, Forbidden, Unauthorized
from proxy.server.keys import POLICIES, SHARED
from proxy.state.store import StoreUnavailable


def check_admin(request: web.Request) -> None:
    """401 without a bearer token, 403 with a wrong one (or when no admin token is configured)."""
    settings = request.app[POLICIES].settings
    expected = settings.admin_token
    if expected is None:
        raise Forbidden(f"The admin endpoints are off: set {settings.admin.token_env} to turn them on.")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("The admin endpoints need 'Authorization: Bearer TOKEN'.")
    # Constant time: how long the comparison takes says nothing about how much of the token was right.
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise Forbidden("The admin token is wrong.")


async def admin_reload(request: web.Request) -> web.Response:
    """`POST /admin/reload`: 200 with the new generation, or 422 with the errors (the old ones serve)."""
    check_admin(request)
    try:
        live = await request.app[POLICIES].reload("POST /admin/reload")
    except ConfigError as exc:
        raise ConfigError(exc.message, status=422) from None
    policies = sorted(live.policy_set.policies)
    return web.json_response({"result": "ok", "generation": live.generation, "policies": policies})


async def fleet_reloads(request: web.Request) -> web.Response:
    """`GET /admin/reloads`: every replica's latest reload result, by replica."""
    check_admin(request)
    shared = request.app[SHARED]
    try:
        reports = await shared.store.reload_reports()
    except StoreUnavailable as exc:
        shared.mark_down(str(exc))
        return web.json_response({"error": "the shared store is unavailable"}, status=503)
    replicas = {replica: json.loads(report) for replica, report in reports.items()}
    return web.json_response({"replica": shared.replica, "replicas": replicas})
