"""The real redis-server the state tests stop and restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import EXTERNAL, RedisServer, redis_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (tests that stop it cannot share REDIS_URL's)."""
    if EXTERNAL is not None:
        pytest.skip("stops and restarts Redis: needs its own redis-server, not REDIS_URL's")
    with redis_server(tmp_path / "redis") as started:
        yield started
