"""SIGTERM with streams in flight: each ends in-band, in its dialect's way, before the connection closes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from tests.support import REPO, eventually, free_port

LONG = {"prompt": "Count slowly.", "response": " ".join(str(i) for i in range(300))}


async def start(*args: str | Path) -> asyncio.subprocess.Process:
    command = [sys.executable, "-m", "proxy.cli.main", *map(str, args)]
    return await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )


async def wait_up(session: aiohttp.ClientSession, url: str) -> None:
    """Wait (10 s at most) until `url` answers at all."""

    async def answers() -> bool:
        try:
            async with session.get(url):
                return True
        except aiohttp.ClientConnectionError:
            return False

    await eventually(answers, f"{url} to answer", seconds=10)


async def test_sigterm_ends_a_running_stream_with_an_in_band_error_and_done(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(LONG) + "\n", encoding="utf-8")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"holdback_tokens": 2}), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"server": {"shutdown_grace_seconds": 1.0}, "policies": {"test": "test.yaml"},
                        "default_policy": "test"}),
        encoding="utf-8",
    )  # fmt: skip
    up_port, port = free_port(), free_port()
    upstream = await start("replay-upstream", "--data", data, "--port", str(up_port),
                           "--tokens-per-second", "5")  # fmt: skip
    proxy = await start("serve", "--config", config, "--port", str(port),
                        "--upstream", f"http://127.0.0.1:{up_port}")  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"http://127.0.0.1:{up_port}/_replay/stats")
            await wait_up(session, f"http://127.0.0.1:{port}/healthz")
            messages = [{"role": "user", "content": LONG["prompt"]}]
            request = {"model": "m", "stream": True, "messages": messages}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=request) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                proxy.send_signal(signal.SIGTERM)
                # read() fails unless the chunked body ends with its terminator.
                body = (first + await asyncio.wait_for(resp.content.read(), timeout=10)).decode()
        lines = [line for line in body.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "shutting down" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
        assert body.endswith("data: [DONE]\n\n")
        output, _ = await asyncio.wait_for(proxy.communicate(), timeout=20)
        assert proxy.returncode == 0, output.decode()
        assert b"Traceback" not in output, output.decode()
    finally:
        for proc in (proxy, upstream):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
