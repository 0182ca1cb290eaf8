"""`backtrack replay-upstream`: a stand-in LLM server for demos, tests and benchmarks.

It speaks every dialect the proxy does: OpenAI's chat completions and completions, Anthropic's messages
(`proxy.replay.dialects`) and Ollama's chat and generate. For a request whose last user message (or
`prompt`) equals a row's `prompt`, it answers that row's `response`, streamed as token-sized deltas
(`ApproxTokenizer`) at up to `tokens_per_second`; anything else gets `DEFAULT_ANSWER`. Rows sharing a
prompt are served round-robin, so asking twice can give two different answers.

Like a model continuing a prefill, a request ending in an assistant message whose text starts the
response gets only the rest of it. A row may carry an `error` (`{"message", "status"}`, plus
`"after_tokens": N` to fail mid-stream after N deltas) that every dialect answers in its own format.

`GET /_replay/stats` reports what the server saw, for tests: counts of completion requests and streams
(started, completed, cancelled by a client that went away), and the last completion request's JSON body
and headers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.core.errors import ClientError, ConfigError
from proxy.core.tokens import ApproxTokenizer
from proxy.dialects.base import message_text
from proxy.dialects.routes import error_body

DEMO_CORPUS = Path(__file__).parent / "demo" / "corpus.jsonl"
DEFAULT_ANSWER = (
    "This is the replay upstream's default answer: no recorded conversation matches your message, "
    "so here is a short, friendly sentence instead. Ask one of the demo prompts to hear a recorded reply."
)
MODEL_ID = "replay"
# How the OpenAI routes speak (`create_replay_app(wire=...)`, `replay-upstream --wire`).
WIRES = ("openai", "transformers")
# OpenAI rejects larger `n`; a cap keeps one request from asking for an unbounded amount of work.
MAX_N = 128

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class RowError:
    """How a row fails: before the headers with `status`, or in-band after `after_tokens` deltas."""

    message: str
    status: int = 500
    after_tokens: int | None = None


@dataclass(frozen=True)
class Row:
    """One recorded exchange: the prompt it answers (None: never matched) and the response to replay."""

    prompt: str | None
    response: str
    error: RowError | None = None

    def split(self, tokenizer: ApproxTokenizer, prefill: str = "") -> list[str]:
        """The response as streamed deltas; after a prefill that starts it, only what follows."""
        text = (
            self.response[len(prefill) :] if prefill and self.response.startswith(prefill) else self.response
        )
        return tokenizer.split(text)


DEFAULT_ROW = Row(None, DEFAULT_ANSWER)


@dataclass
class ReplayStats:
    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    last_request: Any = None
    last_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ReplayState:
    responses: dict[str, list[Row]]
    tokens_per_second: float | None
    stats: ReplayStats = field(default_factory=ReplayStats)
    served: dict[str, int] = field(default_factory=dict)  # per prompt: how many answers given so far
    tokenizer: ApproxTokenizer = field(default_factory=ApproxTokenizer)

    def answer(self, prompt: str | None) -> Row:
        """The next row for `prompt`, round-robin over the rows that share it."""
        if prompt is None or prompt not in self.responses:
            return DEFAULT_ROW
        candidates = self.responses[prompt]
        turn = self.served.get(prompt, 0)
        self.served[prompt] = turn + 1
        return candidates[turn % len(candidates)]


REPLAY_STATE = web.AppKey("replay_state", ReplayState)


class InvalidRequest(Exception):
    """A request the API would refuse (400 unless said otherwise); answered in the route's error format."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, *, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def load_rows(path: Path) -> list[Row]:
    """Read rows in the shared data schema (JSONL); only `prompt` and `response` are used.

    Raises `ConfigError` naming the file and line of the first problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    rows = []
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:{number}: a row must be a JSON object, got {type(data).__name__}")
        response, prompt = data.get("response"), data.get("prompt")
        if not isinstance(response, str):
            raise ConfigError(f"{path}:{number}: 'response' must be a string, got {_shown(response)}")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"{path}:{number}: 'prompt' must be a string or null, got {_shown(prompt)}")
        rows.append(Row(prompt=prompt, response=response, error=_row_error(data.get("error"), path, number)))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def _row_error(value: Any, path: Path, number: int) -> RowError | None:
    if value is None:
        return None
    message = value.get("message") if isinstance(value, dict) else None
    status = value.get("status", 500) if isinstance(value, dict) else None
    after = value.get("after_tokens") if isinstance(value, dict) else None
    if (
        not isinstance(message, str)
        or not isinstance(status, int)
        or not 400 <= status <= 599
        or not (after is None or (isinstance(after, int) and after >= 0))
    ):
        raise ConfigError(
            f'{path}:{number}: \'error\' must be {{"message": str, "status": 400-599, '
            f'"after_tokens": int >= 0}}, got {_shown(value)}'
        )
    return RowError(message, status, after)


def _shown(value: Any) -> str:
    """A value as it was written in the file, cut short."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def create_replay_app(
    rows: list[Row], tokens_per_second: float | None = None, wire: str = "openai"
) -> web.Application:
    """The replay server for `rows`; at most `tokens_per_second` deltas a second per stream (None: any).

    `wire` is how the OpenAI routes speak: `openai` (as OpenAI does) or `transformers` (as
    `transformers serve` does, `proxy.replay.transformers_wire`).
    """
    from proxy.replay import dialects as replay_dialects  # it builds on this module's state and stream writer
    from proxy.replay import transformers_wire

    if wire not in WIRES:
        raise ConfigError(f"replay wire {wire!r} is not one of {', '.join(WIRES)}")
    chat: Handler = _chat_completions
    completions: Handler = _completions
    if wire == "transformers":
        chat, completions = transformers_wire.chat_completions, transformers_wire.completions

    responses: dict[str, list[Row]] = {}
    for row in rows:
        if row.prompt is not None:
            responses.setdefault(row.prompt, []).append(row)
    app = web.Application(middlewares=[_errors])
    app[REPLAY_STATE] = ReplayState(responses=responses, tokens_per_second=tokens_per_second or None)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/messages", replay_dialects.messages)
    app.router.add_post("/api/chat", replay_dialects.ollama_chat)
    app.router.add_post("/api/generate", replay_dialects.ollama_generate)
    app.router.add_get("/_replay/stats", _stats)
    return app


def error_response(path: str, status: int, message: str, kind: str, param: str | None = None,
                   code: str | None = None) -> web.Response:  # fmt: skip
    """An error answered before the headers, in the format of the API that `path` belongs to."""
    body = error_body(path, message, status=status, kind=kind, param=param, code=code)
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return error_response(request.path, exc.status, exc.message, kind, exc.param, exc.code)
    except web.HTTPException as exc:
        # 404, 405, 413 from aiohttp itself: same error shape as the API so clients parse them alike.
        if exc.status < 400:
            raise
        return error_response(request.path, exc.status, exc.text or exc.reason, "invalid_request_error")


async def read_json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object body of a completion request; recorded in the stats before it is validated."""
    state = request.app[REPLAY_STATE]
    state.stats.requests += 1
    state.stats.last_headers = dict(request.headers)
    state.stats.last_request = None
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("We could not parse the JSON body of your request.") from None
    state.stats.last_request = body
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


@dataclass(frozen=True)
class _Params:
    model: str
    stream: bool
    include_usage: bool
    n: int


def _params(body: dict[str, Any]) -> _Params:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string.", "model", "invalid_type")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", "stream_options", "invalid_type")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise InvalidRequest(
            "'include_usage' must be a boolean.", "stream_options.include_usage", "invalid_type"
        )
    n = body.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be an integer from 1 to {MAX_N}.", "n", "invalid_value")
    return _Params(model=model, stream=stream, include_usage=include_usage, n=n)


def _message_text(content: Any, where: str) -> str:
    """`message_text`, its client errors answered as the replay server's own."""
    try:
        return message_text(content, where)
    except ClientError as exc:
        raise InvalidRequest(exc.message, where, "invalid_type") from None


@dataclass(frozen=True)
class Conversation:
    last_user: str | None  # picks the row
    text: str  # every message's text, for the prompt's token count
    prefill: str  # a final assistant message's text: the start of the answer, which the upstream continues


def chat_prompt(body: dict[str, Any]) -> Conversation:
    """What a chat request (OpenAI, Anthropic or Ollama messages) says, with its messages checked."""
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", "messages", "invalid_value")
    last_user, texts = None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'messages[{i}]' must be an object with a 'role'.", f"messages[{i}]", "invalid_type"
            )
        text = _message_text(message.get("content"), f"messages[{i}].content")
        texts.append(text)
        if message["role"] == "user":
            last_user = text
    prefill = texts[-1] if messages[-1]["role"] == "assistant" else ""
    return Conversation(last_user, "\n".join(texts), prefill)


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string.", "prompt", "invalid_type")
    return prompt


def _usage(state: ReplayState, prompt_text: str, pieces: list[str], n: int) -> dict[str, int]:
    prompt_tokens = len(state.tokenizer.split(prompt_text))
    completion_tokens = len(pieces) * n
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def fail_before_headers(row: Row) -> None:
    """Raise the row's error when it is to be answered instead of a response."""
    if row.error is not None and row.error.after_tokens is None:
        raise InvalidRequest(row.error.message, status=row.error.status)


def openai_error_chunk(message: str) -> bytes:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[REPLAY_STATE]
    body = await read_json_body(request)
    params = _params(body)
    talk = chat_prompt(body)
    row = state.answer(talk.last_user)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer, talk.prefill)
    text = "".join(pieces)
    usage = _usage(state, talk.text, pieces, params.n)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": params.model}
    if not params.stream:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(params.n)
        ]
        return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    def chunk(delta: dict[str, Any], finish_reason: str | None, index: int) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if params.include_usage:
            payload["usage"] = None  # as OpenAI does: every chunk but the last carries a null usage
        return _sse(payload)

    def steps() -> Iterator[bytes]:
        yield b"".join(chunk({"role": "assistant", "content": ""}, None, i) for i in range(params.n))
        for piece in pieces:
            yield b"".join(chunk({"content": piece}, None, i) for i in range(params.n))
        yield b"".join(chunk({}, "stop", i) for i in range(params.n))

    usage_chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
    tail = (_sse(usage_chunk) if params.include_usage else b"") + b"data: [DONE]\n\n"
    # The role comes first, so a failure after N tokens comes after N + 1 steps.
    return await stream(request, steps(), lambda: tail, row, openai_error_chunk, skip=1)


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[REPLAY_STATE]
    body = await read_json_body(request)
    params = _params(body)
    prompt = _completion_prompt(body)
    row = state.answer(prompt)
    fail_before_headers(row)
    pieces = row.split(state.tokenizer)
    text = "".join(pieces)
    usage = _usage(state, prompt, pieces, params.n)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time())}
    if not params.stream:
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(params.n)
        ]
        return web.json_response({**head, "model": params.model, "choices": choices, "usage": usage})

    def chunk(piece: str, finish_reason: str | None, index: int) -> bytes:
        choice = {"text": piece, "index": index, "logprobs": None, "finish_reason": finish_reason}
        payload: dict[str, Any] = {**head, "model": params.model, "choices": [choice]}
        if params.include_usage:
            payload["usage"] = None
        return _sse(payload)

    def steps() -> Iterator[bytes]:
        for piece in pieces:
            yield b"".join(chunk(piece, None, i) for i in range(params.n))
        yield b"".join(chunk("", "stop", i) for i in range(params.n))

    usage_chunk = {**head, "model": params.model, "choices": [], "usage": usage}
    tail = (_sse(usage_chunk) if params.include_usage else b"") + b"data: [DONE]\n\n"
    return await stream(request, steps(), lambda: tail, row, openai_error_chunk)


async def stream(
    request: web.Request,
    steps: Iterator[bytes],
    tail: Callable[[], bytes],
    row: Row,
    error: Callable[[str], bytes],
    *,
    skip: int = 0,
    content_type: str = "text/event-stream",
) -> web.StreamResponse:
    """Write `steps` at the configured rate, then `tail()`; or, for a row that fails mid-stream, its first
    `after_tokens` steps (after `skip` steps that carry no token) and then `error(message)`.

    Step i goes out at start + i/R rather than after a sleep of 1/R, so time spent writing does not
    accumulate and the rate holds over long streams.
    """
    state = request.app[REPLAY_STATE]
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    fail_at = None if row.error is None or row.error.after_tokens is None else skip + row.error.after_tokens
    state.stats.streams_started += 1
    try:
        await response.prepare(request)
        start = loop.time()
        for i, step in enumerate(steps):
            if i == fail_at:
                break
            if state.tokens_per_second:
                delay = start + i / state.tokens_per_second - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await response.write(step)
        if row.error is not None and fail_at is not None:
            await response.write(error(row.error.message))
        else:
            await response.write(tail())
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; aiohttp closes the connection, nothing is left to answer.
        state.stats.streams_cancelled += 1
        return response
    except asyncio.CancelledError:
        state.stats.streams_cancelled += 1
        raise
    state.stats.streams_completed += 1
    return response


async def _models(request: web.Request) -> web.Response:
    model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "backtrack"}
    return web.json_response({"object": "list", "data": [model]})


async def _stats(request: web.Request) -> web.Response:
    stats = request.app[REPLAY_STATE].stats
    return web.json_response(
        {
            "requests": stats.requests,
            "streams_started": stats.streams_started,
            "streams_completed": stats.streams_completed,
            "streams_cancelled": stats.streams_cancelled,
            "last_request": stats.last_request,
            "last_headers": stats.last_headers,
        }
    )
