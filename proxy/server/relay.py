"""One guarded response in any dialect: the read-feed-write loop around a dialect's `Codec`.

Streaming: upstream bytes -> `Codec.feed` -> per-choice engines (via `GuardedResponse`) -> `Codec`'s
encoders -> client. Non-streaming: each choice's text is cut into token-sized pieces and run through the
same engine, so both paths make the same decisions. Errors before the client's headers are raised (the
server answers them in the route's own format); after, they travel in-band and the stream ends.

The client's own assistant prefill (`DialectRequest.prefill`) is fed to each choice's engine before
the upstream's text, marked `PREFILL`: the guard reads it as the start of the response, the client is
not sent it again, and a reset inside it drops everything held after it before anything is released.
Resets count it in `retract_chars` (it is part of the abandoned attempt the client displays).

`regenerate` and `inject` ask again for one choice at a time, with a one-answer request whose choice
stands in for it. With one choice that happens at once. With `n > 1` the other choices are still
streaming from the first request, so the choices to ask again for wait until it has ended (or has
nothing left for them), then are asked for in turn; the client's stream ends after the last.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import ClientResponse, web

from proxy.core.engine import Finish, Output, Piece, Regenerate, Release, ResetEvent, State
from proxy.core.errors import BacktrackError, UpstreamError
from proxy.core.policy import Action
from proxy.core.tokens import ApproxTokenizer
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
from proxy.server.choice import ChoiceRun, GuardedResponse
from proxy.server.upstream import Upstream, read_body, read_chunks

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
        self.response: web.StreamResponse | None = None  # once set, the client has the headers
        self.upstream_done = False  # the current upstream response has ended
        self.ended = False  # the client's stream has its end (or an in-band error)
        self.pending: list[int] = []  # choices waiting to be asked for again, in order
        self.target: int | None = None  # the choice a regeneration request answers (None: all of them)
        # Per choice: the current attempt's released pieces, prefill included (joined only for `inject`:
        # appending to one string per chunk would copy the whole answer every time).
        self.shown: dict[int, list[str]] = {}
        self.inject: dict[int, str] = {}  # per choice: the answer's start to ask again with (`inject`)

    def run(self, index: int) -> ChoiceRun:
        """The choice's run; a new one reads the client's prefill first."""
        fresh = index not in self.guarded.runs
        run = self.guarded.run(index)
        if fresh and self.prefill:
            # Nothing is judged yet, so feeding cannot release anything: the outputs are empty.
            run.engine.feed(Piece(self.prefill, PREFILL))
        return run

    def next_body(self, index: int) -> JSON:
        """The request that asks again for choice `index`: with the injected prefill where the dialect
        has one, else with the safety instruction."""
        prefix = self.inject.pop(index, None)
        body = self.req.inject_body(prefix) if prefix is not None else None
        if body is None:
            body = self.req.regenerate_body(self.guarded.policy.regenerate_instruction)
        return body

    def begin_again(self, index: int) -> ChoiceRun:
        """A regenerated answer for choice `index` starts: a new attempt, read afresh."""
        run = self.guarded.runs[index]
        if run.engine.state is State.REGENERATING:
            run.engine.begin_attempt()
            self.guarded.restart_guard(run)
        self.shown[index] = []
        return run

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
                    if self.target is not None:
                        self.begin_again(self.target)
                    await self._relay(request, self.response, up)
            except UpstreamError as exc:
                if self.response is None:
                    raise
                # A regeneration that cannot be had is refused; a stream that broke ends in-band.
                self._count_upstream_error(type(exc).__name__)
                unanswered = self.target is not None and self._state(self.target) is State.REGENERATING
                failed = self._give_up() if unanswered else self._abandon(exc.message, exc.kind)
                await self.response.write(failed)
            if not self.pending:
                break
            self.target = self.pending.pop(0)
            body = self.next_body(self.target)
        if not self.ended:
            await self.response.write(await self._end_all())
        return self.response

    async def _relay(self, request: web.Request, response: web.StreamResponse, up: ClientResponse) -> None:
        """One upstream response, until it ends or has nothing left for the choices it answers."""
        self.codec.begin_attempt()
        self.upstream_done = False
        async for data in read_chunks(up):
            # While text is held back nothing is written, and only a write notices a gone client.
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away")
            await response.write(await self._handle(self.codec.feed(data)))
            if self.upstream_done or self._waits_for_another():
                return
        await response.write(await self._handle(self.codec.flush()))

    def _waits_for_another(self) -> bool:
        """None of the choices this upstream response answers is still streaming, and one waits to be
        asked for again: reading on is of no use."""
        answered = range(self.req.n) if self.target is None else (self.target,)
        states = {self._state(i) for i in answered}
        return State.STREAMING not in states and State.REGENERATING in states

    def _state(self, index: int) -> State:
        run = self.guarded.runs.get(index)
        return State.STREAMING if run is None else run.engine.state  # a choice not seen yet is to come

    async def _handle(self, events: list[Event]) -> bytes:
        out = bytearray()
        touched: set[int] = set()
        for event in events:
            if isinstance(event, ChoicePiece | ChoiceFinish):
                # A regeneration's one choice stands in for the choice it was asked for.
                index = event.index if self.target is None else self.target
            if isinstance(event, ChoicePiece):
                run = self.run(index)
                piece = Piece(event.piece.text, event.piece.extra, time.monotonic())
                out += self._encode(index, run.engine.feed(piece))
                touched.add(index)
            elif isinstance(event, ChoiceFinish):
                run = self.run(index)
                run.upstream_reason, run.upstream_rest = event.reason, event.choice
                out += self._encode(index, await self.guarded.finish(run))
                touched.discard(index)
            elif isinstance(event, Usage | Passthrough):
                out += self.codec.passthrough(event)
            elif isinstance(event, UpstreamFailure):
                self._count_upstream_error("InBandError")
                message = str(event.error.get("message", "upstream error"))
                out += self._abandon(message, "upstream_error", event.error)
                return bytes(out)
            elif isinstance(event, Done):
                self.upstream_done = True
        for index in touched:
            out += self._encode(index, await self.guarded.score(self.guarded.run(index)))
        if self.upstream_done and not self.pending:
            out += await self._end_all()
        return bytes(out)

    async def _end_all(self) -> bytes:
        """Nothing more will come: finish every choice still open, then end the stream."""
        out = bytearray()
        for index, run in sorted(self.guarded.runs.items()):
            if run.engine.state is State.STREAMING:
                out += self._encode(index, await self.guarded.finish(run))
            elif run.engine.state is State.REGENERATING:
                out += self._encode(index, run.engine.give_up())
        out += self.codec.end()
        self.ended = True
        return bytes(out)

    def _give_up(self) -> bytes:
        """Asking again failed: every choice waiting for it is refused."""
        out = bytearray()
        self.pending.clear()
        for index, run in self.guarded.runs.items():
            out += self._encode(index, run.engine.give_up())
        return bytes(out)

    def _count_upstream_error(self, kind: str) -> None:
        """Failures after the headers never reach the server's error translation: count them here."""
        self.guarded.metrics.upstream_errors.labels(self.guarded.labels.route, kind).inc()

    def _abandon(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        """The upstream failed mid-stream: held text is dropped (unjudged), the client gets the error."""
        for run in self.guarded.runs.values():
            run.engine.state = State.DONE
        self.pending.clear()
        self.upstream_done = self.ended = True
        return self.codec.error(message, kind, upstream)

    def _encode(self, index: int, outputs: list[Output]) -> bytes:
        out = bytearray()
        run = self.guarded.runs[index]
        for o in outputs:
            if isinstance(o, Release):
                self.shown.setdefault(index, []).append(o.piece.text)
                if o.piece.extra is PREFILL:
                    continue  # the client wrote it
                out += self.codec.piece(index, o.piece)
                self.guarded.observe_release(o.piece.received)
            elif isinstance(o, ResetEvent):
                out += self.codec.reset(index, o)
                if o.action is Action.INJECT:
                    self.inject[index] = "".join(self.shown.get(index, ())) + o.discarded + self.marker
                self.shown[index] = []
            elif isinstance(o, Finish):
                rest = run.upstream_rest if o.reason == run.upstream_reason else None
                out += self.codec.finish(index, o.reason, rest)
            elif isinstance(o, Regenerate):
                self.pending.append(index)
        return bytes(out)

    # -- non-streaming -------------------------------------------------------------------------------

    async def complete(self) -> web.Response:
        resets: list[JSON] = []
        answer = await self._fetch_answer(self.req.body)
        pending = []
        for index, text, reason in self.req.answer_choices(answer):
            if await self._judge_choice(answer, index, text, reason, resets, keep_untouched=True):
                pending.append(index)
        while pending:
            index = pending.pop(0)
            try:
                fresh = await self._fetch_answer(self.next_body(index))
                choices = self.req.answer_choices(fresh)
                if not choices:
                    raise UpstreamError("upstream answered with no choice")
            except UpstreamError:  # the regeneration cannot be had: refused
                text, reason, _ = self._collect(self.guarded.runs[index].engine.give_up(), resets, index)
                self.req.set_answer_choice(answer, index, text, reason)
                continue
            _, text, reason = choices[0]
            if self.req.n == 1:
                answer = fresh  # the one answer given: its envelope (id, usage) is the right one
            self.begin_again(index)
            if await self._judge_choice(answer, index, text, reason, resets, keep_untouched=self.req.n == 1):
                pending.append(index)
        if resets:
            answer["backtrack"] = backtrack_summary(resets)
        return web.json_response(answer, headers={"X-Backtrack-Policy": self.guarded.policy.name})

    async def _judge_choice(
        self, answer: JSON, index: int, text: str, reason: str | None, resets: list[JSON], *,
        keep_untouched: bool,
    ) -> bool:  # fmt: skip
        """Judge one choice's whole text and write the verdict into `answer`; whether to ask again.

        `keep_untouched`: the choice in `answer` is this text, and stays as it came when nothing changed
        (a null content stays null); otherwise the text is always written."""
        run = self.run(index)
        if run.done:
            return False
        run.upstream_reason = reason
        outputs: list[Output] = []
        for piece in ApproxTokenizer().split(text):
            outputs += run.engine.feed(Piece(piece))
        outputs += await self.guarded.finish(run)
        kept, finish, regen = self._collect(outputs, resets, index)
        if not regen:
            unchanged = keep_untouched and kept == text
            self.req.set_answer_choice(answer, index, None if unchanged else kept, finish)
        return regen

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
                    self.inject[index] = text[kept:] + o.discarded + self.marker
                text = text[:kept]
                prefill = min(prefill, kept)
                # The client of a non-streamed answer never saw the retracted text: nothing to mend.
                resets.append({**reset_object(o), "retract_chars": 0, "index": index})
            elif isinstance(o, Finish):
                reason = o.reason
            elif isinstance(o, Regenerate):
                regen = True
        return text[prefill:], reason, regen
