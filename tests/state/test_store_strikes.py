"""Strikes: the policy fields and their validation, escalation with the in-memory default, and strikes
failing open while Redis is down (the proxy serves on, and `/readyz` and the metric say so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.core.config import ConfigFile, load_policy_set
from proxy.core.errors import ConfigError
from proxy.core.policy import Policy, Strikes
from tests.fleet import POLL_SECONDS, SAFE, UNSAFE, WAIT_SECONDS, ask, replica, write_setup
from tests.harness import Harness, metric, policy, write_policies
from tests.redis_server import RedisServer, unique_prefix
from tests.support import eventually


def test_strikes_escalate_to_a_policy_or_reject() -> None:
    assert Strikes(window_seconds=60, limit=3, escalate_to="strict").reject is False
    assert Strikes(window_seconds=60, limit=3, reject=True).escalate_to is None
    assert Policy(name="p").strikes is None


@pytest.mark.parametrize(
    ("strikes", "message"),
    [
        ({"window_seconds": 60, "limit": 3}, "exactly one of 'escalate_to: POLICY' or 'reject: true'"),
        (
            {"window_seconds": 60, "limit": 3, "escalate_to": "s", "reject": True},
            "exactly one of 'escalate_to: POLICY' or 'reject: true'",
        ),
        ({"window_seconds": 0, "limit": 3, "reject": True}, "greater than 0"),
        ({"window_seconds": 60, "limit": 0, "reject": True}, "greater than or equal to 1"),
        ({"window_seconds": 60, "limit": 3, "reject": True, "burst": 2}, "Extra inputs"),
    ],
)
def test_invalid_strikes_are_refused_with_the_key(strikes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.model_validate({"name": "p", "strikes": strikes})


def test_escalate_to_must_name_another_policy(tmp_path: Path) -> None:
    files = write_policies(
        tmp_path,
        test={"strikes": {"window_seconds": 60, "limit": 1, "escalate_to": "nope"}},
        loop={"strikes": {"window_seconds": 60, "limit": 1, "escalate_to": "loop"}},
    )
    cfg = ConfigFile(policies=files, default_policy="test")
    with pytest.raises(ConfigError) as err:
        load_policy_set(cfg, tmp_path / "config.yaml")
    assert (
        "'policies.test.strikes.escalate_to' has value 'nope'. Not one of the policies" in err.value.message
    )
    assert "'policies.loop.strikes.escalate_to' has value 'loop'. A policy cannot escalate to itself" in (
        err.value.message
    )


async def test_with_the_in_memory_default_one_replica_escalates_a_tenant_by_its_strikes(
    harness: Harness,
) -> None:
    upstream = await harness.replay()
    strikes = {"window_seconds": 600, "limit": 1, "escalate_to": "strict"}
    config = write_setup(
        harness, upstream, None, unique_prefix(), {"test": policy(strikes=strikes), "strict": policy()}
    )
    root, shared = await replica(harness, config)
    assert shared.store.kind == "memory"
    session = await harness.session()
    assert (await ask(session, root, UNSAFE))[1]["X-Backtrack-Policy"] == "test"
    await shared.settle()
    assert (await ask(session, root, SAFE))[1]["X-Backtrack-Policy"] == "strict"
    async with session.get(f"{root}/readyz") as resp:
        assert (await resp.json())["shared_state"] == {"backend": "memory", "up": True, "spooled_events": 0}


async def test_while_redis_is_down_strikes_fail_open_and_the_proxy_serves_on(
    server: RedisServer, harness: Harness
) -> None:
    upstream = await harness.replay()
    strikes = {"window_seconds": 600, "limit": 1, "reject": True}
    config = write_setup(harness, upstream, server.url, unique_prefix(), {"test": policy(strikes=strikes)})
    root, shared = await replica(harness, config)
    session = await harness.session()
    assert (await ask(session, root, UNSAFE))[0] == 200
    await shared.settle()
    assert (await ask(session, root, SAFE))[0] == 429  # one strike: at the limit

    server.stop()

    async def down() -> bool:
        async with session.get(f"{root}/readyz") as resp:
            return resp.status == 200 and (await resp.json())["shared_state"]["up"] is False

    await eventually(down, "the replica to see Redis down", seconds=WAIT_SECONDS, interval=POLL_SECONDS)
    assert await metric(session, root, "backtrack_store_up") == 0
    # The strike count cannot be read: the tenant is served on its own policy, not refused.
    status, headers, _ = await ask(session, root, SAFE)
    assert (status, headers["X-Backtrack-Policy"]) == (200, "test")
    assert (await ask(session, root, UNSAFE))[0] == 200  # and its new strike is not counted anywhere
