"""One guarded response in any dialect: the read-feed-write loop around a dialect's `Codec`.

Streaming: upstream bytes -> `Codec.feed` -> per-choice engines (via `GuardedResponse`) -> `Codec`'s
encoders -> client. Non-streaming: each choice's text is cut into token-sized pieces and run through the
same engine, so both paths make the same decisions. Errors before the client's headers are raised (the
server answers them in the route's own format); after, they travel in-band and the stream ends.

The client's own assistant prefill (`DialectRequest.prefill`) is fed to each choice's engine before
the upstream's text, marked `PREFILL`: the guard reads it as the start of the response, the client is
not sent it again, and a reset inside it drops everything held after it before anything is released.
Resets count it in `retract_chars` (it is part of the abandoned attempt the client displays).

`regenerate` and `inject` ask the upstream again only for single-choice requests: with `n > 1` the
other choices are still streaming from the first request, and one client stream cannot be fed from two
upstream streams without reordering; such a choice is refused instead.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import ClientResponse, web

from proxy.dialects import anthropic, ollama
from proxy.dialects import openai as openai_dialect
from proxy.dialects.base import (
    JSON,
    PREFILL,
    ChoiceFinish,
    ChoicePiece,
    DialectRequest,
    Done,
    Event,
    Passthrough,
    UpstreamFailure,
    Usage,
    backtrack_summary,
    reset_object,
)
from proxy.engine import Finish, Output, Piece, Regenerate, Release, ResetEvent, State
from proxy.errors import BacktrackError, UpstreamError
from proxy.guarded import ChoiceRun, GuardedResponse
from proxy.policy import Action
from proxy.tokens import ApproxTokenizer
from proxy.upstream import Upstream, read_body, read_chunks

log = logging.getLogger("backtrack")
STREAM_NAMES = {"text/event-stream": "an event stream", "application/x-ndjson": "an NDJSON stream"}


async def expect_stream(resp: ClientResponse, media_type: str) -> None:
    """Raise unless the upstream answered a streaming request with 200 and the dialect's stream."""
    if resp.status != 200:
        raise await upstream_error(resp)
    if "Content-Type" in resp.headers and resp.content_type != media_type:
        kind = STREAM_NAMES.get(media_type, media_type)
        raise UpstreamError(f"upstream did not answer with {kind} but with {resp.content_type}")


async def upstream_error(resp: Any) -> BacktrackError:
    """An upstream's non-200 answer as our error: 4xx pass through, 5xx become 502.

    The message is read from any dialect's error body: `{"error": {"message"}}` (OpenAI, and
    Anthropic's `{"type": "error", "error": {...}}`) or `{"error": "..."}` (Ollama).
    """
    try:
        raw = await read_body(resp, limit=1024 * 1024)
        detail = json.loads(raw).get("error", {})
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError, UpstreamError):
        message = None
    message = message or f"upstream answered HTTP {resp.status}"
    if 400 <= resp.status < 500:
        return UpstreamError(message, status=resp.status)
    return UpstreamError(f"upstream answered HTTP {resp.status}: {message}")


def error_body(path: str, error: BacktrackError) -> JSON:
    """`error` in the format of the API that `path` belongs to."""
    if path == "/v1/messages":
        return anthropic.error_object(error.message, error.status)
    if path.startswith("/api/"):
        return ollama.error_object(error.message, error.status)
    return openai_dialect.error_object(error.message, error.kind)


def error_response(error: BacktrackError, path: str = "", policy: str | None = None) -> web.Response:
    headers = {"X-Backtrack-Policy": policy} if policy else None
    return web.json_response(error_body(path, error), status=error.status, headers=headers)


def stream_headers(media_type: str, policy: str) -> dict[str, str]:
    return {
        "Content-Type": media_type,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "X-Backtrack-Policy": policy,
    }


class Relay:
    def __init__(
        self, req: DialectRequest, upstream: Upstream, guarded: GuardedResponse, path: str,
        headers: dict[str, str],
    ) -> None:  # fmt: skip
        self.req = req
        self.upstream = upstream
        self.guarded = guarded
        self.path = path
        self.headers = headers
        self.codec = req.codec()
        policy = guarded.policy
        self.prefill = req.prefill if policy.score_prefill else ""
        self.marker = policy.detectors.marker.token
        self.regenerate = False
        self.upstream_done = False
        self.response: web.StreamResponse | None = None  # once set, the client has the headers
        self.shown: dict[int, str] = {}  # per choice: the current attempt's released text, prefill included
        self.inject: str | None = None  # the answer's start to ask again with, after an `inject` reset

    def run(self, index: int) -> ChoiceRun:
        """The choice's run; a new one reads the client's prefill first."""
        fresh = index not in self.guarded.runs
        run = self.guarded.run(index)
        if fresh and self.prefill:
            # Nothing is judged yet, so feeding cannot release anything: the outputs are empty.
            run.engine.feed(Piece(self.prefill, PREFILL))
        return run

    def next_body(self) -> JSON:
        """The request that asks again: with the injected prefill where the dialect has one."""
        body = self.req.inject_body(self.inject) if self.inject is not None else None
        self.inject = None
        return (
            body if body is not None else self.req.regenerate_body(self.guarded.policy.regenerate_instruction)
        )

    # -- streaming -----------------------------------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._stream(request)
        except ConnectionResetError:
            raise
        except Exception as exc:
            if self.response is None:
                raise  # no headers yet: the server answers with an error response
            # An error response now would land inside the stream: end it in-band instead.
            if isinstance(exc, BacktrackError):
                message, kind = exc.message, exc.kind
            else:
                log.exception("error mid-stream on %s", self.path)
                message, kind = "internal error in the proxy", "server_error"
            await self.response.write(self._abandon(message, kind))
            return self.response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        body = self.req.body
        if self.prefill:
            for index in range(self.req.n):
                self.run(index)  # judged even if the upstream says nothing
        while True:
            try:
                async with self.upstream.request("POST", self.path, self.headers, body) as up:
                    await expect_stream(up, self.codec.media_type)
                    if self.response is None:
                        headers = stream_headers(self.codec.media_type, self.guarded.policy.name)
                        self.response = web.StreamResponse(headers=headers)
                        await self.response.prepare(request)
                    else:
                        self._begin_regenerated()
                    await self._relay(request, self.response, up)
            except UpstreamError as exc:
                if self.response is None:
                    raise
                # A regeneration that cannot be had is refused; a stream that broke ends in-band.
                regenerating = any(
                    run.engine.state is State.REGENERATING for run in self.guarded.runs.values()
                )
                await self.response.write(
                    self._give_up() if regenerating else self._abandon(exc.message, exc.kind)
                )
            if not self.regenerate:
                break
            body = self.next_body()
        if not self.upstream_done or any(not run.done for run in self.guarded.runs.values()):
            await self.response.write(await self._end_all())
        return self.response

    async def _relay(self, request: web.Request, response: web.StreamResponse, up: ClientResponse) -> None:
        """One upstream attempt, until it ends or the engine asks for a regeneration."""
        self.codec.begin_attempt()
        self.regenerate = self.upstream_done = False
        async for data in read_chunks(up):
            # While text is held back nothing is written, and only a write notices a gone client.
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away")
            await response.write(await self._handle(self.codec.feed(data)))
            if self.regenerate or self.upstream_done:
                return
        await response.write(await self._handle(self.codec.flush()))

    def _begin_regenerated(self) -> None:
        """The upstream answered the regeneration request: its stream is a new attempt, read afresh."""
        for index, run in self.guarded.runs.items():
            if run.engine.state is State.REGENERATING:
                run.engine.begin_attempt()
                self.guarded.restart_guard(run)
                self.shown[index] = ""

    async def _handle(self, events: list[Event]) -> bytes:
        out = bytearray()
        touched: set[int] = set()
        for event in events:
            if isinstance(event, ChoicePiece):
                run = self.run(event.index)
                piece = Piece(event.piece.text, event.piece.extra, time.monotonic())
                out += self._encode(event.index, run.engine.feed(piece))
                touched.add(event.index)
            elif isinstance(event, ChoiceFinish):
                run = self.run(event.index)
                run.upstream_reason, run.upstream_rest = event.reason, event.choice
                out += self._encode(event.index, await self.guarded.finish(run))
                touched.discard(event.index)
            elif isinstance(event, Usage | Passthrough):
                out += self.codec.passthrough(event)
            elif isinstance(event, UpstreamFailure):
                message = str(event.error.get("message", "upstream error"))
                out += self._abandon(message, "upstream_error", event.error)
                return bytes(out)
            elif isinstance(event, Done):
                self.upstream_done = True
        for index in touched:
            out += self._encode(index, await self.guarded.score(self.guarded.run(index)))
        if self.upstream_done and not self.regenerate:
            out += await self._end_all()
        return bytes(out)

    async def _end_all(self) -> bytes:
        """The upstream is done: finish every choice still open, then end the stream."""
        out = bytearray()
        for index, run in sorted(self.guarded.runs.items()):
            if run.engine.state is State.STREAMING:
                out += self._encode(index, await self.guarded.finish(run))
            elif run.engine.state is State.REGENERATING:
                out += self._encode(index, run.engine.give_up())
        out += self.codec.end()
        self.upstream_done = True
        return bytes(out)

    def _give_up(self) -> bytes:
        out = bytearray()
        for index, run in self.guarded.runs.items():
            out += self._encode(index, run.engine.give_up())
        self.regenerate = False
        return bytes(out)

    def _abandon(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        """The upstream failed mid-stream: held text is dropped (unjudged), the client gets the error."""
        for run in self.guarded.runs.values():
            run.engine.state = State.DONE
        self.upstream_done = True
        self.regenerate = False
        return self.codec.error(message, kind, upstream)

    def _encode(self, index: int, outputs: list[Output]) -> bytes:
        out = bytearray()
        run = self.guarded.runs[index]
        for o in outputs:
            if isinstance(o, Release):
                self.shown[index] = self.shown.get(index, "") + o.piece.text
                if o.piece.extra is PREFILL:
                    continue  # the client wrote it
                out += self.codec.piece(index, o.piece)
                self.guarded.observe_release(o.piece.received)
            elif isinstance(o, ResetEvent):
                out += self.codec.reset(index, o)
                if o.action is Action.INJECT:
                    self.inject = self.shown.get(index, "") + o.discarded + self.marker
                self.shown[index] = ""
            elif isinstance(o, Finish):
                rest = run.upstream_rest if o.reason == run.upstream_reason else None
                out += self.codec.finish(index, o.reason, rest)
            elif isinstance(o, Regenerate):
                if self.req.n == 1:
                    self.regenerate = True
                else:
                    out += self._encode(index, run.engine.give_up())
        return bytes(out)

    # -- non-streaming -------------------------------------------------------------------------------

    async def complete(self) -> web.Response:
        body = self.req.body
        resets: list[JSON] = []
        answer: JSON | None = None
        while True:
            try:
                fresh = await self._fetch_answer(body)
            except UpstreamError:
                if answer is None:
                    raise
                self._refuse_regenerating(answer, resets)  # the regeneration cannot be had
                break
            answer = fresh
            regenerate = False
            for index, text, reason in self.req.answer_choices(answer):
                run = self.run(index)
                if run.done:
                    continue
                if run.engine.state is State.REGENERATING:
                    run.engine.begin_attempt()
                    self.guarded.restart_guard(run)
                outputs = await self._judge_whole(run, text, reason)
                kept, finish, regen = self._collect(outputs, resets, index)
                if regen and self.req.n == 1:
                    regenerate = True
                    continue
                if regen:
                    kept, finish, _ = self._collect(run.engine.give_up(), resets, index)
                self.req.set_answer_choice(answer, index, None if kept == text else kept, finish)
            if not regenerate:
                break
            body = self.next_body()
        if resets:
            answer["backtrack"] = backtrack_summary(resets)
        return web.json_response(answer, headers={"X-Backtrack-Policy": self.guarded.policy.name})

    async def _fetch_answer(self, body: JSON) -> JSON:
        async with self.upstream.request("POST", self.path, self.headers, body) as up:
            if up.status != 200:
                raise await upstream_error(up)
            raw = await read_body(up)
        try:
            answer = json.loads(raw)
            self.req.answer_choices(answer)
        except ValueError:
            raise UpstreamError("upstream sent a malformed response") from None
        return answer  # type: ignore[no-any-return]  # answer_choices vouched for its shape

    def _refuse_regenerating(self, answer: JSON, resets: list[JSON]) -> None:
        """Choices waiting for a regeneration that failed get the refusal instead."""
        for index, _, _ in self.req.answer_choices(answer):
            run = self.guarded.runs.get(index)
            if run is not None and run.engine.state is State.REGENERATING:
                text, reason, _ = self._collect(run.engine.give_up(), resets, index)
                self.req.set_answer_choice(answer, index, text, reason)

    async def _judge_whole(self, run: ChoiceRun, text: str, reason: str | None) -> list[Output]:
        run.upstream_reason = reason
        outputs: list[Output] = []
        for piece in ApproxTokenizer().split(text):
            outputs += run.engine.feed(Piece(piece))
        return outputs + await self.guarded.finish(run)

    def _collect(self, outputs: list[Output], resets: list[JSON], index: int) -> tuple[str, str | None, bool]:
        """Released text (the prefill left out), finish reason and whether to ask again."""
        text = ""  # what a streaming client would have been shown, its prefill included
        prefill = 0  # how much of `text` is the prefill
        reason: str | None = None
        regen = False
        for o in outputs:
            if isinstance(o, Release):
                text += o.piece.text
                prefill += len(o.piece.text) if o.piece.extra is PREFILL else 0
            elif isinstance(o, ResetEvent):
                kept = len(text) - o.retract_chars
                if o.action is Action.INJECT:
                    self.inject = text[kept:] + o.discarded + self.marker
                text = text[:kept]
                prefill = min(prefill, kept)
                # The client of a non-streamed answer never saw the retracted text: nothing to mend.
                resets.append({**reset_object(o), "retract_chars": 0, "index": index})
            elif isinstance(o, Finish):
                reason = o.reason
            elif isinstance(o, Regenerate):
                regen = True
        return text[prefill:], reason, regen
