"""The load client of `backtrack bench real` against replay-upstream's `transformers` wire: a stream
that ends without `data: [DONE]` after its last choice finished is whole, and the request carries the
body a real model needs (max_tokens, temperature). No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from bench.load import Load, Target, Workload, run_path
from bench.servers import Server, free_port, replay_command, servers, wait_until_up

ROW = {"prompt": "Say hello.", "response": "Hello there, and a good day to you."}


async def test_streams_without_done_count_as_whole_and_carry_the_extra_body(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    with servers() as started:
        port = free_port()
        command = [*replay_command(data, port, None), "--wire", "transformers"]
        replay = Server("replay-upstream", command, port, tmp_path / "replay.log")
        started.append(replay)
        async with aiohttp.ClientSession() as session:
            await wait_until_up(session, replay, "/v1/models")
            target = Target(f"{replay.url}/v1/chat/completions", model="demo", body={"max_tokens": 7})
            run = await run_path(replay, "direct", 2, Load(requests=2), Workload([ROW["prompt"]], {}, None),
                                 target)  # fmt: skip
            async with session.get(f"{replay.url}/_replay/stats") as resp:
                stats = await resp.json()

    summary = run.summary()
    assert (summary["requests"], summary["errors"], summary["cut"]) == (4, 0, 0)
    assert all(sample.ok for sample in run.samples)
    assert stats["last_request"]["max_tokens"] == 7 and stats["last_request"]["model"] == "demo"
