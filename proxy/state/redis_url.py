"""A Redis URL, in any of the shapes production runs Redis in, turned into one redis-py client.

    redis://[[user]:password@]host[:port][/db]       one server (redis-py's own forms, as are the next two)
    rediss://...[?ssl_ca_certs=/etc/ca.pem]          the same over TLS; a private CA is named in the query
    unix://[[user]:password@]/run/redis.sock[?db=N]  a local socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db][?sentinel_password=P]
                                                     the master Sentinel names for SERVICE, followed
                                                     across failovers
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                     Redis Cluster, from any of its nodes (db 0 only)
    rediss+sentinel://, rediss+cluster://            over TLS, to every node (Sentinels included)

The user and password authenticate to the data nodes (master, replicas, cluster nodes); Sentinels that
have a password of their own get `sentinel_password`. Every other query option is redis-py's
connection option of that name (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, ...).

Errors name the part that is wrong, never the URL: it may carry a password.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel

from proxy.core.config import REDIS_SCHEMES
from proxy.core.errors import ConfigError

DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
Shape = Literal["server", "sentinel", "cluster"]
Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class RedisTarget:
    """What a URL names: the shape, the nodes to ask first, and the data nodes' connection options."""

    shape: Shape
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None  # Sentinel's name for the master
    options: dict[str, Any] = field(default_factory=dict)  # redis-py connection keyword arguments
    sentinel_password: str | None = None


def parse(url: str) -> RedisTarget:
    """The target `url` names; `ValueError` (without the URL) when it names none."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"must start with {', '.join(s + '://' for s in REDIS_SCHEMES)}")
    if "+" not in scheme:
        return RedisTarget("server")
    base, _, shape = scheme.partition("+")
    # The node list is not one host: split it off before anything parses the rest as a URL.
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = tuple(_node(h, DEFAULT_PORTS[shape]) for h in hosts.split(","))
    path, _, query = tail.partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    sentinel_password = next((v for k, v in params if k == "sentinel_password"), None)
    params = [(k, v) for k, v in params if k != "sentinel_password"]
    parts = [unquote(p) for p in path.split("/") if p]
    service = None
    if shape == "sentinel":
        if not parts:
            raise ValueError("names no service: redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB]")
        service, parts = parts[0], parts[1:]
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError("has a path that is not a database number")
    if shape == "cluster" and parts and parts[0] != "0":
        raise ValueError("names a database other than 0, which Redis Cluster does not have")
    # redis-py reads the credentials, database, TLS and query options from a one-host URL of the same.
    host, port = nodes[0]
    one = f"{base}://{userinfo}{at}{_netloc(host, port)}/{parts[0] if parts else 0}"
    options: dict[str, Any] = dict(parse_url(one + (f"?{urlencode(params)}" if params else "")))
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    for key in ("host", "port"):
        options.pop(key, None)
    if shape == "cluster":
        options.pop("db", None)
    return RedisTarget(
        "sentinel" if shape == "sentinel" else "cluster", nodes, service, options, sentinel_password
    )


def check(url: str) -> None:
    """Raise `ConfigError` (naming the part that is wrong, not the URL) unless `url` names a target."""
    try:
        parse(url)
    except ValueError as exc:
        raise ConfigError(f"the Redis URL {exc}") from None


def connect(url: str, **client_options: Any) -> tuple[aioredis.Redis | RedisCluster, Closer]:
    """A client for `url`, with `client_options` (timeouts, retry, decoding) for every node; and what
    closes it and every connection it opened (a Sentinel's own included)."""
    target = parse(url)
    if target.shape == "server":
        client = aioredis.Redis.from_url(url, **client_options)
        return client, client.aclose
    options = {**target.options, **client_options}
    if target.shape == "cluster":
        nodes = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **options)
        return nodes, nodes.aclose
    # Sentinels speak TLS when the data nodes do, but take only their own password.
    sentinel_options = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl")) or k == "retry"}
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
    assert target.service is not None
    master = sentinel.master_for(target.service)

    async def close() -> None:
        await master.aclose()
        for watcher in sentinel.sentinels:
            await watcher.aclose()

    return master, close


def _node(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise ValueError("has an empty host in its node list")
    split = urlsplit(f"//{text}")
    try:
        port = split.port
    except ValueError:
        raise ValueError("has a node whose port is not a number from 0 to 65535") from None
    if not split.hostname:
        raise ValueError("has an empty host in its node list")
    return split.hostname, port or default_port


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
