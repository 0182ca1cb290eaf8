"""Shared state behind one small interface, with two backends: in-process memory and Redis.

What replicas share (DESIGN.md, State):

    audit      an append-only log of resets and flags, bounded in length; an append is idempotent on
               the event's `id`, so a retry after a lost reply never writes an event twice
    strikes    per tenant, the times of its recent resets (a sliding window read by `strikes`)
    reloads    a channel on which a replica announces a policy reload, the latest announcement (for a
               replica that missed it while disconnected), and each replica's latest reload result

`MemoryStore` is the embedded default: one process, nothing to run. `RedisStore` keeps the audit log in
a Redis Stream (XADD with MAXLEN ~), strikes in one sorted set per tenant with a TTL, reloads on a
pub/sub channel and results in a hash, on one server, a Sentinel-managed master or a Cluster (the URL
says which: `proxy.state.redis_url`). Every redis-py error is translated here, once, into
`StoreUnavailable`; callers decide what an outage means for them (strikes fail open, audit spools).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from proxy.state.redis_url import check, connect

# How long an event id is remembered for deduplication: longer than any outage the spool rides out.
DEDUPE_SECONDS = 7 * 24 * 3600
PAGE = 1000


class StoreUnavailable(Exception):
    """The store could not be reached or answered with an error; the operation did not happen."""


AuditEntry = tuple[str, dict[str, str]]  # (the store's id for the entry, the event's fields)


class Subscription(Protocol):
    async def get(self, timeout: float) -> str | None:
        """The next message, or None when none came within `timeout` seconds."""
        ...

    async def close(self) -> None:
        """Unsubscribe and release the connection."""
        ...


class Store(Protocol):
    """What the proxy needs from shared state; see the module docstring."""

    kind: str  # "memory" or "redis": for logs and /readyz

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers."""
        ...

    async def append_audit(self, event: Mapping[str, str]) -> bool:
        """Append an event (its `id` field names it); False when that id was appended before."""
        ...

    async def read_audit(self, after: str | None = None, count: int = PAGE) -> list[AuditEntry]:
        """Up to `count` entries, oldest first, after the entry id `after` (None: from the start)."""
        ...

    async def add_strike(self, tenant: str, member: str, at: float, keep_seconds: float) -> None:
        """Record a strike against `tenant` at time `at`; strikes older than `keep_seconds` may go."""
        ...

    async def strikes(self, tenant: str, since: float) -> list[float]:
        """The times of the tenant's strikes at or after `since`, oldest first."""
        ...

    async def publish_reload(self, message: str) -> None:
        """Announce a reload to every subscriber, this process's included; it becomes the latest."""
        ...

    async def last_reload(self) -> str | None:
        """The latest announcement (None before any)."""
        ...

    async def subscribe_reloads(self) -> Subscription:
        """A subscription that receives every message published after this returns."""
        ...

    async def report_reload(self, replica: str, result: str) -> None:
        """Record `replica`'s latest reload result (replacing its previous one)."""
        ...

    async def reload_reports(self) -> dict[str, str]:
        """Every replica's latest reload result."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used after this."""
        ...


# -- in memory ---------------------------------------------------------------------------------------


@dataclass(eq=False)  # compared and hashed by identity: a set holds the live ones
class _MemorySubscription:
    store: MemoryStore
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def get(self, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.store._subscribers.discard(self)


class MemoryStore:
    """The embedded default: everything in this process, nothing shared with other replicas."""

    kind = "memory"

    def __init__(self, audit_maxlen: int) -> None:
        self.audit_maxlen = audit_maxlen
        self._audit: deque[AuditEntry] = deque(maxlen=audit_maxlen)
        # Ids stay remembered after their entry is trimmed, as Redis's dedupe keys do (bounded here).
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._sequence = 0
        self._strikes: dict[str, list[tuple[float, str]]] = {}
        self._subscribers: set[_MemorySubscription] = set()
        self._reports: dict[str, str] = {}
        self._last_reload: str | None = None

    async def ping(self) -> None:
        return None

    async def append_audit(self, event: Mapping[str, str]) -> bool:
        if event["id"] in self._seen:
            return False
        self._seen[event["id"]] = None
        if len(self._seen) > 10 * self.audit_maxlen:
            self._seen.popitem(last=False)
        self._sequence += 1
        self._audit.append((f"{int(time.time() * 1000)}-{self._sequence}", dict(event)))
        return True

    async def read_audit(self, after: str | None = None, count: int = PAGE) -> list[AuditEntry]:
        entries = list(self._audit)
        if after is not None:
            # By sequence number, as Redis compares ids: an id trimmed away still marks a place.
            last = int(after.rpartition("-")[2])
            entries = [e for e in entries if int(e[0].rpartition("-")[2]) > last]
        return entries[:count]

    async def add_strike(self, tenant: str, member: str, at: float, keep_seconds: float) -> None:
        kept = [(t, m) for t, m in self._strikes.get(tenant, []) if t >= at - keep_seconds and m != member]
        self._strikes[tenant] = sorted([*kept, (at, member)])

    async def strikes(self, tenant: str, since: float) -> list[float]:
        return [t for t, _ in self._strikes.get(tenant, []) if t >= since]

    async def publish_reload(self, message: str) -> None:
        self._last_reload = message
        for sub in self._subscribers:
            sub.queue.put_nowait(message)

    async def last_reload(self) -> str | None:
        return self._last_reload

    async def subscribe_reloads(self) -> Subscription:
        sub = _MemorySubscription(self)
        self._subscribers.add(sub)
        return sub

    async def report_reload(self, replica: str, result: str) -> None:
        self._reports[replica] = result

    async def reload_reports(self) -> dict[str, str]:
        return dict(self._reports)

    async def close(self) -> None:
        self._subscribers.clear()


# -- Redis -------------------------------------------------------------------------------------------

# Atomic: the dedupe key and the entry are written together or not at all, so an append retried after
# a lost reply finds the key and writes nothing.
_APPEND = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return false
"""
# The latest announcement and the message together. A script, not MULTI: Redis Cluster clients refuse
# PUBLISH in a transaction; run on the key's node, PUBLISH still reaches subscribers on every node.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[2])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    # A Cluster client reports "no node reachable" as RedisClusterException, which is no RedisError.
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StoreUnavailable(f"redis: {what}: {type(exc).__name__}: {exc}") from exc


class _RedisSubscription:
    def __init__(self, pubsub: Any, channel: str) -> None:
        self.pubsub = pubsub
        self.channel = channel

    async def get(self, timeout: float) -> str | None:
        with _translated("read reload channel"):
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        return None if msg is None else str(msg["data"])

    async def close(self) -> None:
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.pubsub.unsubscribe(self.channel)
        await self.pubsub.aclose()


class RedisStore:
    """Shared by every replica that names the same Redis and key prefix."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str, audit_maxlen: int, timeout: float = 2.0) -> None:
        # One quick retry: an outage is the caller's to handle (spool, fail open), not to wait out here.
        check(url)
        self.client, self._close = connect(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        )
        self.audit_maxlen = audit_maxlen
        # The append script reads both keys: the hash tag puts them in one Cluster slot (the other keys
        # are each read alone, so tenants' strikes spread over the Cluster's nodes).
        self.audit_key = f"{{{prefix}}}:audit"
        self.seen_prefix = f"{{{prefix}}}:audit:seen:"
        self.strikes_prefix = f"{prefix}:strikes:"
        self.reload_channel = f"{prefix}:reload"
        self.last_reload_key = f"{prefix}:reload:last"
        self.reports_key = f"{prefix}:reloads"
        self._append = self.client.register_script(_APPEND)
        self._publish = self.client.register_script(_PUBLISH)

    async def ping(self) -> None:
        with _translated("ping"):
            await self.client.ping()

    async def append_audit(self, event: Mapping[str, str]) -> bool:
        fields = [x for pair in event.items() for x in pair]
        keys = [self.audit_key, self.seen_prefix + event["id"]]
        with _translated("append audit event"):
            added = await self._append(keys=keys, args=[DEDUPE_SECONDS, self.audit_maxlen, *fields])
        return added is not None

    async def read_audit(self, after: str | None = None, count: int = PAGE) -> list[AuditEntry]:
        start = "-" if after is None else f"({after}"
        with _translated("read audit stream"):
            entries: Any = await self.client.xrange(self.audit_key, min=start, max="+", count=count)
        return [(str(entry_id), dict(fields)) for entry_id, fields in entries]

    async def add_strike(self, tenant: str, member: str, at: float, keep_seconds: float) -> None:
        key = self.strikes_prefix + tenant
        with _translated("add strike"):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {member: at})
                pipe.zremrangebyscore(key, "-inf", f"({at - keep_seconds}")
                # The key goes once its newest strike has left every window: idle tenants cost nothing.
                pipe.expire(key, max(1, int(keep_seconds) + 1))
                await pipe.execute()

    async def strikes(self, tenant: str, since: float) -> list[float]:
        with _translated("read strikes"):
            found: Any = await self.client.zrangebyscore(
                self.strikes_prefix + tenant, since, "+inf", withscores=True
            )
        return [float(score) for _, score in found]

    async def publish_reload(self, message: str) -> None:
        with _translated("publish reload"):
            await self._publish(keys=[self.last_reload_key], args=[self.reload_channel, message])

    async def last_reload(self) -> str | None:
        with _translated("read the latest reload"):
            found = await self.client.get(self.last_reload_key)
        return None if found is None else str(found)

    async def subscribe_reloads(self) -> Subscription:
        if isinstance(self.client, RedisCluster):
            # A Cluster's pub/sub picks its node from the slot map, which the first command fills.
            with _translated("subscribe to reloads"):
                await self.client.initialize()
        pubsub = self.client.pubsub()
        try:
            with _translated("subscribe to reloads"):
                await pubsub.subscribe(self.reload_channel)
                # Wait for Redis to confirm: only then does a publish from elsewhere reach us.
                confirmed = await pubsub.get_message(timeout=5.0)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise StoreUnavailable("redis: subscribe to reloads: no confirmation")
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            raise
        return _RedisSubscription(pubsub, self.reload_channel)

    async def report_reload(self, replica: str, result: str) -> None:
        with _translated("report reload"):
            await self.client.hset(self.reports_key, replica, result)

    async def reload_reports(self) -> dict[str, str]:
        with _translated("read reload reports"):
            found = await self.client.hgetall(self.reports_key)
        return {str(k): str(v) for k, v in found.items()}

    async def close(self) -> None:
        await self._close()


def open_store(redis_url: str | None, *, prefix: str, audit_maxlen: int) -> Store:
    """Redis when a URL is configured, else memory. Connects lazily: an outage at start is tolerated."""
    if redis_url is None:
        return MemoryStore(audit_maxlen)
    return RedisStore(redis_url, prefix=prefix, audit_maxlen=audit_maxlen)
