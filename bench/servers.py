"""The servers a benchmark starts as child processes: replay-upstream, Backtrack's proxy, LiteLLM.

Each is a `Server`: its CPU time and peak memory read from /proc (with its children's), its log kept in
the run's folder, stopped with its children on the way out of `servers()`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from bench.command import PACKAGE_ROOT, BenchError

STARTUP_SECONDS = 120.0


class Server:
    """A child process serving HTTP on `port`, its output in `log`.

    `env` replaces the environment (default: this one, with this package importable); `cwd` is where
    it runs (default: here).
    """

    def __init__(
        self, name: str, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log: TextIO = log_path.open("w", encoding="utf-8")
        if env is None:
            path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """utime + stime so far of the process and its live descendants (a server may fork workers)."""
        total = 0.0
        for pid in _process_tree(self.process.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited since the tree was read
                continue
            # The command name (field 2) may contain spaces; the numeric fields start after its ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def peak_rss_bytes(self) -> int:
        """Peak resident memory (VmHWM) of the process and its live descendants, added up."""
        total = 0
        for pid in _process_tree(self.process.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024  # reported in kB
        return total

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        # Descendants first: a worker left behind by its parent's exit would outlive the benchmark.
        children = _process_tree(self.process.pid)[1:]
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants, parents first."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            with suppress(OSError):
                tree += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return tree


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child that must be told its port.

    It comes from below the kernel's ephemeral range. A port from `bind(0)` is an ephemeral one, and any
    outgoing connection made before the child binds it (a health poll, another child's upstream) may be
    given it: the child then exits with "address already in use". Below the range only `bind` hands
    ports out. No port is handed out twice by one process.
    """
    low = _ephemeral_low()
    for _ in range(200 if low > 2048 else 0):
        port = _random.randrange(max(1024, low - 16384), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or one of ours still in TIME_WAIT
        _handed_out.add(port)
        return port
    return _ephemeral_port()  # none free there: an ephemeral port still works, with the race above


def _ephemeral_port() -> int:
    """A port from `bind(0)`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_random = random.SystemRandom()
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (32768 where /proc does not say)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextmanager
def servers() -> Iterator[list[Server]]:
    """Children started into the yielded list are stopped on the way out, error or not."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


async def wait_until_up(session: aiohttp.ClientSession, server: Server, path: str) -> None:
    """Poll `path` until it answers 200; `BenchError` with the log's tail if the server exits or is slow."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            async with session.get(server.url + path) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass  # not listening yet
        await asyncio.sleep(0.1)
    raise BenchError(
        f"{server.name} did not answer {path} within {STARTUP_SECONDS:.0f} s:\n{server.log_tail()}"
    )


async def settle(server: Server, limit: float = 10.0) -> None:
    """Wait until `server` is idle: after a cut run it may still be writing to clients that went away."""
    deadline = time.monotonic() + limit
    before = server.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = server.cpu_seconds()
        if now - before < 0.05:
            return
        before = now


def replay_command(data: Path, port: int, tokens_per_second: float | None) -> list[str]:
    """`backtrack replay-upstream` for `data` on `port`, paced at `tokens_per_second` (None: unpaced)."""
    command = [
        sys.executable,
        "-m",
        "proxy.cli.main",
        "replay-upstream",
        "--data",
        str(data),
        "--port",
        str(port),
    ]
    return command + (["--tokens-per-second", str(tokens_per_second)] if tokens_per_second else [])


def proxy_command(config: Path, upstream: str, port: int) -> list[str]:
    """`backtrack serve` with `config` in front of `upstream`, on 127.0.0.1:`port`."""
    serve = [
        "serve",
        "--config",
        str(config),
        "--upstream",
        upstream,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return [sys.executable, "-m", "proxy.cli.main", *serve]


def write_proxy_config(
    directory: Path, name: str, policy: dict[str, Any], guard: dict[str, Any] | None = None
) -> Path:
    """NAME.yaml in `directory`: a proxy config whose one policy, `bench`, is `policy` (NAME-policy.yaml),
    with `guard` as its guard section when given.
    """
    (directory / f"{name}-policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config: dict[str, Any] = {"policies": {"bench": f"{name}-policy.yaml"}, "default_policy": "bench"}
    if guard is not None:
        config["guard"] = guard
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
