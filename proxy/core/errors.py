"""Backtrack's error hierarchy. Each error carries the HTTP status the boundary answers with.

    BacktrackError            any failure Backtrack itself reports (500)
    ├── ConfigError           a config or policy file is invalid (at start or reload)
    ├── DataError             a data file (JSONL in the shared schema) has a bad line: file, line, field
    ├── ClientError           the client's request is wrong (400)
    │   ├── PayloadTooLarge   the body is over the size limit (413)
    │   ├── Unauthorized      a missing or unknown proxy key or admin token (401)
    │   ├── Forbidden         a known key asking for what it may not have (403)
    │   └── TooManyRequests   a tenant past its policy's strike limit (429, with Retry-After)
    ├── UpstreamError         the upstream is unreachable, timed out or answered badly (502)
    │   └── UpstreamTimeout   the upstream did not answer in time (504)
    └── GuardError            the guard could not score in time or failed; the policy's fail mode applies
        └── GuardOverloaded   the scorer's queue is full

(A verdict that does not arrive in time is the scorer call's own `TimeoutError`.)
Handlers raise these; `proxy.server.handlers` translates them once into the client's API error format.
"""

from __future__ import annotations


class BacktrackError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class ConfigError(BacktrackError):
    kind = "config_error"


class DataError(BacktrackError):
    kind = "data_error"


class ClientError(BacktrackError):
    status = 400
    kind = "invalid_request_error"


class PayloadTooLarge(ClientError):
    status = 413


class Unauthorized(ClientError):
    status = 401
    kind = "authentication_error"


class Forbidden(ClientError):
    status = 403
    kind = "permission_error"


class TooManyRequests(ClientError):
    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # whole seconds, for the Retry-After header


class UpstreamError(BacktrackError):
    status = 502
    kind = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504


class GuardError(BacktrackError):
    kind = "guard_error"


class GuardOverloaded(GuardError):
    status = 503
