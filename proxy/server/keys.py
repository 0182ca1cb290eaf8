"""Every `AppKey` of the proxy's application, in one place: what lives on the app, and its type.

Each is set by one `cleanup_ctx` in `proxy.server.app` and read by the handlers.
"""

from __future__ import annotations

from aiohttp import web

from proxy.core.config import Settings
from proxy.server.upstream import Upstream
from proxy.state.metrics import Metrics
from proxy.state.policies import PolicyRegistry
from proxy.state.shared import Shared

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)  # set by upstream_ctx
POLICIES = web.AppKey("policies", PolicyRegistry)  # set by model_ctx, once the guard model is loaded
SHARED = web.AppKey("shared", Shared)  # set by shared_ctx
