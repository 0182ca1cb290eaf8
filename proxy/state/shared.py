"""What the replicas share, wired into the app: audit events, strikes and fleet-wide policy reloads.

`shared_ctx` opens the store (`proxy.state.store`: Redis when `redis.url` or `BACKTRACK_REDIS_URL` names one,
else memory) and runs three background tasks beside the handlers:

    health   pings the store every `redis.health_seconds`; `backtrack_store_up` and `/readyz` show the
             result, and the audit spool drains again once an outage ends
    audit    drains the spool of audit events into the store, in order (`proxy.state.audit`)
    fleet    listens on the reload channel, and reads the latest announcement when the channel is
             quiet (to catch one missed while disconnected): a reload another replica made is made
             here too

Failure modes: with the store down the proxy serves as before. Strikes fail open (a strike that cannot
be counted is not counted; a count that cannot be read does not escalate), audit events wait in the
spool, and a reload made here during the outage is not announced (the others follow the next one).

Strikes: each reset of a tenant's request (not a flag, not a guard outage) is a strike, recorded under
the tenant's name at the time it happened. When the policy chosen for a tenant's request has `strikes`,
the tenant's strikes within its `window_seconds` are counted; at `limit` the request gets
`escalate_to`, or a 429 whose `Retry-After` says when enough strikes will have left the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from proxy.core.config import RedisConfig
from proxy.core.detectors import Guard
from proxy.core.engine import GUARD_UNAVAILABLE, Flagged, ResetEvent
from proxy.core.errors import ConfigError, TooManyRequests
from proxy.core.policy import Policy
from proxy.core.selection import Tenant
from proxy.state.audit import AuditLog, RequestInfo, audit_event
from proxy.state.metrics import StoreMetrics
from proxy.state.policies import Live, PolicyRegistry
from proxy.state.store import Store, StoreUnavailable

log = logging.getLogger("backtrack")

FLEET_REASON = "fleet: reloaded by "
STRIKE_READ_TIMEOUT = 0.5  # a slow store must not hold up a request: past this the strike check fails open
CLOSE_FLUSH_TIMEOUT = 5.0


class Shared:
    """The store and what runs on it for one app; see the module docstring."""

    def __init__(
        self, store: Store, metrics: StoreMetrics, policies: PolicyRegistry, config: RedisConfig
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.policies = policies
        self.config = config
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.up = True
        self.audit = AuditLog(store, metrics, config.spool_size, self.mark_down)
        self._pending: set[asyncio.Task[None]] = set()
        self._followed: str | None = None  # the id of the latest reload announcement acted on
        # Set before the tasks are cancelled. Python 3.11's wait_for (which redis-py's reads go through)
        # can swallow a cancellation that lands as its read completes; the loops then end on this.
        self.closing = False
        metrics.store_up.set(1)

    # -- health ----------------------------------------------------------------------------------------

    def mark_down(self, why: str) -> None:
        """The store failed an operation: fail open until the health check sees it answer again."""
        if self.up:
            log.warning("shared state (%s) unavailable, serving without it: %s", self.store.kind, why)
        self.up = False
        self.metrics.store_up.set(0)

    def mark_up(self) -> None:
        """The store answers again: strikes count again and the audit spool drains."""
        if not self.up:
            log.info(
                "shared state (%s) is back; %d audit events to flush", self.store.kind, len(self.audit.spool)
            )
        self.up = True
        self.metrics.store_up.set(1)
        self.audit.resume()

    async def skip_past_reloads(self) -> None:
        """At start the policies are read fresh: earlier announcements need no reload here."""
        with contextlib.suppress(StoreUnavailable):  # then the first one read is followed: harmless
            last = await self.store.last_reload()
            if last is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._followed = str(json.loads(last)["id"])

    async def check(self) -> None:
        """Ping the store once and record the answer."""
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            self.mark_down(str(exc))
        else:
            if not self.up or self.audit.paused:
                self.mark_up()

    async def health(self) -> None:
        """Ping the store every `health_seconds` until closing."""
        while not self.closing:
            await asyncio.sleep(self.config.health_seconds)
            await self.check()

    def status(self) -> dict[str, Any]:
        """For `/readyz`: the backend, whether it answers, and the audit events waiting for it."""
        return {"backend": self.store.kind, "up": self.up, "spooled_events": len(self.audit.spool)}

    # -- audit and strikes ---------------------------------------------------------------------------

    def observer(
        self, live: Live, policy: Policy, info: RequestInfo
    ) -> Callable[[ResetEvent | Flagged], None]:
        """What a `GuardedResponse` calls for each reset and flag of this request."""
        windows = [p.strikes.window_seconds for p in live.policy_set.policies.values() if p.strikes]
        keep = max(windows, default=0.0)  # strikes matter to no policy: none are recorded

        def observe(output: ResetEvent | Flagged) -> None:
            now = time.time()
            event = audit_event(output, info, policy, now)
            self.audit.record(event)
            if (
                isinstance(output, ResetEvent)
                and output.category != GUARD_UNAVAILABLE  # the guard's outage is not the tenant's doing
                and info.tenant is not None
                and keep
                and self.up
            ):
                self._spawn(self._strike(info.tenant, event["id"], now, keep))

        return observe

    async def _strike(self, tenant: str, member: str, at: float, keep: float) -> None:
        try:
            await self.store.add_strike(tenant, member, at, keep)
        except StoreUnavailable as exc:
            self.mark_down(str(exc))
            log.warning("strike against tenant %s not counted (failing open)", tenant)

    async def escalate(
        self, live: Live, tenant: Tenant | None, policy: Policy, guard: Guard
    ) -> tuple[Policy, Guard]:
        """The policy (and guard) the tenant's strikes give it instead; raises `TooManyRequests`."""
        rule = policy.strikes
        if tenant is None or rule is None or not self.up:
            return policy, guard
        now = time.time()
        try:
            times = await asyncio.wait_for(
                self.store.strikes(tenant.name, now - rule.window_seconds), STRIKE_READ_TIMEOUT
            )
        except (StoreUnavailable, TimeoutError) as exc:
            self.mark_down(str(exc) or "strike count timed out")
            return policy, guard
        if len(times) < rule.limit:
            return policy, guard
        if rule.escalate_to is None:
            self.metrics.strike_escalations.labels(policy.name, "reject").inc()
            # Below the limit again once its `len(times) - limit + 1` oldest strikes have left the window.
            leaves = times[len(times) - rule.limit] + rule.window_seconds
            raise TooManyRequests(
                f"Too many unsafe responses for this key: {len(times)} in the last "
                f"{rule.window_seconds:g} s (limit {rule.limit}).",
                retry_after=max(1, math.ceil(leaves - now)),
            )
        self.metrics.strike_escalations.labels(policy.name, "escalate").inc()
        return live.policy_set.policies[rule.escalate_to], live.guards[rule.escalate_to]

    # -- fleet reload --------------------------------------------------------------------------------

    def on_reload(self, reason: str, live: Live, error: ConfigError | None) -> None:
        """A `PolicyRegistry` listener: report every reload; announce the ones made here and taken."""
        from_peer = reason.startswith(FLEET_REASON)
        if from_peer:
            self.metrics.fleet_reloads.labels("ok" if error is None else "error").inc()
        report = {
            "result": "ok" if error is None else "error",
            "generation": live.generation,
            "reason": reason,
            "error": None if error is None else error.message,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        # A refused reload changed nothing here: there is nothing for the others to follow.
        announce = None
        if not from_peer and error is None:
            announce = {"id": uuid.uuid4().hex, "origin": self.replica, "reason": reason}
            self._followed = announce["id"]
        self._spawn(self._report(report, announce))

    async def _report(self, report: dict[str, Any], announce: dict[str, Any] | None) -> None:
        try:
            if announce is not None:
                await self.store.publish_reload(json.dumps(announce))
            await self.store.report_reload(self.replica, json.dumps(report))
        except StoreUnavailable as exc:
            self.mark_down(str(exc))
            log.warning("reload (%s) not reported to the fleet: the store is unavailable", report["reason"])

    async def listen(self) -> None:
        """Follow the other replicas' reloads; resubscribes after an outage.

        Pub/sub keeps nothing for a replica that is not listening at that moment, so each quiet
        `health_seconds` the latest announcement is read as well: a missed one is followed late.
        """
        while not self.closing:
            try:
                sub = await self.store.subscribe_reloads()
            except StoreUnavailable as exc:
                self.mark_down(str(exc))
                await asyncio.sleep(self.config.health_seconds)
                continue
            try:
                while not self.closing:
                    message = await sub.get(timeout=self.config.health_seconds)
                    if message is None:
                        message = await self.store.last_reload()
                    if message is not None:
                        await self._follow(message)
            except StoreUnavailable as exc:
                self.mark_down(str(exc))
            finally:
                await sub.close()
            await asyncio.sleep(self.config.health_seconds)

    async def _follow(self, message: str) -> None:
        try:
            announced = json.loads(message)
            key, origin = str(announced["id"]), str(announced["origin"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on the reload channel")
            return
        if key == self._followed:
            return
        self._followed = key
        if origin != self.replica:
            with contextlib.suppress(ConfigError):  # logged, counted and reported by the store itself
                await self.policies.reload(FLEET_REASON + origin)

    # -- lifetime ------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Wait for the strikes and reports under way (each bounded by the store's timeouts)."""
        await asyncio.gather(*self._pending, return_exceptions=True)
