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

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

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
    Codec,
    DialectRequest,
    Done,
    Event,
    Passthrough,
    UpstreamFailure,
    Usage,
    backtrack_summary,
    reset_object,
)
from proxy.server.choice import Choice, GuardedResponse
from proxy.server.limits import ClientGone, StreamCut, StreamWatch
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


class Sink(Protocol):
    """Where a choice's outputs go: the client's stream (the codec's encoders), or a whole answer."""

    def release(self, index: int, piece: Piece) -> bytes: ...

    def reset(self, index: int, event: ResetEvent) -> bytes: ...

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes: ...


class StreamSink:
    """Outputs as the client's stream, in the codec's wire format."""

    def __init__(self, codec: Codec, guarded: GuardedResponse) -> None:
        self.codec = codec
        self.guarded = guarded

    def release(self, index: int, piece: Piece) -> bytes:
        if piece.extra is PREFILL:
            return b""  # the client wrote it
        self.guarded.observe_release(piece.received)
        return self.codec.piece(index, piece)

    def reset(self, index: int, event: ResetEvent) -> bytes:
        return self.codec.reset(index, event)

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        return self.codec.finish(index, reason, rest)


@dataclass
class Answer:
    """One choice of a non-streamed answer, as the outputs leave it."""

    text: str = ""  # what a streaming client would have been shown, its prefill included
    prefill: int = 0  # how much of `text` is the prefill
    reason: str | None = None
    finished: bool = False


class AnswerSink:
    """Outputs collected into whole choices, for a non-streamed answer."""

    def __init__(self) -> None:
        self.answers: dict[int, Answer] = {}
        self.resets: list[JSON] = []

    def answer(self, index: int) -> Answer:
        return self.answers.setdefault(index, Answer())

    def release(self, index: int, piece: Piece) -> bytes:
        answer = self.answer(index)
        answer.text += piece.text
        answer.prefill += len(piece.text) if piece.extra is PREFILL else 0
        return b""

    def reset(self, index: int, event: ResetEvent) -> bytes:
        answer = self.answer(index)
        kept = len(answer.text) - event.retract_chars
        answer.text = answer.text[:kept]
        answer.prefill = min(answer.prefill, kept)
        # The client of a non-streamed answer never saw the retracted text: nothing to mend.
        self.resets.append({**reset_object(event), "retract_chars": 0, "index": index})
        return b""

    def finish(self, index: int, reason: str | None, rest: JSON | None) -> bytes:
        answer = self.answer(index)
        answer.reason, answer.finished = reason, True
        return b""

    def take(self, index: int) -> Answer:
        """The choice's collected answer, its prefill left out (the client wrote it); starts afresh."""
        answer = self.answers.pop(index, Answer())
        answer.text = answer.text[answer.prefill :]
        return answer


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
        self.codec = req.codec(max_line_bytes=upstream.config.max_line_bytes)
        policy = guarded.policy
        self.prefill = req.prefill if policy.score_prefill else ""
        self.marker = policy.detectors.marker.token
        self.response: web.StreamResponse | None = None  # once set, the client has the headers
        self.upstream_done = False  # the current upstream response has ended
        self.said_done = False  # ... with the dialect's own end (not a failure)
        self.ended = False  # the client's stream has its end (or an in-band error)
        self.pending: list[int] = []  # choices waiting to be asked for again, in order
        self.target: int | None = None  # the choice a regeneration request answers (None: all of them)

    def choice(self, index: int) -> Choice:
        return self.guarded.choice(index, self.prefill)

    def next_body(self, index: int) -> JSON:
        """The request that asks again for choice `index`: with the injected prefill where the dialect
        has one, else with the safety instruction."""
        choice = self.guarded.choices[index]
        prefix, choice.inject = choice.inject, None
        body = self.req.inject_body(prefix) if prefix is not None else None
        if body is None:
            body = self.req.regenerate_body(self.guarded.policy.regenerate_instruction)
        return body

    def emit(self, choice: Choice, outputs: list[Output], sink: Sink, rest: JSON | None = None) -> bytes:
        """The one output path of both modes: a choice's outputs, written to `sink`. `rest` is the
        upstream's finishing message of the choice, when this is the upstream's finish."""
        # The debug channel's events (only a playground request has a tap) go out before the outputs
        # of the verdicts they describe, between two of the codec's events.
        out = bytearray(self.guarded.tap.take() if self.guarded.tap is not None else b"")
        index = choice.index
        for o in outputs:
            if isinstance(o, Release):
                choice.shown.append(o.piece.text)
                out += sink.release(index, o.piece)
            elif isinstance(o, ResetEvent):
                out += sink.reset(index, o)
                if o.action is Action.INJECT:
                    choice.inject = "".join(choice.shown) + o.discarded + self.marker
                choice.shown = []
            elif isinstance(o, Finish):
                out += sink.finish(index, o.reason, rest)
            elif isinstance(o, Regenerate):
                self.pending.append(index)
        return bytes(out)

    # -- streaming -----------------------------------------------------------------------------------

    async def stream(self, request: web.Request, watch: StreamWatch) -> web.StreamResponse:
        """Stream the guarded response; `watch` ends it early when the client leaves or stalls
        (`ClientGone`), or with an in-band error at a limit or the shutdown."""
        self.watch = watch
        try:
            return await self.watch.run(self._stream(request))
        except ConnectionError as exc:
            # Gone (a reset, "Connection lost", or dropped for not reading): nothing more is written.
            raise exc if isinstance(exc, ClientGone) else ClientGone("left") from None
        except Exception as exc:
            if self.response is None:
                raise  # no headers yet: the server answers with an error response
            # An error response now would land inside the stream: end it in-band instead.
            if isinstance(exc, BacktrackError):
                message, kind = exc.message, exc.kind
                if isinstance(exc, StreamCut):
                    log.info("stream on %s cut: %s", self.path, exc.message)
            else:
                log.exception("error mid-stream on %s", self.path)
                message, kind = "internal error in the proxy", "server_error"
            if not self.ended:
                await self.watch.write(self.response, self._abandon(message, kind))
            return self.response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        sink = StreamSink(self.codec, self.guarded)
        body = self.req.body
        if self.prefill:
            for index in range(self.req.n):
                self.choice(index)  # judged even if the upstream says nothing
        while True:
            try:
                async with self.upstream.request("POST", self.path, self.headers, body) as up:
                    await expect_stream(up, self.codec.media_type)
                    if self.response is None:
                        headers = stream_headers(self.codec.media_type, self.guarded.policy.name)
                        self.response = web.StreamResponse(headers=headers)
                        await self.response.prepare(request)
                    if self.target is not None:
                        self.guarded.begin_again(self.guarded.choices[self.target])
                    await self._relay(request, self.response, up, sink)
                    if self.said_done:
                        self.upstream.read_out(up)
            except UpstreamError as exc:
                if self.response is None:
                    raise
                # A regeneration that cannot be had is refused; a stream that broke ends in-band.
                self._count_upstream_error(type(exc).__name__, exc.message)
                unanswered = self.target is not None and self._state(self.target) is State.REGENERATING
                failed = self._give_up(sink) if unanswered else self._abandon(exc.message, exc.kind)
                await self._send(self.response, failed)
            if not self.pending:
                break
            self.target = self.pending.pop(0)
            body = self.next_body(self.target)
        if not self.ended:
            await self._send(self.response, await self._end_all(sink))
        return self.response

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        """Write `data`; the stream's last bytes go out with the body's terminator in one write, so the
        client (whose SDK reads on to the end of the body) is not kept waiting for a second one."""
        if self.ended:
            await response.write_eof(data)
        else:
            await response.write(data)

    async def _relay(
        self, request: web.Request, response: web.StreamResponse, up: ClientResponse, sink: Sink
    ) -> None:
        """One upstream response, until it ends or has nothing left for the choices it answers."""
        self.codec.begin_attempt()
        self.upstream_done = self.said_done = False
        chunks = read_chunks(up)
        reading: asyncio.Task[bytes | None] | None = None
        try:
            while True:
                asking = self.guarded.asking()
                out = b""
                if not asking and reading is None:
                    data = await _next(chunks)  # no verdict is out: the plain loop
                else:
                    # A verdict is out: whichever comes first, the upstream's next chunk or a verdict.
                    if reading is None:
                        reading = asyncio.create_task(_next(chunks))
                    await asyncio.wait([reading, *asking], return_when=asyncio.FIRST_COMPLETED)
                    # Verdicts first: they were asked for before the chunk's text arrived.
                    out = await self._answers(sink)
                    if not reading.done():
                        await self._send(response, out)
                        continue
                    data, reading = reading.result(), None
                if data is None:
                    await self._send(response, out)
                    break
                # While text is held back nothing is written, and only a write notices a gone client
                # (the watch also looks while the upstream is silent).
                self.watch.count(data)
                self.watch.check()
                await self._send(response, out + await self._handle(self.codec.feed(data), sink))
                if self.upstream_done or self._waits_for_another():
                    return
        finally:
            if reading is not None:
                reading.cancel()
                if reading.done() and not reading.cancelled():
                    reading.exception()  # retrieved: the error that ended the loop is the one raised
        await self._send(response, await self._handle(self.codec.flush(), sink))

    async def _answers(self, sink: Sink) -> bytes:
        """The verdicts that have come, applied and written out."""
        out = bytearray()
        for choice in self.guarded.answered():
            out += self.emit(choice, await self.guarded.answer(choice), sink)
        return bytes(out)

    def _waits_for_another(self) -> bool:
        """None of the choices this upstream response answers is still streaming, and one waits to be
        asked for again: reading on is of no use."""
        answered = range(self.req.n) if self.target is None else (self.target,)
        states = {self._state(i) for i in answered}
        return State.STREAMING not in states and State.REGENERATING in states

    def _state(self, index: int) -> State:
        choice = self.guarded.choices.get(index)
        return State.STREAMING if choice is None else choice.state  # a choice not seen yet is to come

    async def _handle(self, events: list[Event], sink: Sink) -> bytes:
        out = bytearray()
        touched: dict[int, Choice] = {}
        for event in events:
            if isinstance(event, ChoicePiece | ChoiceFinish):
                # A regeneration's one choice stands in for the choice it was asked for.
                choice = self.choice(event.index if self.target is None else self.target)
            if isinstance(event, ChoicePiece):
                piece = Piece(event.piece.text, event.piece.extra, time.monotonic())
                out += self.emit(choice, self.guarded.feed(choice, piece), sink)
                touched[choice.index] = choice
            elif isinstance(event, ChoiceFinish):
                outputs = await self.guarded.finish(choice, event.reason)
                out += self.emit(choice, outputs, sink, _upstream_rest(outputs, event))
                touched.pop(choice.index, None)
            elif isinstance(event, Usage | Passthrough):
                out += self.codec.passthrough(event)
            elif isinstance(event, UpstreamFailure):
                message = str(event.error.get("message", "upstream error"))
                self._count_upstream_error("InBandError", message)
                out += self._abandon(message, "upstream_error", event.error)
                return bytes(out)
            elif isinstance(event, Done):
                self.upstream_done = self.said_done = True
        for choice in touched.values():
            out += self.emit(choice, await self.guarded.ask(choice), sink)
        if self.upstream_done and not self.pending:
            out += await self._end_all(sink)
        return bytes(out)

    async def _end_all(self, sink: Sink) -> bytes:
        """Nothing more will come: finish every choice still open, then end the stream."""
        out = bytearray()
        for _, choice in sorted(self.guarded.choices.items()):
            if choice.state is State.STREAMING:
                out += self.emit(choice, await self.guarded.finish(choice, None), sink)
            elif choice.state is State.REGENERATING:
                out += self.emit(choice, self.guarded.give_up(choice), sink)
        out += self.codec.end()
        self.ended = True
        return bytes(out)

    def _give_up(self, sink: Sink) -> bytes:
        """Asking again failed: every choice waiting for it is refused."""
        out = bytearray()
        self.pending.clear()
        for choice in self.guarded.choices.values():
            out += self.emit(choice, self.guarded.give_up(choice), sink)
        return bytes(out)

    def _count_upstream_error(self, kind: str, message: str) -> None:
        """Failures after the headers never reach the server's error translation: count and log them here."""
        self.guarded.metrics.upstream_errors.labels(self.guarded.labels.route, kind).inc()
        log.warning("upstream failed mid-stream on %s (%s): %s", self.path, kind, message)

    def _abandon(self, message: str, kind: str, upstream: JSON | None = None) -> bytes:
        """The upstream failed mid-stream: held text is dropped (unjudged), the client gets the error."""
        self.guarded.abandon()
        self.pending.clear()
        self.upstream_done = self.ended = True
        return self.codec.error(message, kind, upstream)

    # -- non-streaming -------------------------------------------------------------------------------

    async def complete(self) -> web.Response:
        sink = AnswerSink()
        answer = await self._fetch_answer(self.req.body)
        for index, text, reason in self.req.answer_choices(answer):
            await self._judge_choice(answer, index, text, reason, sink, keep_untouched=True)
        while self.pending:
            index = self.pending.pop(0)
            choice = self.guarded.choices[index]
            try:
                fresh = await self._fetch_answer(self.next_body(index))
                choices = self.req.answer_choices(fresh)
                if not choices:
                    raise UpstreamError("upstream answered with no choice")
            except UpstreamError:  # the regeneration cannot be had: refused
                self.emit(choice, self.guarded.give_up(choice), sink)
                refused = sink.take(index)
                self.req.set_answer_choice(answer, index, refused.text, refused.reason)
                continue
            _, text, reason = choices[0]
            if self.req.n == 1:
                answer = fresh  # the one answer given: its envelope (id, usage) is the right one
            self.guarded.begin_again(choice)
            await self._judge_choice(answer, index, text, reason, sink, keep_untouched=self.req.n == 1)
        if sink.resets:
            answer["backtrack"] = backtrack_summary(sink.resets)
        return web.json_response(answer, headers={"X-Backtrack-Policy": self.guarded.policy.name})

    async def _judge_choice(
        self, answer: JSON, index: int, text: str, reason: str | None, sink: AnswerSink, *,
        keep_untouched: bool,
    ) -> None:  # fmt: skip
        """Judge one choice's whole text and write the verdict into `answer` (unless it is to be asked
        for again: then `pending` names it).

        `keep_untouched`: the choice in `answer` is this text, and stays as it came when nothing changed
        (a null content stays null); otherwise the text is always written."""
        choice = self.choice(index)
        if choice.state is State.DONE:
            return
        outputs: list[Output] = []
        for piece in ApproxTokenizer().split(text):
            outputs += self.guarded.feed(choice, Piece(piece))
        outputs += await self.guarded.finish(choice, reason)
        self.emit(choice, outputs, sink)
        judged = sink.take(index)
        if judged.finished:
            unchanged = keep_untouched and judged.text == text
            self.req.set_answer_choice(answer, index, None if unchanged else judged.text, judged.reason)

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


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    """The upstream's next chunk; None at its end."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


def _upstream_rest(outputs: list[Output], event: ChoiceFinish) -> JSON | None:
    """The upstream's finishing message goes out with the finish when the reason is the upstream's own."""
    finish = next((o for o in outputs if isinstance(o, Finish)), None)
    return event.choice if finish is not None and finish.reason == event.reason else None
