"""`backtrack replay-upstream --judge FILE` as a user runs it: recorded verdicts answered in each API's
own shape, chat completions for other models still replayed."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp

from bench.servers import replay_command
from tests.support import REPO, eventually, free_port

ROWS = [
    {"model": "llama-guard-3", "contains": ["pipe", "bomb"], "output": "unsafe\nS9"},
    {"model": "llama-guard-3", "output": "safe"},
    {"model": "shieldgemma-2b", "output": "No", "logprobs": {"No": -0.1, "Yes": -2.4}},
    {
        "model": "omni-moderation-latest",
        "contains": "bomb",
        "output": {"flagged": True, "categories": {"violence": True}, "category_scores": {"violence": 0.9}},
    },
]


async def test_replay_upstream_answers_recorded_verdicts(tmp_path: Path) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "Hello there."}) + "\n", encoding="utf-8")
    port = free_port()
    command = [*replay_command(data, port, None), "--judge", str(verdicts)]
    proc = await asyncio.create_subprocess_exec(*command, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    root = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                try:
                    async with session.get(f"{root}/_judge/stats") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(up, "replay-upstream --judge to listen", seconds=30)

            async def chat(model: str, content: str, **extra: object) -> dict[str, object]:
                body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
                async with session.post(f"{root}/v1/chat/completions", json=body) as resp:
                    answer: dict[str, object] = await resp.json()
                    return answer

            def content(answer: dict[str, object]) -> object:
                return answer["choices"][0]["message"]["content"]  # type: ignore[index]

            assert content(await chat("llama-guard-3", "how to build a pipe bomb")) == "unsafe\nS9"
            assert content(await chat("llama-guard-3", "how to bake bread")) == "safe"
            gemma = await chat("shieldgemma-2b", "anything", logprobs=True, top_logprobs=5)
            first = gemma["choices"][0]["logprobs"]["content"][0]  # type: ignore[index]
            assert (first["token"], first["logprob"]) == ("No", -0.1)
            assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [
                ("No", -0.1),
                ("Yes", -2.4),
            ]
            # Another model: the replay upstream answers as before.
            assert content(await chat("replay", "hi")) == "Hello there."

            async with session.post(
                f"{root}/v1/moderations", json={"input": ["a bomb"], "model": "omni-moderation-latest"}
            ) as resp:
                moderation = await resp.json()
            assert moderation["results"] == [ROWS[3]["output"]]
            async with session.post(f"{root}/v1/moderations", json={"input": "bread"}) as resp:
                assert resp.status == 404  # no row matches: the file must say what to answer
            async with session.get(f"{root}/_judge/stats") as resp:
                assert (await resp.json())["calls"] == {
                    "llama-guard-3": 2,
                    "shieldgemma-2b": 1,
                    "omni-moderation-latest": 2,
                }
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), timeout=20)


async def test_a_bad_verdicts_file_is_refused_by_line(tmp_path: Path) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text('{"model": "m", "output": "safe"}\n{"output": "safe"}\n', encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "proxy.cli.main",
        "replay-upstream",
        "--judge",
        str(verdicts),
        "--port",
        str(free_port()),
    ]
    proc = await asyncio.create_subprocess_exec(*command, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    assert "verdicts.jsonl:2: a row must be an object with a string 'model'" in err.decode()
