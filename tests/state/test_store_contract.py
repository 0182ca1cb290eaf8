"""The store contract: the in-memory default and Redis (a real `redis-server`) answer alike."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from proxy.core.config import load_settings
from proxy.core.errors import ConfigError
from proxy.state.store import MemoryStore, RedisStore, Store, open_store
from tests.redis_server import redis_url, unique_prefix
from tests.state import redis_shapes

MAXLEN = 100


SHAPES = {
    "redis-password": functools.partial(redis_shapes.server, tls=False),
    "redis-tls": functools.partial(redis_shapes.server, tls=True),
    "redis-sentinel": functools.partial(redis_shapes.sentinel, tls=False),
    "redis-sentinel-tls": functools.partial(redis_shapes.sentinel, tls=True),
    "redis-cluster": functools.partial(redis_shapes.cluster, tls=False),
    "redis-cluster-tls": functools.partial(redis_shapes.cluster, tls=True),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Each production shape of Redis, started once for the module as it is asked for (tests keep apart by
    key prefix); their URLs."""
    with ExitStack() as stack:
        started: dict[str, str] = {}

        def url(name: str) -> str:
            if name not in started:
                folder = tmp_path_factory.mktemp(name)
                started[name] = stack.enter_context(SHAPES[name](folder)).url
            return started[name]

        yield _Lazy(url)


class _Lazy(dict[str, str]):
    def __init__(self, start: Callable[[str], str]) -> None:
        super().__init__()
        self.start = start

    def __missing__(self, name: str) -> str:
        return self.start(name)


@pytest.fixture(params=["memory", "redis", *SHAPES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        memory = MemoryStore(MAXLEN)
        yield memory
        await memory.close()
        return
    with ExitStack() as stack:
        if request.param == "redis":
            url = stack.enter_context(redis_url(tmp_path / "redis"))
        else:
            url = request.getfixturevalue("shapes")[request.param]
        redis = RedisStore(url, prefix=unique_prefix(), audit_maxlen=MAXLEN)
        try:
            yield redis
        finally:
            await redis.close()


def event(n: int) -> dict[str, str]:
    return {"id": f"event-{n}", "category": "weapons", "text": f"text {n}"}


async def test_it_answers_a_ping(store: Store) -> None:
    await store.ping()


async def test_audit_events_read_back_in_the_order_they_were_appended(store: Store) -> None:
    for n in range(5):
        assert await store.append_audit(event(n))
    entries = await store.read_audit()
    assert [fields for _, fields in entries] == [event(n) for n in range(5)]


async def test_an_event_appended_again_is_not_written_twice(store: Store) -> None:
    assert await store.append_audit(event(1))
    assert await store.append_audit(event(2))
    assert not await store.append_audit(event(1))  # a retry after a lost reply
    assert [fields["id"] for _, fields in await store.read_audit()] == ["event-1", "event-2"]


async def test_audit_events_are_read_in_pages_after_an_entry_id(store: Store) -> None:
    for n in range(7):
        await store.append_audit(event(n))
    first = await store.read_audit(count=3)
    second = await store.read_audit(first[-1][0], count=3)
    third = await store.read_audit(second[-1][0], count=3)
    ids = [fields["id"] for page in (first, second, third) for _, fields in page]
    assert ids == [f"event-{n}" for n in range(7)]
    assert await store.read_audit(third[-1][0]) == []


async def test_the_audit_log_is_bounded_and_keeps_the_newest(store: Store) -> None:
    for n in range(3 * MAXLEN):
        await store.append_audit(event(n))
    entries = await store.read_audit(count=10 * MAXLEN)
    # Redis trims whole stream nodes (MAXLEN ~): about MAXLEN remain, never everything.
    assert MAXLEN <= len(entries) <= 2 * MAXLEN
    assert entries[-1][1]["id"] == f"event-{3 * MAXLEN - 1}"


async def test_strikes_are_counted_per_tenant_within_the_window(store: Store) -> None:
    await store.add_strike("acme", "s1", 1000.0, keep_seconds=60)
    await store.add_strike("acme", "s2", 1030.0, keep_seconds=60)
    await store.add_strike("other", "s3", 1030.0, keep_seconds=60)
    assert await store.strikes("acme", since=990.0) == [1000.0, 1030.0]
    assert await store.strikes("acme", since=1010.0) == [1030.0]
    assert await store.strikes("other", since=0.0) == [1030.0]
    assert await store.strikes("nobody", since=0.0) == []


async def test_a_strike_recorded_twice_counts_once(store: Store) -> None:
    await store.add_strike("acme", "s1", 1000.0, keep_seconds=60)
    await store.add_strike("acme", "s1", 1000.0, keep_seconds=60)
    assert await store.strikes("acme", since=0.0) == [1000.0]


async def test_strikes_older_than_the_longest_window_are_forgotten(store: Store) -> None:
    await store.add_strike("acme", "old", 1000.0, keep_seconds=60)
    await store.add_strike("acme", "new", 1100.0, keep_seconds=60)
    assert await store.strikes("acme", since=0.0) == [1100.0]


async def test_a_published_reload_reaches_every_subscriber(store: Store) -> None:
    first = await store.subscribe_reloads()
    second = await store.subscribe_reloads()
    try:
        await store.publish_reload('{"origin": "a"}')
        assert await first.get(timeout=5.0) == '{"origin": "a"}'
        assert await second.get(timeout=5.0) == '{"origin": "a"}'
        assert await first.get(timeout=0.05) is None
    finally:
        await first.close()
        await second.close()


async def test_the_latest_announcement_stays_for_whoever_missed_it(store: Store) -> None:
    assert await store.last_reload() is None
    await store.publish_reload("first")
    await store.publish_reload("second")
    assert await store.last_reload() == "second"


async def test_a_closed_subscription_receives_nothing_more(store: Store) -> None:
    sub = await store.subscribe_reloads()
    await sub.close()
    await store.publish_reload("x")  # nobody listens: not an error


async def test_each_replica_keeps_its_latest_reload_report(store: Store) -> None:
    await store.report_reload("a", '{"generation": 2}')
    await store.report_reload("b", '{"generation": 2}')
    await store.report_reload("a", '{"generation": 3}')
    assert await store.reload_reports() == {"a": '{"generation": 3}', "b": '{"generation": 2}'}


async def test_redis_is_used_when_a_url_is_configured_and_the_environment_overrides_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("redis: {url: 'redis://127.0.0.1:1/0'}\n", encoding="utf-8")
    assert load_settings(config, env={}).redis_url == "redis://127.0.0.1:1/0"
    env = {"BACKTRACK_REDIS_URL": "redis://10.0.0.1:6379/2"}
    assert load_settings(config, env=env).redis_url == "redis://10.0.0.1:6379/2"
    assert load_settings(None, env={}).redis_url is None
    memory = open_store(None, prefix="p", audit_maxlen=MAXLEN)
    redis = open_store("redis://127.0.0.1:1/0", prefix="p", audit_maxlen=MAXLEN)
    assert (memory.kind, redis.kind) == ("memory", "redis")
    await memory.close()
    await redis.close()


def test_a_redis_url_of_another_scheme_is_refused_without_repeating_it(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("redis: {url: 'http://user:hunter2@cache:6379'}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(config, env={})
    assert err.value.message == (
        f"{config}: 'redis.url' must start with redis://, rediss://, unix://, redis+sentinel://, "
        "rediss+sentinel://, redis+cluster:// or rediss+cluster://"
    )
    with pytest.raises(ConfigError, match=r"^BACKTRACK_REDIS_URL must start with"):
        load_settings(None, env={"BACKTRACK_REDIS_URL": "cache:6379"})
