"""OpenAI chat completions and completions through the guard: the read-feed-write loop.

Streaming: upstream bytes -> `OpenAIDecoder` -> per-choice engines (via `GuardedResponse`) -> encoder
-> client. Non-streaming: the whole answer is cut into token-sized pieces and run through the same
engine, so both paths make the same decisions. Errors before the client's headers are raised (the
server answers them in OpenAI's format); after, they travel in-band and the stream ends with [DONE].
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse, web

from proxy.dialects.openai import (
    DONE,
    ChoiceFinish,
    ChoicePiece,
    Done,
    Event,
    OpenAIDecoder,
    OpenAIEncoder,
    Passthrough,
    UpstreamFailure,
    Usage,
    data_line,
    error_object,
    in_band_error,
    reset_object,
    response_text,
    set_response_text,
)
from proxy.engine import Finish, Output, Piece, Regenerate, Release, ResetEvent, State
from proxy.errors import BacktrackError, ClientError, UpstreamError
from proxy.guarded import ChoiceRun, GuardedResponse
from proxy.tokens import ApproxTokenizer
from proxy.upstream import Upstream, read_body, read_chunks

log = logging.getLogger("backtrack")
JSON = dict[str, Any]


@dataclass(frozen=True)
class OpenAIRequest:
    body: JSON
    chat: bool
    stream: bool
    model: str
    n: int

    @property
    def prompt(self) -> str | None:
        """The text the guard reads before the response: the last user message, or the prompt."""
        if not self.chat:
            prompt = self.body.get("prompt")
            return prompt if isinstance(prompt, str) else None
        for message in reversed(self.body["messages"]):
            if isinstance(message, dict) and message.get("role") == "user":
                return message_text(message.get("content"))
        return None


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def parse_request(raw: bytes, *, chat: bool) -> OpenAIRequest:
    """Validate what the proxy relies on; everything else goes to the upstream untouched."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ClientError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ClientError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ClientError("'model' is required and must be a string.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ClientError(f"'stream' must be a boolean, not {type(stream).__name__}.")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise ClientError("'n' must be an integer from 1 to 128.")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError("'messages' is required and must be a non-empty array.")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ClientError("Each message must be an object with a string 'role'.")
    elif not isinstance(body.get("prompt"), str | list):
        raise ClientError("'prompt' is required and must be a string or an array.")
    return OpenAIRequest(body, chat, stream, model, n)


def with_safety_instruction(req: OpenAIRequest, instruction: str) -> JSON:
    """The request to regenerate with: the policy's safety instruction added, one answer asked for."""
    body = copy.deepcopy(req.body)
    body["n"] = 1
    if req.chat:
        body["messages"] = [{"role": "system", "content": instruction}, *body["messages"]]
    elif isinstance(body.get("prompt"), str):
        body["prompt"] = f"{instruction}\n\n{body['prompt']}"
    return body


async def expect_event_stream(resp: ClientResponse) -> None:
    """Raise unless the upstream answered a streaming request with 200 and an event stream."""
    if resp.status != 200:
        raise await upstream_error(resp)
    if "Content-Type" in resp.headers and resp.content_type != "text/event-stream":
        raise UpstreamError(f"upstream did not answer with an event stream but with {resp.content_type}")


async def upstream_error(resp: Any) -> BacktrackError:
    """An upstream's non-200 answer as our error: 4xx pass through, 5xx become 502."""
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


class OpenAIRelay:
    def __init__(
        self, req: OpenAIRequest, upstream: Upstream, guarded: GuardedResponse, path: str,
        headers: dict[str, str],
    ) -> None:  # fmt: skip
        self.req = req
        self.upstream = upstream
        self.guarded = guarded
        self.path = path
        self.headers = headers
        self.encoder = OpenAIEncoder(chat=req.chat)
        self.template: JSON = {}
        self.regenerate = False
        self.upstream_done = False
        self.role_sent: set[int] = set()  # choices whose role the client has; a regeneration repeats it
        self.response: web.StreamResponse | None = None  # once set, the client has the headers
        self.identity: JSON = {}  # the id and created of the first attempt, kept by regenerated ones

    # -- streaming -----------------------------------------------------------------------------------

    async def stream(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._stream(request)
        except ConnectionResetError:
            raise
        except Exception as exc:
            if self.response is None:
                raise  # no headers yet: the server answers with an error response
            # An error response now would land inside the event stream: end it in-band instead.
            if isinstance(exc, BacktrackError):
                error = error_object(exc.message, exc.kind)["error"]
            else:
                log.exception("error mid-stream on %s", self.path)
                error = error_object("internal error in the proxy")["error"]
            await self.response.write(self._abandon(error["message"], error))
            return self.response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        body = self.req.body
        while True:
            try:
                async with self.upstream.request("POST", self.path, self.headers, body) as up:
                    await expect_event_stream(up)
                    if self.response is None:
                        self.response = web.StreamResponse(headers=sse_headers(self.guarded.policy.name))
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
                await self.response.write(self._give_up() if regenerating else self._abandon(exc.message))
            if not self.regenerate:
                break
            body = with_safety_instruction(self.req, self.guarded.policy.regenerate_instruction)
        if not self.upstream_done or any(not run.done for run in self.guarded.runs.values()):
            await self.response.write(await self._end_all())
        return self.response

    async def _relay(self, request: web.Request, response: web.StreamResponse, up: ClientResponse) -> None:
        """One upstream attempt, until it ends or the engine asks for a regeneration."""
        decoder = OpenAIDecoder(chat=self.req.chat)
        self.regenerate = self.upstream_done = False
        async for data in read_chunks(up):
            # While text is held back nothing is written, and only a write notices a gone client.
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away")
            await response.write(await self._handle(decoder, decoder.feed(data)))
            if self.regenerate or self.upstream_done:
                return
        await response.write(await self._handle(decoder, decoder.flush()))

    def _begin_regenerated(self) -> None:
        """The upstream answered the regeneration request: its stream is a new attempt, read afresh."""
        for run in self.guarded.runs.values():
            if run.engine.state is State.REGENERATING:
                run.engine.begin_attempt()
                self.guarded.restart_guard(run)

    async def _handle(self, decoder: OpenAIDecoder, events: list[Event]) -> bytes:
        # Chunks we build copy the envelope of the upstream's latest one (id, model, created, ...), but
        # keep the first attempt's id and time: a regenerated answer is still the one response.
        if not self.identity:
            self.identity = {k: v for k, v in decoder.template.items() if k in ("id", "created")}
        self.template = {**decoder.template, **self.identity}
        out = bytearray()
        touched: set[int] = set()
        for event in events:
            if isinstance(event, ChoicePiece):
                run = self.guarded.run(event.index)
                extra = event.piece.extra
                if event.index in self.role_sent:
                    extra = _without_role(extra)  # SDKs concatenate a repeated role: "assistantassistant"
                piece = Piece(event.piece.text, extra, time.monotonic())
                out += self._encode(event.index, run.engine.feed(piece))
                touched.add(event.index)
            elif isinstance(event, ChoiceFinish):
                run = self.guarded.run(event.index)
                run.upstream_reason, run.upstream_rest = event.reason, event.choice
                out += self._encode(event.index, await self.guarded.finish(run))
                touched.discard(event.index)
            elif isinstance(event, Usage):
                out += data_line({**event.chunk, **self.identity})
            elif isinstance(event, Passthrough):
                out += data_line(event.chunk)
            elif isinstance(event, UpstreamFailure):
                out += self._abandon(str(event.error.get("message", "upstream error")), event.error)
                self.upstream_done = True
                return bytes(out)
            elif isinstance(event, Done):
                self.upstream_done = True
        for index in touched:
            out += self._encode(index, await self.guarded.score(self.guarded.run(index)))
        if self.upstream_done and not self.regenerate:
            out += await self._end_all()
        return bytes(out)

    async def _end_all(self) -> bytes:
        """The upstream is done: finish every choice still open, then [DONE]."""
        out = bytearray()
        for index, run in sorted(self.guarded.runs.items()):
            if run.engine.state is State.STREAMING:
                out += self._encode(index, await self.guarded.finish(run))
            elif run.engine.state is State.REGENERATING:
                out += self._encode(index, run.engine.give_up())
        out += DONE
        self.upstream_done = True
        return bytes(out)

    def _give_up(self) -> bytes:
        out = bytearray()
        for index, run in self.guarded.runs.items():
            out += self._encode(index, run.engine.give_up())
        self.regenerate = False
        return bytes(out)

    def _abandon(self, message: str, error: JSON | None = None) -> bytes:
        """The upstream failed mid-stream: held text is dropped (unjudged), the client gets the error."""
        for run in self.guarded.runs.values():
            run.engine.state = State.DONE
        self.upstream_done = True
        self.regenerate = False
        if error is not None:
            return data_line({"error": error}) + DONE
        return in_band_error(message)

    def _encode(self, index: int, outputs: list[Output]) -> bytes:
        out = bytearray()
        run = self.guarded.runs[index]
        for o in outputs:
            if isinstance(o, Release):
                out += self.encoder.piece(self.template, index, o.piece)
                self.guarded.observe_release(o.piece.received)
                if isinstance(o.piece.extra, dict) and "role" in (o.piece.extra.get("delta") or {}):
                    self.role_sent.add(index)
            elif isinstance(o, ResetEvent):
                out += self.encoder.reset(self.template, index, o)
            elif isinstance(o, Finish):
                rest = run.upstream_rest if o.reason == run.upstream_reason else None
                out += self.encoder.finish(self.template, index, o.reason, rest)
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
            for choice in answer["choices"]:
                index = choice.get("index", 0)
                run = self.guarded.run(index)
                if run.done:
                    continue
                if run.engine.state is State.REGENERATING:
                    run.engine.begin_attempt()
                    self.guarded.restart_guard(run)
                outputs = await self._judge_whole(run, choice)
                text, reason, regen = _collect(outputs, resets, index)
                if regen and self.req.n == 1:
                    regenerate = True
                    continue
                if regen:
                    text, reason, _ = _collect(run.engine.give_up(), resets, index)
                if text != response_text(choice, self.req.chat):  # untouched, a null content stays null
                    set_response_text(choice, text, self.req.chat)
                choice["finish_reason"] = reason
            if not regenerate:
                break
            body = with_safety_instruction(self.req, self.guarded.policy.regenerate_instruction)
        if resets:
            answer["backtrack"] = resets[-1] if len(resets) == 1 else {"event": "resets", "resets": resets}
        return web.json_response(answer, headers={"X-Backtrack-Policy": self.guarded.policy.name})

    async def _fetch_answer(self, body: JSON) -> JSON:
        async with self.upstream.request("POST", self.path, self.headers, body) as up:
            if up.status != 200:
                raise await upstream_error(up)
            raw = await read_body(up)
        try:
            answer: JSON = json.loads(raw)
        except ValueError:
            answer = {}
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise UpstreamError("upstream sent a malformed response")
        return answer

    def _refuse_regenerating(self, answer: JSON, resets: list[JSON]) -> None:
        """Choices waiting for a regeneration that failed get the refusal instead."""
        for choice in answer["choices"]:
            index = choice.get("index", 0)
            run = self.guarded.runs.get(index)
            if run is not None and run.engine.state is State.REGENERATING:
                text, reason, _ = _collect(run.engine.give_up(), resets, index)
                set_response_text(choice, text, self.req.chat)
                choice["finish_reason"] = reason

    async def _judge_whole(self, run: ChoiceRun, choice: JSON) -> list[Output]:
        text = response_text(choice, self.req.chat)
        run.upstream_reason = choice.get("finish_reason")
        outputs: list[Output] = []
        for piece in ApproxTokenizer().split(text):
            outputs += run.engine.feed(Piece(piece))
        return outputs + await self.guarded.finish(run)


def _without_role(choice: Any) -> Any:
    """A streamed choice without the `role` of its delta."""
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict) or "role" not in delta:
        return choice
    return {**choice, "delta": {k: v for k, v in delta.items() if k != "role"}}


def _collect(outputs: list[Output], resets: list[JSON], index: int) -> tuple[str, str | None, bool]:
    """Released text, finish reason and whether a regeneration was asked for, from engine outputs."""
    text = ""
    reason: str | None = None
    regen = False
    for o in outputs:
        if isinstance(o, Release):
            text += o.piece.text
        elif isinstance(o, ResetEvent):
            text = text[: len(text) - o.retract_chars]
            # The client of a non-streamed answer never saw the retracted text: nothing to mend.
            resets.append({**reset_object(o), "retract_chars": 0, "index": index})
        elif isinstance(o, Finish):
            reason = o.reason
        elif isinstance(o, Regenerate):
            regen = True
    return text, reason, regen


def sse_headers(policy: str) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "X-Backtrack-Policy": policy,
    }


def error_response(error: BacktrackError, policy: str | None = None) -> web.Response:
    headers = {"X-Backtrack-Policy": policy} if policy else None
    return web.json_response(error_object(error.message, error.kind), status=error.status, headers=headers)
