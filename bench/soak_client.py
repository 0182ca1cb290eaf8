"""The client side of `backtrack bench soak`: its corpus, one request on any route, what it saw, and the
report made of all of that.

A request's outcome is read from the client's side only (what a caller of the proxy would know):

    ok              a complete answer (its stream reached its end marker) with no reset
    reset           a complete answer that carried at least one `backtrack` reset
    error_before    an HTTP error status (the upstream failed before the headers, or the proxy refused)
    error_in_band   the headers said 200, then the body carried an error object
    incomplete      a stream that ended without its end marker and without an error
    client_error    the request failed on the client: connection refused or reset, a timeout

Every reset the client sees is one audit event the proxy owes Redis (the soak policy refuses, so one
response carries at most one reset; a non-streamed body may list several and each counts).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

KINDS = ("benign", "harmful", "error_before", "error_in_band")
# Mostly traffic that succeeds, as in production, with enough of each failure to exercise its path.
KIND_WEIGHTS = (0.5, 0.25, 0.125, 0.125)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate")
PATTERN_WORD = "bomb"  # what the soak policy's pattern detector resets on: no model needed
PATTERN_CATEGORY = "weapons"
OUTCOMES = ("ok", "reset", "error_before", "error_in_band", "incomplete", "client_error")

_BENIGN = (
    "A tulip garden wants sun, loose soil and bulbs planted twice their own depth in the autumn. Water "
    "them once after planting, then leave them alone until spring, when the leaves push through. Cut the "
    "flowers when the buds show colour and let the leaves die back on their own so the bulb can feed."
)
_HARMFUL = (
    "Sure, here is how it goes. First you collect the parts from the hardware shop, then you wire the "
    f"{PATTERN_WORD} to the timer in the garage and hide it in a bag, then you carry it to the station "
    "in the morning when the platform is crowded and walk away before anyone notices the bag at all."
)


def corpus_rows(copies: int = 4) -> list[dict[str, Any]]:
    """Rows for `replay-upstream`: `copies` prompts of each kind, each kind's answers alike in length."""
    rows: list[dict[str, Any]] = []
    for i in range(copies):
        rows.append({"prompt": prompt_for("benign", i), "response": _BENIGN})
        rows.append({"prompt": prompt_for("harmful", i), "response": _HARMFUL})
        rows.append(
            {
                "prompt": prompt_for("error_before", i),
                "response": _BENIGN,
                "error": {"message": "soak: the upstream is overloaded", "status": 503},
            }
        )
        rows.append(
            {
                "prompt": prompt_for("error_in_band", i),
                "response": _BENIGN,
                "error": {"message": "soak: the upstream died mid-answer", "status": 500, "after_tokens": 8},
            }
        )
    return rows


def prompt_for(kind: str, index: int) -> str:
    # The prompt never holds the pattern word: only the answer may trigger the reset.
    return f"soak {kind} question {index}: tell me about it"


@dataclass
class Result:
    """One request as the client saw it; times are seconds on the soak's clock."""

    kind: str
    route: str
    stream: bool
    outcome: str
    resets: int
    started: float
    ended: float
    status: int | None = None
    detail: str = ""


def pick(rng: random.Random, copies: int = 4) -> tuple[str, str, str, bool]:
    """A prompt kind, its prompt, a route and whether to stream, drawn from `rng`."""
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    return kind, prompt_for(kind, rng.randrange(copies)), rng.choice(ROUTES), rng.random() < 0.5


def request_body(route: str, prompt: str, stream: bool) -> dict[str, Any]:
    """The body each API expects; `stream` is always explicit (Ollama streams by default)."""
    if route in ("/v1/completions", "/api/generate"):
        return {"model": "soak", "prompt": prompt, "stream": stream}
    body: dict[str, Any] = {
        "model": "soak",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }
    if route == "/v1/messages":
        body["max_tokens"] = 512
    return body


async def send(
    session: aiohttp.ClientSession, base: str, kind: str, prompt: str, route: str, stream: bool,
    timeout: float, clock: Any,
) -> Result:  # fmt: skip
    """One request through the proxy, read to its end (or its timeout), classified."""
    started = clock()
    headers = {"anthropic-version": "2023-06-01"} if route == "/v1/messages" else {}
    status: int | None = None
    try:
        async with session.post(
            base + route,
            json=request_body(route, prompt, stream),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            status = response.status
            body = await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(kind, route, stream, "client_error", 0, started, clock(), status, type(exc).__name__)
    ended = clock()
    if status >= 400:
        return Result(kind, route, stream, "error_before", 0, started, ended, status)
    outcome, resets = read_stream(body) if stream else read_body(body)
    return Result(kind, route, stream, outcome, resets, started, ended, status)


def read_stream(body: str) -> tuple[str, int]:
    """(outcome, resets) of a whole SSE or NDJSON body."""
    resets, error, done = 0, False, False
    for line in body.split("\n"):
        line = line.strip()
        payload = line[5:].strip() if line.startswith("data:") else line
        if not payload or line.startswith(("event:", ":")):
            continue
        if payload == "[DONE]":
            done = True
            continue
        try:
            item = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if not isinstance(item, dict):
            continue
        if "error" in item or item.get("type") == "error":
            error = True
        # Anthropic's reset is an event of its own; the other dialects add a `backtrack` object.
        resets += count_resets(item if item.get("type") == "backtrack_reset" else item.get("backtrack"))
        done = done or item.get("type") == "message_stop" or item.get("done") is True
    return _outcome(resets, error, done), resets


def read_body(body: str) -> tuple[str, int]:
    """(outcome, resets) of a non-streamed 200 answer."""
    try:
        item = json.loads(body)
    except json.JSONDecodeError:
        return "incomplete", 0
    if not isinstance(item, dict):
        return "incomplete", 0
    resets = count_resets(item.get("backtrack"))
    return _outcome(resets, "error" in item or item.get("type") == "error", True), resets


def count_resets(backtrack: Any) -> int:
    """Resets in one `backtrack` object: one reset, or a non-streamed summary listing several."""
    if not isinstance(backtrack, dict):
        return 0
    if backtrack.get("event") == "reset":
        return 1
    listed = backtrack.get("resets") if backtrack.get("event") == "resets" else None
    return sum(1 for r in listed if isinstance(r, dict) and r.get("event") == "reset") if listed else 0


def _outcome(resets: int, error: bool, done: bool) -> str:
    # An error outranks a reset: a stream that failed after its reset still shows the reset's event,
    # which is counted separately.
    if error:
        return "error_in_band"
    if not done:
        return "incomplete"
    return "reset" if resets else "ok"


def summary(
    results: list[Result], samples: list[dict[str, Any]], outage: dict[str, float], duration: float,
    loops_ended: float, drained: float,
) -> dict[str, Any]:  # fmt: skip
    """The run's counts and samples. Warm-up ends at 1/6 of the run: after the first requests have grown
    the proxy's pools and caches to their working size, before the outage at 1/3."""
    outcomes = Counter(r.outcome for r in results)
    # Split by streaming: the replay fails in-band only in streams, so the two halves differ by design.
    by_kind = {
        f"{k}, {'streamed' if stream else 'not streamed'}": dict(
            Counter(r.outcome for r in results if r.kind == k and r.stream == stream)
        )
        for k in KINDS
        for stream in (True, False)
    }
    by_route = {route: dict(Counter(r.outcome for r in results if r.route == route))
                for route in sorted({r.route for r in results})}  # fmt: skip
    down = (outage.get("stopped_at_s", -1.0), outage.get("restarted_at_s", -1.0))
    warm = next((s for s in samples if s["t_s"] >= duration / 6), samples[0])
    end = samples[-1]
    return {
        "duration_s": round(loops_ended, 1),
        "requests": len(results),
        "requests_per_s": round(len(results) / loops_ended, 1) if loops_ended else None,
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "by_kind": by_kind,
        "by_route": by_route,
        "statuses": dict(Counter(str(r.status) for r in results)),
        "client_errors": dict(Counter(r.detail for r in results if r.outcome == "client_error")),
        "resets_seen": sum(r.resets for r in results),
        "redis": {
            **{k: round(v, 1) for k, v in outage.items()},
            "resets_seen_while_down": sum(r.resets for r in results if down[0] <= r.ended <= down[1]),
            "peak_spooled": max((s["spooled"] or 0 for s in samples), default=0),
            "drain_s": round(drained, 2),
        },
        "resources": {
            "peak_rss_mib": max(s["rss_mib"] for s in samples),
            "peak_fds": max(s["fds"] for s in samples),
            "warmup": warm,
            "end": end,
            "rss_growth_mib": round(end["rss_mib"] - warm["rss_mib"], 1),
            "fds_growth": end["fds"] - warm["fds"],
        },
        "samples": samples,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    res, audit, redis, s = report["resources"], report["audit"], report["redis"], report["settings"]
    lines = [f"`{report['command']}`", ""]
    lines += ["| requests | req/s | " + " | ".join(OUTCOMES) + " |", "|--:|--:|" + "--:|" * len(OUTCOMES)]
    lines.append(f"| {report['requests']} | {report['requests_per_s']} | "
                 + " | ".join(str(report["outcomes"][o]) for o in OUTCOMES) + " |")  # fmt: skip
    lines += [
        "",
        "| prompt kind, streaming | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "--:|" * len(OUTCOMES),
    ]
    for kind, counts in report["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    lines += ["", "| route | " + " | ".join(OUTCOMES) + " |", "|---|" + "--:|" * len(OUTCOMES)]
    for route, counts in report["by_route"].items():
        lines.append(f"| `{route}` | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    lines += [
        "",
        "| audit events | expected (resets seen) | found in Redis | unique ids | lost | extra |",
        "|---|--:|--:|--:|--:|--:|",
        f"| | {audit['expected']} | {audit['found']} | {audit['unique_ids']} | {audit['lost']} "
        f"| {audit['extra']} |",
        "",
        f"Redis stopped at {redis.get('stopped_at_s', '-')} s, back at {redis.get('restarted_at_s', '-')} s; "
        f"{redis['resets_seen_while_down']} resets seen meanwhile, spool peak {redis['peak_spooled']} "
        "(sampled), "
        f"drained {redis['drain_s']} s after the loops ended; proxy counter {audit['proxy_counter']}.",
        "",
        "| proxy | RSS MiB | open fds |",
        "|---|--:|--:|",
        f"| peak | {res['peak_rss_mib']} | {res['peak_fds']} |",
        f"| warm-up end ({res['warmup']['t_s']} s) | {res['warmup']['rss_mib']} | {res['warmup']['fds']} |",
        f"| end, after the drain ({res['end']['t_s']} s) | {res['end']['rss_mib']} | {res['end']['fds']} |",
        f"| growth after warm-up | {res['rss_growth_mib']:+} | {res['fds_growth']:+} |",
        "",
        "| t s | RSS MiB | fds | requests | resets seen | Redis up | spooled |",
        "|--:|--:|--:|--:|--:|---|--:|",
    ]
    step = max(1, len(report["samples"]) // 15)  # a small table: about 15 rows, the last one always
    shown = report["samples"][::step] + (
        [report["samples"][-1]] if (len(report["samples"]) - 1) % step else []
    )
    for row in shown:
        lines.append(f"| {row['t_s']} | {row['rss_mib']} | {row['fds']} | {row['requests']} "
                     f"| {row['resets_seen']} | {row['redis_up']} | {row['spooled']} |")  # fmt: skip
    lines += [
        "",
        f"{s['streams']} streams, replay at {s['tokens_per_second']:g} tokens/s, {s['cpu_count']} CPUs, "
        f"load average before {s['load_average_before']}. Outcomes are what the client saw.",
    ]
    return "\n".join(lines)
