"""What a client may hold: a header timeout on every connection, and a watch over every stream.

- `ProxyRunner` serves the app with `ProxyRequestHandler`, aiohttp's connection handler plus what it
  lacks: a client gets `server.header_timeout_seconds` to send a whole request head (slowloris), and a
  request the HTTP parser refuses gets a 400 in its route's API format that quotes nothing of the request
  (the parser's own message quotes the header it choked on, `Authorization` included); the log line
  names only the error's type.
- `StreamWatch` runs one stream's relay as a task and watches it from beside: the client leaving (seen on
  the transport, even while the upstream is silent), a client that stops reading (writes paused for
  `server.write_timeout_seconds`), the stream's length (`max_stream_bytes` upstream bytes) and age
  (`max_stream_seconds`), and the shutdown's grace period. A client gone raises `ClientGone`; the others
  raise `StreamCut`, which the relay sends in-band in the dialect's format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.core.config import ServerConfig
from proxy.core.errors import BacktrackError
from proxy.dialects import routes
from proxy.server.keys import SETTINGS

log = logging.getLogger("backtrack")
T = TypeVar("T")
REQUEST_LINE = re.compile(rb"^[A-Z]{1,16} (/[^ ?#\r\n]{0,512})")


class ClientGone(ConnectionResetError):
    """The client left, or stopped reading and was dropped (`reason`: "left" or "stalled")."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the client {'went away' if reason == 'left' else 'stopped reading'}")
        self.reason = reason


class StreamCut(BacktrackError):
    """A stream ran into one of the server's limits, or the shutdown: it ends with an in-band error."""

    status = 503

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "max_bytes", "max_duration" or "shutdown"


@dataclass
class Shutdown:
    """Set when the server starts to shut down: streams still running at `deadline` are ended in-band."""

    deadline: float | None = None  # time.monotonic()

    def begin(self, grace: float) -> None:
        self.deadline = time.monotonic() + grace


SHUTDOWN = web.AppKey("shutdown", Shutdown)


@dataclass
class StreamWatch:
    """One stream's watch: its limits, its start, and what it has received so far."""

    request: web.Request
    config: ServerConfig
    shutdown: Shutdown = field(default_factory=Shutdown)
    started: float = field(default_factory=time.monotonic)
    received: int = 0  # upstream bytes
    _paused_since: float | None = None
    _buffered: int = 0

    def count(self, data: bytes) -> None:
        """Upstream bytes read; past `max_stream_bytes` the stream is cut."""
        self.received += len(data)
        limit = self.config.max_stream_bytes
        if self.received > limit:
            message = f"The response was cut: it passed the proxy's limit of {limit} bytes."
            raise StreamCut(message, "max_bytes")

    def check(self) -> None:
        """Raise `ClientGone` or `StreamCut` when the stream must end now."""
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("left")
        now = time.monotonic()
        if self._stalled(now, transport):
            transport.abort()  # the writes still buffered would never be read
            raise ClientGone("stalled")
        limit = self.config.max_stream_seconds
        if now - self.started > limit:
            message = f"The response was cut: it passed the proxy's limit of {limit:g} s."
            raise StreamCut(message, "max_duration")
        if self.shutdown.deadline is not None and now >= self.shutdown.deadline:
            raise StreamCut("The proxy is shutting down; the response was cut.", "shutdown")

    def _stalled(self, now: float, transport: asyncio.BaseTransport) -> bool:
        """Writes have been paused, with nothing drained, for `write_timeout_seconds`."""
        if not self.request.protocol.writing_paused:  # the common case, checked for every chunk
            self._paused_since, self._buffered = None, 0
            return False
        # Asked of the object, not by isinstance: uvloop's transports do not subclass asyncio's.
        size = getattr(transport, "get_write_buffer_size", None)
        buffered = size() if size is not None else 0
        if buffered < self._buffered:
            self._paused_since, self._buffered = None, buffered
            return False
        self._buffered = buffered
        if self._paused_since is None:
            self._paused_since = now
        return now - self._paused_since > self.config.write_timeout_seconds

    def poll_seconds(self) -> float:
        c = self.config
        return max(0.01, min(0.25, c.write_timeout_seconds / 4, c.max_stream_seconds / 4))

    async def run(self, inner: Awaitable[T]) -> T:
        """Await `inner` as a task while checking the stream; a check that fails cancels it (which closes
        the upstream request) and raises."""
        task = asyncio.ensure_future(inner)
        poll = self.poll_seconds()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll)
                if done:
                    return task.result()
                self.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def write(self, response: web.StreamResponse, data: bytes) -> None:
        """A last write (the in-band error), bounded like every other: a stalled client is gone."""
        try:
            await asyncio.wait_for(response.write(data), self.config.write_timeout_seconds)
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ClientGone("stalled") from None


# -- the connection handler ---------------------------------------------------------------------------


PARSER_MESSAGES: dict[type[HttpProcessingError], str] = {
    LineTooLong: "The request line or a request header is too long.",
}
MALFORMED = "The request's head is malformed (its request line or its headers)."
TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler with a header timeout and parser errors that quote nothing."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_handle: asyncio.TimerHandle | None = None
        self._head = b""  # the start of the request being received: its path picks the error format

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._messages and not self._request_in_progress:
            if self._header_handle is None:  # the next request on a kept-alive connection has begun
                self._head = b""
                self._arm()
            self._head += data[: max(0, 1024 - len(self._head))]
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()  # a whole head came: the body and the handler have their own limits

    def _arm(self) -> None:
        if self._header_timeout > 0:
            self._header_handle = self._loop.call_later(self._header_timeout, self._header_timed_out)

    def _disarm(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_timed_out(self) -> None:
        self._header_handle = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        if not self._head:  # nothing sent yet on a kept-alive connection: its keep-alive timeout decides
            return
        message = "The request head did not arrive in time."
        error = routes.error_body(self._path(), message, status=408, kind="invalid_request_error")
        body = json.dumps(error).encode()
        log.info("closed a connection whose request head did not arrive within %gs", self._header_timeout)
        self.transport.write(TIMEOUT_ANSWER + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.force_close()

    def _path(self) -> str:
        match = REQUEST_LINE.match(self._head)
        return match.group(1).decode("ascii", "replace") if match else ""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """An error the HTTP layer answers itself, in the route's API format and with a quiet log."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: no error response can follow")
        path = self._path()
        self._head = b""
        if isinstance(exc, HttpProcessingError):
            # exc's message and repr quote the offending bytes: only the type is logged.
            log.info("refused a malformed request to %s: %s", path or "?", type(exc).__name__)
            text = PARSER_MESSAGES.get(type(exc), MALFORMED)
            status = status if 400 <= status < 500 else 400
            kind = "invalid_request_error"
        else:
            log.error("unhandled error in %s", path or "?", exc_info=exc)
            text, kind = "internal error in the proxy", "server_error"
        body = routes.error_body(path, text, status=status, kind=kind)
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp


class ProxyServer(web.Server):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """`web.AppRunner` with `ProxyRequestHandler` for every connection; timeouts from the app's settings."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        server = app[SETTINGS].server
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout_seconds)
        super().__init__(app, **kwargs)
        self._header_timeout = server.header_timeout_seconds

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return ProxyServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            header_timeout=self._header_timeout,
            **plain._kwargs,
        )
