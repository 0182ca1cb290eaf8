"""A real `redis-server` for the tests: started on a free port in the test's folder, always killed.

With `REDIS_URL` set the tests use that server instead, each under its own key prefix; the tests that
stop and restart Redis are skipped then (they cannot stop someone else's server).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import free_port

EXTERNAL = os.environ.get("REDIS_URL")
START_SECONDS = 10.0


def unique_prefix() -> str:
    """A key prefix no other test uses, so tests sharing one Redis never see each other's keys."""
    return f"bt-test-{uuid.uuid4().hex[:10]}"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; `stop` saves its data to its folder and `start` loads it again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (`make test` installs it; or set REDIS_URL)")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder),
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"redis-server did not start on port {self.port}: see {self.folder / 'redis.log'}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut down after saving a snapshot (the test server has no save points of its own)."""
        assert self.proc is not None
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as s:
            s.sendall(b"SHUTDOWN SAVE\r\n")
            s.recv(64)  # the connection closes once the snapshot is written
        self.proc.wait(timeout=START_SECONDS)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    """A started server, killed however the block ends."""
    server = RedisServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@contextmanager
def redis_url(folder: Path) -> Iterator[str]:
    """`REDIS_URL`, or the URL of a server started for the block."""
    if EXTERNAL:
        yield EXTERNAL
        return
    with redis_server(folder) as server:
        yield server.url
