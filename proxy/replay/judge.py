"""The recorded judge: `backtrack replay-upstream --judge FILE.jsonl` answers moderation and
chat-classifier requests from recorded verdicts, in each family's own output format.

A row is a verdict a judge gave, and when to give it again:

    {"model": "llama-guard-3", "contains": ["pipe bomb"], "output": "unsafe\\nS9"}
    {"model": "llama-guard-3", "output": "safe"}
    {"model": "qwen3guard", "contains": "gunpowder", "output": "Safety: Unsafe\\nCategories: Violent"}
    {"model": "shieldgemma", "contains": "fuse", "output": "Yes", "logprobs": {"Yes": -0.02, "No": -4.1}}
    {"model": "omni-moderation-latest", "contains": "bomb",
     "output": {"flagged": true, "categories": {"violence": true}, "category_scores": {"violence": 0.97}}}

A request (`POST /v1/moderations`, or `POST /v1/chat/completions` whose `model` some row names) gets the
`output` of the first row, in file order, whose `model` is the request's and whose `contains` strings all
occur in the request's text (every message's content, or the moderation `input`); a row without
`contains` matches any text. Chat answers carry the output as the message's content, and, where the row
has `logprobs` and the request asks for them, the first token's alternatives as OpenAI's API gives them.
A moderation row's `output` is one `results` entry; a string is sent as the body itself (garbage, for
tests of a judge that answers nonsense). `delay_seconds` answers late (a judge that times out), `status`
answers with that HTTP error. Chat requests for other models fall through to the replay upstream.

`GET /_judge/stats` counts the requests per model, and the most answered at once, for tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.core.errors import ConfigError

Handler = Any  # aiohttp's middleware handler type


@dataclass(frozen=True)
class JudgeRow:
    model: str
    contains: tuple[str, ...]
    output: str | dict[str, Any]
    logprobs: dict[str, float] | None = None
    delay_seconds: float = 0.0
    status: int = 200


@dataclass
class RecordedJudge:
    rows: list[JudgeRow]
    calls: Counter[str] = field(default_factory=Counter)
    inflight: int = 0
    most_inflight: int = 0  # the most requests answered at once, for tests of one call per stream

    @property
    def models(self) -> set[str]:
        return {row.model for row in self.rows}

    def answer(self, model: str, text: str) -> JudgeRow | None:
        self.calls[model] += 1
        return next((r for r in self.rows if r.model == model and all(c in text for c in r.contains)), None)


def load_judge(path: Path) -> RecordedJudge:
    """Read a recorded-judge JSONL; raises `ConfigError` naming the file and line of the first problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise ConfigError(f"{where}: a row must be an object with a string 'model'")
        contains = data.get("contains", [])
        contains = [contains] if isinstance(contains, str) else contains
        output = data.get("output")
        logprobs = data.get("logprobs")
        if not isinstance(contains, list) or not all(isinstance(c, str) for c in contains):
            raise ConfigError(f"{where}: 'contains' must be a string or a list of strings")
        if not isinstance(output, str | dict):
            raise ConfigError(f"{where}: 'output' must be a string or an object")
        if logprobs is not None and not (
            isinstance(logprobs, dict) and all(isinstance(v, int | float) for v in logprobs.values())
        ):
            raise ConfigError(f"{where}: 'logprobs' must map tokens to numbers")
        delay, status = data.get("delay_seconds", 0.0), data.get("status", 200)
        if not isinstance(delay, int | float) or not isinstance(status, int):
            raise ConfigError(f"{where}: 'delay_seconds' must be a number and 'status' an integer")
        rows.append(JudgeRow(data["model"], tuple(contains), output, logprobs, float(delay), status))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return RecordedJudge(rows)


JUDGE = web.AppKey("recorded_judge", RecordedJudge)


def install_judge(app: web.Application, judge: RecordedJudge) -> None:
    """Answer judge requests on `app` (a replay app, before it starts) from `judge`'s rows."""
    app[JUDGE] = judge
    app.middlewares.append(_judge_chat)
    app.router.add_post("/v1/moderations", _moderations)
    app.router.add_get("/_judge/stats", _stats)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text(part.get("text", "") if isinstance(part, dict) else part) for part in content)
    return ""


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


async def _respond(judge: RecordedJudge, model: str, text: str) -> JudgeRow | web.Response:
    judge.inflight += 1
    judge.most_inflight = max(judge.most_inflight, judge.inflight)
    try:
        return await _recorded(judge.answer(model, text), model)
    finally:
        judge.inflight -= 1


async def _recorded(row: JudgeRow | None, model: str) -> JudgeRow | web.Response:
    if row is None:
        error = {"message": f"no recorded verdict for model {model!r} and this text", "type": "not_found"}
        return web.json_response({"error": error}, status=404)
    if row.delay_seconds:
        await asyncio.sleep(row.delay_seconds)
    if row.status != 200:
        error = {"message": "recorded judge error", "type": "server_error"}
        return web.json_response({"error": error}, status=row.status)
    return row


@web.middleware
async def _judge_chat(request: web.Request, handler: Handler) -> web.StreamResponse:
    judge = request.app[JUDGE]
    if request.method != "POST" or request.path != "/v1/chat/completions":
        response: web.StreamResponse = await handler(request)
        return response
    body = await _body(request)  # read once: aiohttp keeps it for the replay handler
    model = body.get("model")
    if not isinstance(model, str) or model not in judge.models:
        response = await handler(request)
        return response
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    text = "\n".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
    row = await _respond(judge, model, text)
    if isinstance(row, web.Response):
        return row
    content = row.output if isinstance(row.output, str) else json.dumps(row.output)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if row.logprobs is not None and body.get("logprobs"):
        first = content.split(maxsplit=1)[0] if content.strip() else content
        ranked = sorted(row.logprobs.items(), key=lambda kv: -kv[1])
        top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in ranked]
        chosen = row.logprobs.get(first, ranked[0][1])
        entry = {"token": first, "logprob": chosen, "bytes": list(first.encode()), "top_logprobs": top}
        choice["logprobs"] = {"content": [entry], "refusal": None}
    words = len(text.split())
    answer = {
        "id": f"chatcmpl-judge-{sum(judge.calls.values())}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": words,
            "completion_tokens": 1,
            "total_tokens": words + 1,
        },
    }
    return web.json_response(answer)


async def _moderations(request: web.Request) -> web.Response:
    judge = request.app[JUDGE]
    body = await _body(request)
    model = body.get("model")
    model = model if isinstance(model, str) else "omni-moderation-latest"
    raw = body.get("input")
    text = "\n".join(_text(i) for i in raw) if isinstance(raw, list) else _text(raw)
    row = await _respond(judge, model, text)
    if isinstance(row, web.Response):
        return row
    if isinstance(row.output, str):
        return web.Response(text=row.output, content_type="application/json")
    answer = {"id": f"modr-{sum(judge.calls.values())}", "model": model, "results": [row.output]}
    return web.json_response(answer)


async def _stats(request: web.Request) -> web.Response:
    judge = request.app[JUDGE]
    return web.json_response({"calls": dict(judge.calls), "most_inflight": judge.most_inflight})
