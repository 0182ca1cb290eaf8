"""`backtrack serve --workers N`: real processes on one real port, one `/metrics` for all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.state.metrics import MULTIPROC_ENV
from tests.cli.test_shutdown import wait_up
from tests.support import REPO, eventually, free_port

ROW = {"prompt": "Count slowly.", "response": " ".join(str(i) for i in range(300))}
CHAT = "/v1/chat/completions"


@dataclass
class Fleet:
    """A running `serve --workers` in front of a slow stand-in upstream."""

    proxy: asyncio.subprocess.Process
    url: str
    metrics_dir: Path

    def worker_pids(self) -> set[int]:
        """The workers that have written metrics (each writes its files as it starts)."""
        return {int(p.stem.rpartition("_")[2]) for p in self.metrics_dir.glob("counter_*.db")}

    def per_worker(self, name: str, labels: dict[str, str]) -> dict[int, float]:
        """One sample's value in each worker alone, read from that worker's files only."""
        values = {}
        for pid in self.worker_pids():
            alone = self.metrics_dir.parent / f"alone-{pid}"
            alone.mkdir(exist_ok=True)
            for path in self.metrics_dir.glob(f"*_{pid}.db"):
                shutil.copy(path, alone / path.name)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
            values[pid] = registry.get_sample_value(name, labels) or 0.0
            shutil.rmtree(alone)
        return values


async def launch(*args: str | Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    command = [sys.executable, "-m", "proxy.cli.main", *map(str, args)]
    return await asyncio.create_subprocess_exec(
        *command, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"holdback_tokens": 2}), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"server": {"shutdown_grace_seconds": 1.0, "workers": 3},
                        "policies": {"test": "test.yaml"}, "default_policy": "test"}),
        encoding="utf-8",
    )  # fmt: skip
    metrics_dir = tmp_path / "metrics"
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    up_port, port = free_port(), free_port()
    upstream = await launch("replay-upstream", "--data", data, "--port", str(up_port),
                            "--tokens-per-second", "20", env=env)  # fmt: skip
    proxy = await launch("serve", "--config", config, "--port", str(port),
                         "--upstream", f"http://127.0.0.1:{up_port}", env=env)  # fmt: skip
    fleet = Fleet(proxy, f"http://127.0.0.1:{port}", metrics_dir)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"http://127.0.0.1:{up_port}/_replay/stats")
        assert proxy.stdout is not None
        # The banner comes once every worker listens (log lines may come before it).
        line = b""
        while not line.startswith(b"backtrack: serving on"):
            line = await asyncio.wait_for(proxy.stdout.readline(), timeout=60)
            assert line, "serve --workers exited before it listened"
        assert line.decode().startswith(f"backtrack: serving on http://127.0.0.1:{port} ("), line
        assert "; 3 workers)" in line.decode()
        yield fleet
    finally:
        for proc in (proxy, upstream):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for pid in fleet.worker_pids():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # it exited meanwhile
                if not gone(pid) and b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)  # a worker left behind by a failed test


def new_connections() -> aiohttp.ClientSession:
    # A connection per request: the kernel spreads connections (not requests) over the workers.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def ask(session: aiohttp.ClientSession, url: str, stream: bool) -> aiohttp.ClientResponse:
    request = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": ROW["prompt"]}]}
    return await session.post(url + CHAT, json=request)


def streams_total(text: str) -> float:
    line = f'backtrack_streams_total{{model="m",policy="test",route="{CHAT}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


async def test_metrics_on_any_worker_count_the_requests_of_all(fleet: Fleet) -> None:
    sent = 24
    async with new_connections() as session:
        for _ in range(sent):
            resp = await ask(session, fleet.url, stream=False)
            async with resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == ROW["response"]
        per_worker = fleet.per_worker(
            "backtrack_streams_total", {"policy": "test", "route": CHAT, "model": "m"}
        )
        assert len(per_worker) == 3
        assert sum(per_worker.values()) == sent
        assert sum(1 for n in per_worker.values() if n > 0) >= 2, per_worker  # spread, not one worker
        # Each scrape lands on some worker (a new connection each): every one serves the total.
        for _ in range(6):
            async with session.get(fleet.url + "/metrics") as resp:
                assert streams_total(await resp.text()) == sent


async def test_sigterm_drains_the_streams_of_every_worker_and_exits_0(fleet: Fleet) -> None:
    async with new_connections() as session:
        streams: list[aiohttp.ClientResponse] = []

        def active() -> dict[int, float]:
            return fleet.per_worker("backtrack_active_streams", {"route": CHAT})

        # Open streams until two workers each hold one (connections are spread by a hash of their
        # addresses, so a few tries are needed).
        while sum(1 for n in active().values() if n > 0) < 2:
            assert len(streams) < 30, active()
            resp = await ask(session, fleet.url, stream=True)
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data: ")
            streams.append(resp)
        fleet.proxy.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*(asyncio.wait_for(r.content.read(), 15) for r in streams))
        for resp in streams:
            resp.release()

    for body in bodies:
        lines = [line for line in body.decode().splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "shutting down" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
    output, _ = await asyncio.wait_for(fleet.proxy.communicate(), timeout=30)
    assert fleet.proxy.returncode == 0, output.decode()
    assert b"Traceback" not in output, output.decode()


async def test_a_worker_that_dies_is_replaced_and_its_counts_stay_in_the_sum(fleet: Fleet) -> None:
    async with new_connections() as session:
        for _ in range(9):
            async with await ask(session, fleet.url, stream=False) as resp:
                assert resp.status == 200
        before = fleet.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: len(fleet.worker_pids() - before) == 1, "a replacement worker", seconds=60)

        async def all_answer() -> bool:
            for _ in range(6):
                try:
                    async with session.get(fleet.url + "/healthz") as resp:
                        if resp.status != 200:
                            return False
                except aiohttp.ClientConnectionError:
                    return False  # a connection hashed to the replacement before it listened
            return True

        await eventually(all_answer, "every worker to answer", seconds=60)
        # The dead worker's 9-or-fewer requests still count: counters keep their files.
        async with session.get(fleet.url + "/metrics") as resp:
            assert streams_total(await resp.text()) == 9
    fleet.proxy.send_signal(signal.SIGTERM)
    output, _ = await asyncio.wait_for(fleet.proxy.communicate(), timeout=30)
    assert fleet.proxy.returncode == 0, output.decode()
    assert f"(pid {victim}) exited with code -9; restarting it" in output.decode()


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie whose new parent has not reaped it yet counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def test_workers_whose_supervisor_is_killed_exit_by_themselves(fleet: Fleet) -> None:
    workers = fleet.worker_pids()
    assert len(workers) == 3
    fleet.proxy.kill()  # SIGKILL: nothing forwards a signal to the workers
    await fleet.proxy.wait()
    await eventually(lambda: all(gone(pid) for pid in workers), "the orphaned workers to exit", seconds=30)


def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_code_1(tmp_path: Path) -> None:
    # Every worker would fail the same way: a guard checkpoint that is not there.
    policy = {"detectors": {"model": {"enabled": True}}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"guard": {"checkpoint": "missing"}, "policies": {"test": "test.yaml"},
                        "default_policy": "test"}),
        encoding="utf-8",
    )  # fmt: skip
    command = [sys.executable, "-m", "proxy.cli.main", "serve", "--config", str(config), "--workers", "2",
               "--port", str(free_port()), "--upstream", "http://127.0.0.1:9"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "before it listened; stopping" in done.stderr
    assert "serving on" not in done.stdout


def test_a_worker_count_below_1_is_a_configuration_error() -> None:
    command = [sys.executable, "-m", "proxy.cli.main", "serve", "--workers", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "'workers' has value 0. Input should be greater than or equal to 1" in done.stderr
