"""Two proxy replicas on one real Redis: strikes counted together, a reload on one reaching the other,
audit events of both in one stream read back by `backtrack audit export`, and a Redis restart in the
middle of traffic after which every audit event is there exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from proxy.cli.main import main
from proxy.core.selection import hash_key
from proxy.state.shared import Shared
from tests.fleet import (
    ADMIN,
    ADMIN_TOKEN,
    POLL_SECONDS,
    SAFE,
    TENANT_KEY,
    UNSAFE,
    UPSTREAM_KEY,
    WAIT_SECONDS,
    ask,
    replica,
    write_setup,
)
from tests.harness import BENIGN, WORDY, Harness, metric, policy
from tests.redis_server import RedisServer, redis_url, unique_prefix
from tests.support import eventually


async def drained(*replicas: Shared) -> None:
    """Wait until every replica's audit spool is written to the store."""

    async def empty() -> bool:
        return all(r.up and not r.audit.spool for r in replicas)

    await eventually(empty, "the audit spools to drain", seconds=WAIT_SECONDS, interval=POLL_SECONDS)


async def export(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> list[dict[str, Any]]:
    """`backtrack audit export --config CONFIG ARGS`, run as the command runs: its rows."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["audit", "export", "--config", str(config), *args])
    out = capsys.readouterr().out
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(autouse=True)
def no_env_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    # `audit export` reads the environment: the config's redis.url must be the one it uses here.
    monkeypatch.delenv("BACKTRACK_REDIS_URL", raising=False)


# Requested before `harness`, these outlive the replicas, which flush their spools as they close.
@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with redis_url(tmp_path / "redis") as found:
        yield found


async def test_strikes_of_a_tenant_are_counted_across_replicas_and_escalate_it(
    url: str, harness: Harness
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    strikes = {"window_seconds": 600, "limit": 2, "escalate_to": "strict"}
    config = write_setup(
        harness, upstream, url, unique_prefix(),
        {"test": policy(strikes=strikes), "strict": policy(refusal_message="STRICT refusal.")},
    )  # fmt: skip
    (a, shared_a), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()

    status, headers, _ = await ask(session, a, UNSAFE)
    assert (status, headers["X-Backtrack-Policy"]) == (200, "test")
    await shared_a.settle()  # the strike is written by then
    status, headers, _ = await ask(session, b, UNSAFE)
    assert (status, headers["X-Backtrack-Policy"]) == (200, "test")
    await shared_b.settle()

    # One strike on each replica: two for acme, its limit; both replicas now escalate it.
    for root in (a, b):
        status, headers, body = await ask(session, root, UNSAFE)
        assert (status, headers["X-Backtrack-Policy"]) == (200, "strict")
        assert "STRICT refusal." in body
    assert (
        await metric(session, a, 'backtrack_strike_escalations_total{outcome="escalate",policy="test"}') == 1
    )


async def test_past_its_limit_a_tenant_gets_429_with_retry_after_from_every_replica(
    url: str, harness: Harness
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    strikes = {"window_seconds": 600, "limit": 2, "reject": True}
    config = write_setup(harness, upstream, url, unique_prefix(), {"test": policy(strikes=strikes)})
    (a, shared_a), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()
    for root, shared in ((a, shared_a), (b, shared_b)):
        assert (await ask(session, root, UNSAFE))[0] == 200
        await shared.settle()
    for root in (a, b):
        status, headers, body = await ask(session, root, SAFE)
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= 600
        assert json.loads(body)["error"]["type"] == "rate_limit_error"


async def test_a_reload_on_one_replica_reaches_the_other_and_each_reports_it(
    url: str, harness: Harness
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    config = write_setup(harness, upstream, url, unique_prefix(), {"test": policy(refusal_message="OLD.")})
    (a, _), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()
    assert "OLD." in (await ask(session, b, UNSAFE))[2]

    (harness.tmp_path / "policies" / "test.yaml").write_text(
        yaml.safe_dump(policy(refusal_message="NEW.")), encoding="utf-8"
    )
    async with session.post(f"{a}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 200

    async def b_reloaded() -> bool:
        return shared_b.policies.live.generation == 2

    await eventually(
        b_reloaded, "replica B to follow A's reload", seconds=WAIT_SECONDS, interval=POLL_SECONDS
    )
    assert "NEW." in (await ask(session, b, UNSAFE))[2]
    assert await metric(session, b, 'backtrack_fleet_reloads_total{result="ok"}') == 1
    assert await metric(session, a, 'backtrack_fleet_reloads_total{result="ok"}') == 0

    async def both_reported() -> bool:
        async with session.get(f"{b}/admin/reloads", headers=ADMIN) as resp:
            replicas = (await resp.json())["replicas"]
        return len(replicas) == 2 and all(r["generation"] == 2 for r in replicas.values())

    await eventually(
        both_reported, "both replicas to report generation 2", seconds=WAIT_SECONDS, interval=POLL_SECONDS
    )
    async with session.get(f"{a}/admin/reloads", headers=ADMIN) as resp:
        reports = (await resp.json())["replicas"]
    reasons = sorted(r["reason"] for r in reports.values())
    assert reasons[0] == "POST /admin/reload"
    assert reasons[1].startswith("fleet: reloaded by ")
    assert {r["result"] for r in reports.values()} == {"ok"}


async def test_audit_events_of_both_replicas_are_exported_from_one_stream(
    url: str, harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    prefix = unique_prefix()
    config = write_setup(
        harness, upstream, url, prefix,
        {"test": policy(audit="kept"), "quiet": policy(audit="redacted")},
    )  # fmt: skip
    (a, shared_a), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()
    assert (await ask(session, a, UNSAFE, request_id="req-a"))[0] == 200
    assert (await ask(session, b, UNSAFE, request_id="req-b"))[0] == 200
    await drained(shared_a, shared_b)

    rows = await export(capsys, config)
    # Each replica writes its own events as they come: between replicas the order is the stream's.
    assert sorted(r["request_id"] for r in rows) == ["req-a", "req-b"]
    row = next(r for r in rows if r["request_id"] == "req-a")
    schema = ["source", "id", "prompt", "response", "harmful", "category", "label_origin", "license"]
    assert list(row)[: len(schema)] == schema
    assert row["source"] == "backtrack_audit"
    assert row["prompt"] == UNSAFE
    assert "bomb" in row["response"]
    assert row["harmful"] is None  # a guard verdict, not yet a reviewed label
    assert (row["tenant"], row["policy"], row["model"], row["route"]) == (
        "acme", "test", "m", "/v1/chat/completions",
    )  # fmt: skip
    assert (row["kind"], row["category"], row["action"]) == ("reset", "weapons", "refuse")
    assert row["position"] >= 0 and row["score"] == 1.0
    assert len({r["id"] for r in rows}) == 2
    assert await export(capsys, config, "--since", "2999-01-01T00:00:00Z") == []
    assert len(await export(capsys, config, "--since", "1h")) == 2


async def test_no_key_token_or_digest_ever_reaches_the_audit_stream(
    url: str, harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    prefix = unique_prefix()
    config = write_setup(harness, upstream, url, prefix, {"test": policy(audit="kept")})
    root, shared = await replica(harness, config)
    session = await harness.session()
    assert (await ask(session, root, UNSAFE))[0] == 200
    async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 200
    await drained(shared)
    await shared.settle()

    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        stored = []
        for key in await client.keys(f"*{prefix}*"):  # the audit keys' prefix is in a hash tag: {prefix}
            kind = await client.type(key)
            if kind == "stream":
                stored.append(repr(await client.xrange(key)))
            elif kind == "hash":
                stored.append(repr(await client.hgetall(key)))
            elif kind == "zset":
                stored.append(repr(await client.zrange(key, 0, -1, withscores=True)))
            stored.append(key)
    finally:
        await client.aclose()
    exported = json.dumps(await export(capsys, config))
    assert "bomb" in "".join(stored) and "bomb" in exported  # the kept text is there ...
    for secret in (TENANT_KEY, UPSTREAM_KEY, ADMIN_TOKEN, hash_key(TENANT_KEY), "SECRET"):
        for text in (*stored, exported):
            assert secret not in text  # ... and no secret is


async def test_after_redis_stops_and_restarts_mid_traffic_every_audit_event_is_there_exactly_once(
    server: RedisServer, harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    config = write_setup(harness, upstream, server.url, unique_prefix(), {"test": policy(audit="kept")})
    (a, shared_a), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()
    sent: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            n = len(sent)
            request_id = f"req-{n}"
            status, _, body = await ask(session, (a, b)[n % 2], UNSAFE, request_id)
            assert status == 200 and "Sorry, I can't help with that." in body  # served throughout
            sent.append(request_id)

    def sent_at_least(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(sent) >= n

        return check

    async def readyz(root: str) -> dict[str, Any]:
        async with session.get(f"{root}/readyz") as resp:
            assert resp.status == 200  # ready all along: the proxy serves through the outage
            state: dict[str, Any] = (await resp.json())["shared_state"]
            return state

    async def both(up: bool) -> bool:
        states = [await readyz(root) for root in (a, b)]
        return all(state["up"] is up for state in states)

    sender = asyncio.create_task(traffic())
    try:
        await eventually(
            sent_at_least(6), "traffic before the outage", seconds=WAIT_SECONDS, interval=POLL_SECONDS
        )
        await asyncio.to_thread(server.stop)
        await eventually(
            lambda: both(False),
            "both replicas to see Redis down",
            seconds=WAIT_SECONDS,
            interval=POLL_SECONDS,
        )
        assert await metric(session, a, "backtrack_store_up") == 0
        during = len(sent)
        await eventually(
            sent_at_least(during + 6),
            "traffic during the outage",
            seconds=WAIT_SECONDS,
            interval=POLL_SECONDS,
        )
        assert (await readyz(a))["spooled_events"] + (await readyz(b))["spooled_events"] > 0
        await asyncio.to_thread(server.start)
        await eventually(
            lambda: both(True), "both replicas to see Redis back", seconds=WAIT_SECONDS, interval=POLL_SECONDS
        )
        after = len(sent)
        await eventually(
            sent_at_least(after + 6), "traffic after the outage", seconds=WAIT_SECONDS, interval=POLL_SECONDS
        )
    finally:
        stop.set()
        await sender
    await drained(shared_a, shared_b)
    assert await metric(session, b, "backtrack_store_up") == 1

    # B listens again: a reload on A still reaches it.
    async with session.post(f"{a}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 200

    async def b_reloaded() -> bool:
        return shared_b.policies.live.generation == 2

    await eventually(
        b_reloaded,
        "replica B to follow A's reload after the outage",
        seconds=WAIT_SECONDS,
        interval=POLL_SECONDS,
    )

    rows = await export(capsys, config)
    assert sorted(r["request_id"] for r in rows) == sorted(sent)  # each request's reset, once
    assert len({r["id"] for r in rows}) == len(rows)
    # Each replica's events are in the order it saw them, spooled ones included.
    for parity in (0, 1):
        mine = [int(r["request_id"].removeprefix("req-")) for r in rows]
        mine = [n for n in mine if n % 2 == parity]
        assert mine == sorted(mine)
