"""Audit events: what one holds, redacted or kept; the spool that keeps them in order through an outage,
writes none twice and drops only when full; the rows `backtrack audit export` prints."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from proxy.core.engine import Flagged, ResetEvent
from proxy.core.policy import Action, Policy
from proxy.core.selection import Tenant, hash_key
from proxy.server.app import create_app
from proxy.server.keys import SHARED
from proxy.state.audit import AuditLog, RequestInfo, audit_event, export_row, parse_since
from proxy.state.metrics import StoreMetrics
from proxy.state.store import MemoryStore, StoreUnavailable
from tests.harness import MARKED, WORDY, Harness, chat_text, policy

KEY = "sk-SECRET-tenant-key"
TENANT = Tenant(name="acme", key_sha256=[hash_key(KEY)])
INFO = RequestInfo("req-1", "acme", "m", "/v1/chat/completions", "How do I build a bomb?")
RESET = ResetEvent(
    category="weapons", action=Action.REFUSE, score=0.875, detector="patterns", retract_chars=3,
    position=12, discarded="mix the two and pack them into a pipe", policy="test",
)  # fmt: skip
FLAG = Flagged(category="weapons", score=0.5, detector="model", position=4, text="a pipe", policy="test")
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


def value(metrics: StoreMetrics, result: str) -> float:
    return metrics.audit_events.labels(result)._value.get()


def test_a_reset_event_names_the_request_tenant_policy_and_verdict() -> None:
    event = audit_event(RESET, INFO, Policy(name="test", audit="kept"), AT)
    assert event["time"] == "2026-01-02T03:04:05.000+00:00"
    assert {k: event[k] for k in ("request_id", "tenant", "policy", "model", "route")} == {
        "request_id": "req-1", "tenant": "acme", "policy": "test", "model": "m",
        "route": "/v1/chat/completions",
    }  # fmt: skip
    assert {k: event[k] for k in ("kind", "category", "action", "detector", "score", "position")} == {
        "kind": "reset", "category": "weapons", "action": "refuse", "detector": "patterns",
        "score": "0.875", "position": "12",
    }  # fmt: skip
    assert (event["text"], event["prompt"]) == (RESET.discarded, INFO.prompt)
    assert all(isinstance(v, str) for v in event.values())  # what a Redis Stream entry holds


def test_a_redacted_event_keeps_neither_the_text_nor_the_prompt() -> None:
    event = audit_event(RESET, INFO, Policy(name="test"), AT)  # `audit: redacted` is the default
    assert "text" not in event and "prompt" not in event
    assert event["text_chars"] == str(len(RESET.discarded))
    assert "bomb" not in repr(event) and "pipe" not in repr(event)


def test_a_flag_is_an_event_of_kind_flag_with_the_text_it_objected_to() -> None:
    event = audit_event(FLAG, INFO, Policy(name="test", audit="kept"), AT)
    assert (event["kind"], event["action"], event["text"]) == ("flag", "flag", "a pipe")


def test_the_tenant_is_named_never_keyed() -> None:
    info = RequestInfo.of({"Authorization": f"Bearer {KEY}"}, "/v1/completions", TENANT, "m", None)
    event = audit_event(RESET, info, Policy(name="test", audit="kept"), AT)
    assert event["tenant"] == "acme"
    assert KEY not in repr(event) and hash_key(KEY) not in repr(event)


def test_a_plain_client_request_id_is_kept_and_anything_else_replaced() -> None:
    assert RequestInfo.of({"X-Request-Id": "abc-123"}, "/r", None, "m", None).request_id == "abc-123"
    for bad in ("", "has space", "x" * 200, "new\nline"):
        made = RequestInfo.of({"X-Request-Id": bad}, "/r", None, "m", None).request_id
        assert made != bad and len(made) == 32
    assert RequestInfo.of({}, "/r", None, "m", None).tenant is None


def test_an_exported_row_is_in_the_shared_data_schema_then_the_audit_fields() -> None:
    row = export_row(audit_event(RESET, INFO, Policy(name="test", audit="kept"), AT))
    assert list(row)[:8] == [
        "source",
        "id",
        "prompt",
        "response",
        "harmful",
        "category",
        "label_origin",
        "license",
    ]
    assert (row["prompt"], row["response"], row["harmful"]) == (INFO.prompt, RESET.discarded, None)
    assert (row["score"], row["position"], row["tenant"]) == (0.875, 12, "acme")
    redacted = export_row(audit_event(RESET, INFO, Policy(name="test"), AT))
    assert (redacted["prompt"], redacted["response"], redacted["text_chars"]) == (None, None, 37)


def test_since_is_an_iso_time_or_an_age() -> None:
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC).timestamp()
    assert parse_since("2026-01-02T10:00:00Z", now) == datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
    assert parse_since("2026-01-02T10:00:00", now) == datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 1, 2, 11, 30, tzinfo=UTC)
    assert parse_since("1d", now) == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since has value 'yesterday'"):
        parse_since("yesterday", now)


class FlakyStore(MemoryStore):
    """Memory that can be down, and that can lose its reply after writing (as a dropped connection)."""

    def __init__(self) -> None:
        super().__init__(audit_maxlen=1000)
        self.down = False
        self.lose_next_reply = False

    async def append_audit(self, event: Mapping[str, str]) -> bool:
        if self.down:
            raise StoreUnavailable("down")
        written = await super().append_audit(event)
        if self.lose_next_reply:
            self.lose_next_reply = False
            raise StoreUnavailable("connection lost after the write")
        return written


def events(n: int) -> list[dict[str, str]]:
    return [{"id": f"e{i}"} for i in range(n)]


async def stored_ids(store: MemoryStore) -> list[str]:
    return [fields["id"] for _, fields in await store.read_audit(count=10_000)]


async def test_the_spool_writes_events_in_order_and_empties() -> None:
    store, metrics = FlakyStore(), StoreMetrics(CollectorRegistry())
    log = AuditLog(store, metrics, spool_size=100, on_failure=lambda why: None)
    for event in events(5):
        log.record(event)
    assert await log.flush()
    assert await stored_ids(store) == ["e0", "e1", "e2", "e3", "e4"]
    assert not log.spool and value(metrics, "written") == 5


async def test_through_an_outage_the_spool_keeps_events_and_writes_each_once_in_order() -> None:
    store, metrics = FlakyStore(), StoreMetrics(CollectorRegistry())
    failures: list[str] = []
    log = AuditLog(store, metrics, spool_size=100, on_failure=failures.append)
    first, second, third = events(9)[:3], events(9)[3:6], events(9)[6:]
    for event in first:
        log.record(event)
    assert await log.flush()

    store.down = True
    for event in second:
        log.record(event)
    assert not await log.flush()
    assert log.paused and failures == ["down"]
    assert [e["id"] for e in log.spool] == ["e3", "e4", "e5"]

    store.down = False
    store.lose_next_reply = True  # e3 is written, but its acknowledgement is lost: it stays spooled
    assert not await log.flush()
    for event in third:
        log.record(event)
    log.resume()
    assert await log.flush()
    assert await stored_ids(store) == [f"e{i}" for i in range(9)]  # none lost, none twice
    assert value(metrics, "duplicate") == 1


async def test_a_full_spool_drops_its_oldest_events_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    store, metrics = FlakyStore(), StoreMetrics(CollectorRegistry())
    store.down = True
    log = AuditLog(store, metrics, spool_size=3, on_failure=lambda why: None)
    for event in events(5):
        log.record(event)
    assert [e["id"] for e in log.spool] == ["e2", "e3", "e4"]
    assert value(metrics, "dropped") == 2
    assert "audit spool full (3 events): dropped event e0" in caplog.text
    assert metrics.audit_spooled._value.get() == 3


async def test_through_the_proxy_a_flag_and_a_reset_each_become_one_event(harness: Harness) -> None:
    upstream = await harness.replay([WORDY, MARKED])
    flagging = policy(actions={"default": "refuse", "weapons": "flag", "upstream_reset": "continue"})
    app = create_app(harness.settings(upstream, flagging))
    root = await harness.serve(app)
    client = await harness.client(root)
    assert "bomb" in await chat_text(client, WORDY["prompt"])  # flagged, let through
    await chat_text(client, MARKED["prompt"])  # the upstream's own [RESET]
    shared = app[SHARED]
    assert await shared.audit.flush()
    events = [fields for _, fields in await shared.store.read_audit()]
    assert [(e["kind"], e["category"], e["action"]) for e in events] == [
        ("flag", "weapons", "flag"),
        ("reset", "upstream_reset", "continue"),
    ]
    assert {e["tenant"] for e in events} == {""}  # no tenants configured
