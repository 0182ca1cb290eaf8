"""Redis in production shapes, each a real server started here: TLS and passwords from the URL, a
Sentinel that fails over, a Cluster whose script keys share a slot; and a fleet of two replicas on each.

The store contract itself runs against every shape in `test_store_contract.py`.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml
from redis.asyncio.cluster import RedisCluster

from proxy.core.errors import ConfigError
from proxy.state.redis_url import parse
from proxy.state.store import RedisStore, StoreUnavailable
from tests.fleet import ADMIN, UNSAFE, ask, replica, write_setup
from tests.harness import BENIGN, WORDY, Harness, policy
from tests.redis_server import unique_prefix
from tests.state import redis_shapes
from tests.state.redis_shapes import PASSWORD, Shape
from tests.state.test_redis_fleet import drained, export
from tests.support import REPO, eventually

# -- the URL forms -----------------------------------------------------------------------------------


def test_a_sentinel_url_names_its_sentinels_service_database_and_both_passwords() -> None:
    target = parse("redis+sentinel://app:pw@10.0.0.1:26379,[::1],s3:26380/mymaster/2?sentinel_password=spw")
    assert target.shape == "sentinel"
    assert target.nodes == (("10.0.0.1", 26379), ("::1", 26379), ("s3", 26380))
    assert target.service == "mymaster"
    assert target.sentinel_password == "spw"
    assert {k: target.options[k] for k in ("username", "password", "db")} == {
        "username": "app", "password": "pw", "db": 2,
    }  # fmt: skip


def test_a_tls_cluster_url_keeps_its_tls_options_for_every_node() -> None:
    target = parse("rediss+cluster://:pw@n1:7000,n2?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    assert (target.shape, target.nodes) == ("cluster", (("n1", 7000), ("n2", 6379)))
    assert target.options["ssl"] is True
    assert target.options["ssl_ca_certs"] == "/etc/ca.pem"
    assert target.options["password"] == "pw"
    assert "db" not in target.options  # a Cluster has database 0 only


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:hunter2@s1:26379", "names no service"),
        ("redis+sentinel://:hunter2@s1:26379/mymaster/x", "not a database number"),
        ("redis+cluster://:hunter2@n1:7000/3", "other than 0"),
        ("redis+cluster://:hunter2@n1:7000,,n2", "empty host"),
        ("redis+cluster://:hunter2@n1:99999", "port is not a number"),
    ],
)
def test_a_malformed_url_is_refused_by_its_part_never_repeating_it(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RedisStore(url, prefix="p", audit_maxlen=100)
    assert message in err.value.message
    assert "hunter2" not in err.value.message


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_malformed_url_once_before_it_starts_anything(workers: str) -> None:
    env = {**os.environ, "BACKTRACK_REDIS_URL": "redis+sentinel://:hunter2@s1:26379"}
    command = [sys.executable, "-m", "proxy.cli.main", "serve", "--port", "0", "--workers", workers]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("the Redis URL names no service") == 1
    assert "hunter2" not in done.stderr + done.stdout


# -- TLS and passwords ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shape]:
    with redis_shapes.server(tmp_path_factory.mktemp("tls"), tls=True) as shape:
        yield shape


async def unavailable(url: str) -> str:
    """The error a store on `url` reports for a ping."""
    store = RedisStore(url, prefix=unique_prefix(), audit_maxlen=100, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as err:
            await store.ping()
    finally:
        await store.close()
    return str(err.value)


async def test_a_wrong_password_is_unavailable_and_no_password_is_in_the_error(tls: Shape) -> None:
    wrong = tls.url.replace(PASSWORD, "not-the-password")
    error = await unavailable(wrong)
    assert "AuthenticationError" in error
    assert PASSWORD not in error and "not-the-password" not in error
    assert "AuthenticationError" in await unavailable(tls.url.replace(f":{PASSWORD}@", ""))


async def test_tls_is_verified_against_the_ca_the_url_names(tls: Shape) -> None:
    # Without the test CA the server's certificate is not trusted; plain TCP finds no Redis to talk to.
    no_ca = tls.url.partition("?")[0]
    # redis-py drops the socket of a connection attempt that failed mid-handshake without closing it (its
    # own bug; our store closes its pool): the ResourceWarning that socket raises when collected is not
    # this test's subject, so it is silenced for these two attempts only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        assert "CERTIFICATE_VERIFY_FAILED" in await unavailable(no_ca)
        assert PASSWORD not in await unavailable(no_ca.replace("rediss://", "redis://"))
        gc.collect()
    store = RedisStore(tls.url, prefix=unique_prefix(), audit_maxlen=100)
    try:
        await store.ping()
        assert await store.append_audit({"id": "e1", "category": "weapons"})
    finally:
        await store.close()


# -- Sentinel ----------------------------------------------------------------------------------------


async def test_after_a_sentinel_failover_the_store_writes_to_the_new_master(tmp_path: Path) -> None:
    with redis_shapes.sentinel(tmp_path) as shape:
        old_master, replica_node, watcher = shape.nodes
        store = RedisStore(shape.url, prefix=unique_prefix(), audit_maxlen=100)
        try:
            assert await store.append_audit({"id": "before", "category": "weapons"})
            await eventually(
                lambda: replica_node.run("XLEN", store.audit_key) == "1", "the replica to have the event"
            )
            # Refused (NOGOODSLAVE) until the Sentinel has seen the replica report a live link.
            await eventually(
                lambda: watcher.run("SENTINEL", "FAILOVER", "mymaster") == "OK", "a failover to start",
                seconds=30, interval=0.5,
            )  # fmt: skip
            address = ("SENTINEL", "get-master-addr-by-name", "mymaster")
            await eventually(
                lambda: str(replica_node.port) in watcher.run(*address), "the replica's promotion", seconds=30
            )
            # Until the Sentinel demotes it, the old master still takes writes (Redis replicates
            # asynchronously); once it is a replica, the store's connections to it fail and reconnect.
            await eventually(
                lambda: "role:slave" in old_master.run("INFO", "replication"), "the old master's demotion",
                seconds=30,
            )  # fmt: skip

            async def written() -> bool:
                try:
                    return await store.append_audit({"id": "after", "category": "weapons"})
                except StoreUnavailable:  # the old master's connections are closed under it: retried
                    return False

            await eventually(written, "a write to reach the new master", seconds=30, interval=0.2)
            assert [f["id"] for _, f in await store.read_audit()] == ["before", "after"]
            assert "role:master" in replica_node.run("INFO", "replication")
        finally:
            await store.close()


# -- Cluster -----------------------------------------------------------------------------------------


async def test_in_a_cluster_the_audit_keys_share_a_slot_and_tenants_spread_over_nodes(tmp_path: Path) -> None:
    with redis_shapes.cluster(tmp_path) as shape:
        store = RedisStore(shape.url, prefix=unique_prefix(), audit_maxlen=100)
        try:
            cluster = store.client
            assert isinstance(cluster, RedisCluster)
            slot = await cluster.cluster_keyslot(store.audit_key)
            assert await cluster.cluster_keyslot(store.seen_prefix + "any-event-id") == slot
            for n in range(30):
                await store.add_strike(f"tenant-{n}", f"s{n}", 1000.0, keep_seconds=60)
            owners = {cluster.get_node_from_key(f"{store.strikes_prefix}tenant-{n}").name for n in range(30)}
            assert len(owners) == 3  # strikes are not pinned to the audit stream's node
            assert await store.strikes("tenant-7", since=0.0) == [1000.0]
        finally:
            await store.close()


async def test_after_a_cluster_failover_the_store_follows_the_slot_to_its_new_master(tmp_path: Path) -> None:
    with redis_shapes.cluster(tmp_path, replicas=1) as shape:
        store = RedisStore(shape.url, prefix=unique_prefix(), audit_maxlen=100)
        try:
            assert await store.append_audit({"id": "before", "category": "weapons"})
            cluster = store.client
            assert isinstance(cluster, RedisCluster)
            owner = cluster.get_node_from_key(store.audit_key)
            replica_node = next(
                node for node in shape.nodes if f"master_port:{owner.port}" in node.run("INFO", "replication")
            )
            replica_port = replica_node.port
            master = next(node for node in shape.nodes if node.port == owner.port)

            def offset(node: redis_shapes.Node, field: str) -> int:
                info = dict(line.split(":", 1) for line in node.run("INFO", "replication").splitlines()[1:])
                return int(info[field])

            # A replica in a Cluster redirects reads to its master: its replication offset says it is in step.
            await eventually(
                lambda: offset(replica_node, "slave_repl_offset") >= offset(master, "master_repl_offset"),
                "the replica to have the event",
            )
            assert replica_node.run("CLUSTER", "FAILOVER") == "OK"  # a manual, coordinated failover
            await eventually(
                lambda: "role:master" in replica_node.run("INFO", "replication"), "the promotion", seconds=30
            )

            async def written() -> bool:
                try:
                    return await store.append_audit({"id": "after", "category": "weapons"})
                except StoreUnavailable:  # MOVED, or the old master's connections closed: retried
                    return False

            await eventually(written, "a write to reach the new master", seconds=30, interval=0.2)
            assert [f["id"] for _, f in await store.read_audit()] == ["before", "after"]
            assert cluster.get_node_from_key(store.audit_key).port == replica_port
        finally:
            await store.close()


async def test_with_every_cluster_node_down_each_operation_is_unavailable_until_they_return(
    tmp_path: Path,
) -> None:
    with redis_shapes.cluster(tmp_path) as shape:
        cold = RedisStore(shape.url, prefix=unique_prefix(), audit_maxlen=100)  # never connected
        warm = RedisStore(shape.url, prefix=unique_prefix(), audit_maxlen=100)
        try:
            await warm.ping()
            for node in shape.nodes:
                node.kill()
            for store in (cold, warm):
                operations: list[Callable[[], Awaitable[object]]] = [
                    store.ping, partial(store.append_audit, {"id": "e", "category": "c"}), store.read_audit,
                    partial(store.add_strike, "t", "s", 1.0, 60), partial(store.strikes, "t", 0.0),
                    partial(store.publish_reload, "x"), store.last_reload, store.subscribe_reloads,
                    partial(store.report_reload, "r", "{}"), store.reload_reports,
                ]  # fmt: skip
                for operation in operations:
                    with pytest.raises(StoreUnavailable) as err:
                        await operation()
                    assert PASSWORD not in str(err.value)
            for node in shape.nodes:
                node.restart()

            async def back() -> bool:
                try:
                    await cold.ping()
                    await warm.append_audit({"id": "after", "category": "c"})
                except StoreUnavailable:
                    return False
                return True

            await eventually(back, "the Cluster to answer again", seconds=60, interval=0.5)
            assert [f["id"] for _, f in await warm.read_audit()] == ["after"]  # no persistence here
        finally:
            await cold.close()
            await warm.close()


# -- a fleet on each shape ------------------------------------------------------------------------------

FLEET_SHAPES = {
    "tls": redis_shapes.server,
    "sentinel-tls": redis_shapes.sentinel,
    "cluster-tls": redis_shapes.cluster,
}


# Requested before `harness`: the servers outlive the replicas, which flush their spools as they close.
@pytest.fixture(params=list(FLEET_SHAPES))
def fleet_shape(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shape]:
    with FLEET_SHAPES[request.param](tmp_path / "redis", tls=True) as shape:
        yield shape


async def test_two_replicas_share_strikes_audit_and_reloads_on_each_shape(
    fleet_shape: Shape, harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = await harness.replay([BENIGN, WORDY])
    strikes = {"window_seconds": 600, "limit": 1, "escalate_to": "strict"}
    config = write_setup(
        harness, upstream, fleet_shape.url, unique_prefix(),
        {"test": policy(strikes=strikes, refusal_message="OLD."),
         "strict": policy(refusal_message="STRICT.")},
    )  # fmt: skip
    (a, shared_a), (b, shared_b) = [await replica(harness, config) for _ in range(2)]
    session = await harness.session()

    status, headers, body = await ask(session, a, UNSAFE, request_id="on-a")
    assert (status, headers["X-Backtrack-Policy"], "OLD." in body) == (200, "test", True)
    await shared_a.settle()
    # A's strike escalates acme on B.
    status, headers, body = await ask(session, b, UNSAFE, request_id="on-b")
    assert (status, headers["X-Backtrack-Policy"], "STRICT." in body) == (200, "strict", True)
    await drained(shared_a, shared_b)
    rows = await export(capsys, config)
    assert sorted(r["request_id"] for r in rows) == ["on-a", "on-b"]

    (harness.tmp_path / "policies" / "test.yaml").write_text(
        yaml.safe_dump(policy(refusal_message="NEW.")), encoding="utf-8"
    )
    async with session.post(f"{a}/admin/reload", headers=ADMIN) as resp:
        assert resp.status == 200
    await eventually(
        lambda: shared_b.policies.live.generation == 2, "replica B to follow A's reload", seconds=30
    )

    async def both_reported() -> bool:
        async with session.get(f"{b}/admin/reloads", headers=ADMIN) as resp:
            reports = (await resp.json())["replicas"]
        return len(reports) == 2 and all(r["generation"] == 2 for r in reports.values())

    await eventually(both_reported, "both replicas to report generation 2", seconds=30)
