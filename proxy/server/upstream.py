"""The upstream LLM server: one aiohttp client session, requests forwarded under the configured root.

The upstream always comes from configuration, never from the request. Library errors are translated
here, once, into `UpstreamError`/`UpstreamTimeout`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from proxy.core.config import UpstreamConfig
from proxy.core.errors import UpstreamError, UpstreamTimeout

# Client headers worth forwarding; hop-by-hop headers and the client's Host/Content-Length are not.
FORWARDED_HEADERS = (
    "authorization", "x-api-key", "anthropic-version", "anthropic-beta",
    "openai-organization", "openai-project", "user-agent",
)  # fmt: skip


# A response read to its dialect's end usually has only the body's terminator left; it is read in the
# background, at most this long and this much, so that its connection goes back to the pool.
READ_OUT_SECONDS = 2.0
READ_OUT_BYTES = 64 * 1024


class Upstream:
    def __init__(self, config: UpstreamConfig, url: str, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.url = url.rstrip("/")
        self.session = session
        self._read_out: set[aiohttp.ClientResponse] = set()  # handed over by `read_out`, not closed
        self._reading: set[asyncio.Task[None]] = set()

    def headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        out = {k: v for k, v in client_headers.items() if k.lower() in FORWARDED_HEADERS}
        key = self.config.key()
        if key is not None:
            for name in [k for k in out if k.lower() in ("authorization", "x-api-key")]:
                del out[name]
            out["Authorization"] = f"Bearer {key}"
        return out

    @asynccontextmanager
    async def request(
        self, method: str, path: str, headers: Mapping[str, str], body: Any = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open a request; the response is closed (and the upstream told) when the block exits."""
        data = None if body is None else json.dumps(body).encode()
        send_headers = dict(self.headers(headers))
        if data is not None:
            send_headers["Content-Type"] = "application/json"
        try:
            resp = await self.session.request(method, self.url + path, data=data, headers=send_headers)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout(
                f"upstream did not accept a connection within {self.config.connect_timeout_seconds}s"
            ) from None
        except TimeoutError:  # the headers did not come within the read timeout
            raise UpstreamTimeout(
                f"upstream did not answer within {self.config.read_timeout_seconds}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        try:
            yield resp
        finally:
            if resp in self._read_out:
                self._read_out.discard(resp)
                self._read_rest(resp)
            else:
                # close(), not release(): an unread body means the client left; the upstream must see it.
                resp.close()

    def read_out(self, resp: aiohttp.ClientResponse) -> None:
        """The relay has all it needs of `resp` (the stream's end came): rather than close it when its
        block exits, read the rest (the body's terminator) so that the connection is kept for the next
        request, which then skips a connect (and, for https, a TLS handshake)."""
        self._read_out.add(resp)

    def _read_rest(self, resp: aiohttp.ClientResponse) -> None:
        if resp.content.at_eof():
            resp.close()  # the connection went back to the pool when the body ended: nothing to close
            return
        task = asyncio.create_task(_drain(resp), name="upstream-read-out")
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def close(self) -> None:
        """Stop reading out responses (their connections are closed), before the session closes."""
        for task in list(self._reading):
            task.cancel()
        await asyncio.gather(*self._reading, return_exceptions=True)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read `resp` to its end, within bounds; at the end the connection is back in the pool, else
    (too slow, too much, broken) it is closed as before."""
    try:
        async with asyncio.timeout(READ_OUT_SECONDS):
            size = 0
            while size <= READ_OUT_BYTES and (data := await resp.content.readany()):
                size += len(data)
    except (TimeoutError, aiohttp.ClientError, asyncio.IncompleteReadError):
        pass
    except RuntimeError as exc:  # aiohttp's "Connection closed." (see `read_chunks`)
        if str(exc) != "Connection closed.":
            raise
    finally:
        resp.close()


async def read_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body as it arrives, with transport failures translated."""
    try:
        async for data in resp.content.iter_any():
            yield data
    except TimeoutError:
        raise UpstreamTimeout("upstream stopped sending (read timeout)") from None
    except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
        raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from None
    except RuntimeError as exc:
        # aiohttp's StreamReader says this, as a bare RuntimeError, when the connection is already gone.
        if str(exc) != "Connection closed.":
            raise
        raise UpstreamError("upstream stream broke: connection closed") from None


async def read_body(resp: aiohttp.ClientResponse, limit: int = 64 * 1024 * 1024) -> bytes:
    chunks = []
    size = 0
    async for data in read_chunks(resp):
        size += len(data)
        if size > limit:
            raise UpstreamError("upstream response is too large")
        chunks.append(data)
    return b"".join(chunks)


def client_timeout(config: UpstreamConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, sock_connect=config.connect_timeout_seconds, sock_read=config.read_timeout_seconds
    )
