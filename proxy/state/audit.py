"""The audit log: every reset and flag as an event in the store, and the export behind `audit export`.

An event is a flat mapping of strings (what a Redis Stream entry holds):

    id          a fresh random id: the store writes an id once, however often it is retried
    time        when the proxy saw it, ISO 8601 UTC
    request_id  the client's X-Request-Id when it sent a usable one, else one made here
    tenant      the tenant's name ("" without tenants); never its key or the key's digest
    policy, model, route, kind ("reset" or "flag"), category, action, detector, score, position
    audit       the policy's `audit`: "kept" stores `text` (the discarded text) and `prompt`;
                "redacted" stores neither, only `text_chars`

Events leave through `AuditLog`, a bounded FIFO spool in front of the store: appends happen in order,
one at a time, and an event leaves the spool only once the store has it. While the store is down the
spool fills; when it comes back the spool drains in order. A full spool drops its oldest event (counted
in `backtrack_audit_events_total{result="dropped"}` and logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.core.engine import Flagged, ResetEvent
from proxy.core.policy import Action, Policy
from proxy.core.selection import Tenant
from proxy.state.metrics import StoreMetrics
from proxy.state.store import PAGE, Store, StoreUnavailable

log = logging.getLogger("backtrack")

SOURCE = "backtrack_audit"
LABEL_ORIGIN = "backtrack guard verdict, unreviewed"
LICENSE = "private: your own traffic"
MAX_FIELD_CHARS = 200  # model names and request ids come from clients: stored, but not without bound
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class RequestInfo:
    """What an event says about the request it came from."""

    request_id: str
    tenant: str | None
    model: str
    route: str
    prompt: str | None

    @classmethod
    def of(
        cls, headers: Mapping[str, str], route: str, tenant: Tenant | None, model: str, prompt: str | None
    ) -> RequestInfo:
        """The request's info; its id is the client's X-Request-Id when that is a plain token."""
        given = headers.get("X-Request-Id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        return cls(rid, tenant.name if tenant is not None else None, model, route, prompt)


def audit_event(output: ResetEvent | Flagged, info: RequestInfo, policy: Policy, at: float) -> dict[str, str]:
    """The event for one reset or flag, with its text kept or redacted as the policy says."""
    reset = isinstance(output, ResetEvent)
    text = output.discarded if isinstance(output, ResetEvent) else output.text
    kept = policy.audit == "kept"
    event = {
        "id": uuid.uuid4().hex,
        "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
        "request_id": info.request_id,
        "tenant": info.tenant or "",
        "policy": output.policy,
        "model": info.model[:MAX_FIELD_CHARS],
        "route": info.route,
        "kind": "reset" if reset else "flag",
        "category": output.category,
        "action": output.action.value if isinstance(output, ResetEvent) else Action.FLAG.value,
        "detector": output.detector,
        "score": repr(output.score),
        "position": str(output.position),
        "audit": policy.audit,
        "text_chars": str(len(text)),
    }
    if kept:
        event["text"] = text
        event["prompt"] = info.prompt or ""
    return event


class AuditLog:
    """The bounded spool in front of the store; `run` drains it, in order, while the store answers."""

    def __init__(
        self, store: Store, metrics: StoreMetrics, spool_size: int, on_failure: Callable[[str], None]
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.spool: deque[dict[str, str]] = deque()
        self.spool_size = spool_size
        self.on_failure = on_failure
        self.paused = False  # the store failed; `resume` (the health check) lets the spool drain again
        self.closing = False  # `run` ends: see `stop`
        self._wake = asyncio.Event()

    def record(self, event: dict[str, str]) -> None:
        """Queue an event; never blocks and never fails (a full spool drops its oldest)."""
        if len(self.spool) >= self.spool_size:
            dropped = self.spool.popleft()
            self.metrics.audit_events.labels("dropped").inc()
            log.error("audit spool full (%d events): dropped event %s", self.spool_size, dropped["id"])
        self.spool.append(event)
        self.metrics.audit_spooled.set(len(self.spool))
        self._wake.set()

    def resume(self) -> None:
        """The store answers again: drain the spool."""
        self.paused = False
        self._wake.set()

    def stop(self) -> None:
        """End `run` (also when a cancellation was lost inside the store client)."""
        self.closing = True
        self._wake.set()

    async def run(self) -> None:
        """Drain the spool whenever there is something in it and the store is not known to be down."""
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            if not self.paused and not self.closing:
                await self.flush()

    async def flush(self) -> bool:
        """Write spooled events in order until the spool is empty (True) or the store fails (False)."""
        while self.spool:
            event = self.spool[0]
            try:
                written = await self.store.append_audit(event)
            except StoreUnavailable as exc:
                self.paused = True
                self.on_failure(str(exc))
                return False
            # A full spool may have dropped this very event while it was being written.
            if self.spool and self.spool[0] is event:
                self.spool.popleft()
            self.metrics.audit_events.labels("written" if written else "duplicate").inc()
            self.metrics.audit_spooled.set(len(self.spool))
        return True


# -- export ------------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float) -> datetime:
    """`--since`: an ISO 8601 time (UTC unless it says otherwise) or an age such as 30m, 12h, 7d."""
    relative = _RELATIVE.fullmatch(value.strip())
    if relative:
        seconds = float(relative.group(1)) * _UNITS[relative.group(2)]
        return datetime.fromtimestamp(now, UTC) - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since has value {value!r}. Not an ISO 8601 time nor an age like 30m, 12h, 7d"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def export_row(event: Mapping[str, str]) -> dict[str, Any]:
    """An event as a row of the shared data schema, followed by its audit fields.

    `harmful` is null: the guard's verdict is not a label until someone reviews it.
    """
    kept = event.get("audit") == "kept"
    return {
        "source": SOURCE,
        "id": event["id"],
        "prompt": (event.get("prompt") or None) if kept else None,
        "response": event.get("text") if kept else None,
        "harmful": None,
        "category": event["category"],
        "label_origin": LABEL_ORIGIN,
        "license": LICENSE,
        "time": event["time"],
        "request_id": event["request_id"],
        "tenant": event["tenant"] or None,
        "policy": event["policy"],
        "model": event["model"],
        "route": event["route"],
        "kind": event["kind"],
        "action": event["action"],
        "detector": event["detector"],
        "score": float(event["score"]),
        "position": int(event["position"]),
        "audit": event["audit"],
        "text_chars": int(event["text_chars"]),
    }


async def export(store: Store, since: datetime | None, write: Callable[[str], object]) -> int:
    """Write every event at or after `since` as one JSON line; returns how many."""
    count = 0
    after: str | None = None
    while True:
        page = await store.read_audit(after, PAGE)
        for entry_id, event in page:
            after = entry_id
            # Spooled events reach the stream late, so the stream's own order is not time order.
            if since is not None and datetime.fromisoformat(event["time"]) < since:
                continue
            write(json.dumps(export_row(event), ensure_ascii=False) + "\n")
            count += 1
        if len(page) < PAGE:
            return count
