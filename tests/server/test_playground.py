"""`/playground` and its debug channel: on only when configured, behind the admin token with tenants,
and never a field of an ordinary client's response. `mend.js` is run by node on a real stream."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from typing import Any

import aiohttp
import pytest

from proxy.core.config import load_settings
from proxy.core.selection import hash_key
from proxy.server.app import create_app
from proxy.server.playground import DEBUG_HEADER
from tests.harness import MARKED, Harness, replay_stats
from tests.support import REPO

BEFORE_MARKER, AFTER_MARKER = MARKED["response"].split("[RESET]")
ON = {"server": {"playground": True}}
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": MARKED["prompt"]}]}
MESSAGES = {"model": "m", "max_tokens": 100, "stream": True, "messages": CHAT["messages"]}
ADMIN = "admin-secret"
TENANT_KEY = "sk-tenant"


def debug_events(body: str) -> list[dict[str, Any]]:
    """The data of every `event: backtrack_debug` of an SSE body."""
    return [json.loads(m) for m in re.findall(r"event: backtrack_debug\ndata: (.*)\n", body)]


async def page_token(session: aiohttp.ClientSession, root: str, **kwargs: Any) -> str:
    """The debug token the playground page of the proxy at `root` was served with."""
    async with session.get(f"{root}/playground", **kwargs) as resp:
        assert resp.status == 200
        html = await resp.text()
    config = re.search(r'<script type="application/json" id="playground-config">(.*?)</script>', html)
    assert config is not None
    token: str = json.loads(config.group(1))["debugToken"]
    return token


async def stream(
    session: aiohttp.ClientSession, root: str, path: str = "/v1/chat/completions", **kwargs: Any
) -> str:
    """A streamed answer's whole body (CHAT unless `json=` says otherwise)."""
    async with session.post(f"{root}{path}", json=kwargs.pop("json", CHAT), **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


# -- on and off -------------------------------------------------------------------------------------------


async def test_the_playground_is_off_unless_configured(harness: Harness) -> None:
    root = await harness.proxy(await harness.replay())
    session = await harness.session()

    for path in ("/playground", "/playground/mend.js"):
        async with session.get(f"{root}{path}") as resp:
            assert resp.status == 404
    # With the playground off the header means nothing: no debug events.
    body = await stream(session, root, headers={DEBUG_HEADER: "anything"})
    assert "backtrack_debug" not in body


async def test_the_page_and_its_files_are_served_with_their_media_types(harness: Harness) -> None:
    root = await harness.proxy(await harness.replay(), extra=ON)
    session = await harness.session()

    async with session.get(f"{root}/playground") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        html = await resp.text()
    for testid in ("prompt", "send", "answer", "scores"):
        assert f'data-testid="{testid}"' in html
    expected = {
        "mend.js": "text/javascript",
        "playground.js": "text/javascript",
        "playground.css": "text/css",
    }
    for name, media_type in expected.items():
        async with session.get(f"{root}/playground/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == f"{media_type}; charset=utf-8"
            assert await resp.text() == (REPO / "proxy/server/static" / name).read_text(encoding="utf-8")
    for name in ("index.html", "..%2Fapp.py", "nothing.js"):
        async with session.get(f"{root}/playground/{name}") as resp:
            assert resp.status == 404


async def test_with_tenants_the_page_needs_the_admin_token(harness: Harness) -> None:
    tenants = {"tenants": [{"name": "acme", "key_sha256": [hash_key(TENANT_KEY)]}], **ON}
    path = harness.write_config(await harness.replay(), extra=tenants)
    root = await harness.serve(create_app(load_settings(path, env={"BACKTRACK_ADMIN_TOKEN": ADMIN})))
    session = await harness.session()
    basic = "Basic " + base64.b64encode(f"me:{ADMIN}".encode()).decode()

    async with session.get(f"{root}/playground") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")  # so that a browser asks for it
    for wrong in ("Bearer nope", "Basic " + base64.b64encode(b"me:nope").decode(), f"Bearer {TENANT_KEY}"):
        async with session.get(f"{root}/playground/mend.js", headers={"Authorization": wrong}) as resp:
            assert resp.status == 403
    async with session.get(
        f"{root}/playground/mend.js", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 200
    token = await page_token(session, root, headers={"Authorization": basic})
    # The page's own requests still need a tenant's key: the debug token is no key.
    async with session.post(f"{root}/v1/chat/completions", json=CHAT, headers={DEBUG_HEADER: token}) as resp:
        assert resp.status == 401
    body = await stream(session, root, headers={DEBUG_HEADER: token, "Authorization": f"Bearer {TENANT_KEY}"})
    assert debug_events(body)


# -- the debug channel ----------------------------------------------------------------------------------


async def test_an_ordinary_request_gets_no_debug_fields_and_no_dropped_text(harness: Harness) -> None:
    root = await harness.proxy(await harness.replay(), extra=ON)
    session = await harness.session()
    token = await page_token(session, root)
    debugged = await stream(session, root, headers={DEBUG_HEADER: token})
    dropped = next(
        e["reset"]["dropped"] for e in debug_events(debugged) if e["event"] == "verdict" and e["reset"]
    )
    assert dropped and dropped in BEFORE_MARKER + "[RESET]"

    body = await stream(session, root)

    assert "backtrack_debug" not in body
    assert '"held"' not in body and '"scored_until"' not in body
    assert dropped not in body
    for wrong in ("", "x", token[:-1], token + "x"):
        async with session.post(
            f"{root}/v1/chat/completions", json=CHAT, headers={DEBUG_HEADER: wrong}
        ) as resp:
            assert resp.status == 403
            text = await resp.text()
            assert "backtrack_debug" not in text and dropped not in text
    # Not streamed: the answer is the same with the token as without, and carries no debug fields.
    answers = []
    for headers in ({}, {DEBUG_HEADER: token}):
        async with session.post(
            f"{root}/v1/chat/completions", json={**CHAT, "stream": False}, headers=headers
        ) as resp:
            answer = await resp.json()
            answers.append((answer["choices"][0]["message"]["content"], answer["backtrack"]))
    assert answers[0] == answers[1]
    assert dropped not in json.dumps(answers)


async def test_the_debug_channel_shows_verdicts_the_hold_back_and_what_a_reset_dropped(
    harness: Harness,
) -> None:
    upstream = await harness.replay()
    root = await harness.proxy(upstream, extra=ON)
    session = await harness.session()
    token = await page_token(session, root)

    body = await stream(session, root, headers={DEBUG_HEADER: token})

    # The token is the proxy's own: it never goes upstream.
    assert DEBUG_HEADER.lower() not in {k.lower() for k in (await replay_stats(upstream))["last_headers"]}
    events = debug_events(body)
    assert events[0] == {
        "event": "start", "policy": "test", "threshold": 0.5, "holdback_tokens": 4,
        "detectors": ["marker", "patterns"],
    }  # fmt: skip
    upstream_text = "".join(e["text"] for e in events if e["event"] == "upstream")
    assert upstream_text == MARKED["response"]  # what an unguarded client would have shown
    verdicts = [e for e in events if e["event"] == "verdict"]
    assert all(0 <= v["released"] <= v["scored_until"] <= v["received"] for v in verdicts if not v["reset"])
    assert any(v["held"] for v in verdicts)
    (reset,) = [v for v in verdicts if v["reset"]]
    assert reset["score"] == 1.0
    assert reset["reset"]["category"] == "upstream_reset"
    assert reset["reset"]["action"] == "continue"
    shown = BEFORE_MARKER[: reset["reset"]["retract_chars"]]
    assert shown + reset["reset"]["dropped"] == BEFORE_MARKER + "[RESET]"


async def test_the_anthropic_route_has_the_debug_channel_too(harness: Harness) -> None:
    root = await harness.proxy(await harness.replay(), extra=ON)
    session = await harness.session()
    token = await page_token(session, root)

    text = await stream(session, root, "/v1/messages", json=MESSAGES, headers={DEBUG_HEADER: token})

    events = debug_events(text)
    assert events[0]["event"] == "start"
    assert any(e["event"] == "verdict" and e["reset"] for e in events)
    assert "event: backtrack_reset" in text


# -- mend.js --------------------------------------------------------------------------------------------

MEND_SCRIPT = """
import { mend, Mender } from "%s";
const body = await new Response(process.stdin).text();
const views = [];
for await (const view of mend(new Response(body))) views.push(view);
const m = new Mender();
m.append("a😀b");
const retracted = m.reset({ retract_chars: 2, notice_chars: 3 });
m.append("[N]c");
console.log(JSON.stringify({
  text: views.at(-1).text,
  kinds: [...new Set(views.map((v) => v.kind))],
  retracted: views.filter((v) => v.kind === "reset").map((v) => v.retracted),
  unicode: [m.text, retracted],
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="mend.js is run with node, which is not installed")
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)])
async def test_mend_js_mends_a_real_stream(harness: Harness, path: str, body: dict[str, Any]) -> None:
    root = await harness.proxy(await harness.replay(), extra=ON)
    session = await harness.session()
    token = await page_token(session, root)
    wire = await stream(session, root, path, json=body, headers={DEBUG_HEADER: token})
    script = MEND_SCRIPT % (REPO / "proxy/server/static/mend.js").as_uri()

    run = subprocess.run(
        ["node", "--input-type=module", "-e", script], input=wire, capture_output=True, text=True, timeout=30
    )

    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["text"] == AFTER_MARKER
    assert set(result["kinds"]) >= {"text", "reset", "debug", "finish"}
    (retracted,) = result["retracted"]
    assert retracted and BEFORE_MARKER.startswith(retracted)
    assert result["unicode"] == ["ac", "😀b"]  # code points, as the proxy counts them
