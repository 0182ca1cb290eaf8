"""Prometheus metrics, named as DESIGN.md fixes them. One registry per app, so tests can read values.

Labels stay low-cardinality: policy and route come from config and the router, categories from the
policies' detectors, model names are bounded by `MAX_MODELS` per process (the rest are counted as
"other"), and never a user, key or request id.

Several worker processes: prometheus-client chooses its storage when it is imported, from
`PROMETHEUS_MULTIPROC_DIR`. When that is set, every process writes its values to files in that
directory, and `exposition()` reads all of them, so any worker's `/metrics` shows the sum over workers.
The directory must be emptied before the workers start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MAX_MODELS = 32
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RELOAD_RESULTS = ("ok", "error")
AUDIT_RESULTS = ("written", "duplicate", "dropped")
# The kinds each error counter is labelled with (see `proxy.server.relay` and `proxy.server.choice`):
# every series exists at 0 from the start, so a dashboard reads 0 rather than "no data".
UPSTREAM_ERROR_KINDS = ("UpstreamError", "UpstreamTimeout", "InBandError")
GUARD_FAILURE_KINDS = ("timeout", "GuardError", "GuardOverloaded", "error")
FAIL_MODES = ("open", "closed")
DISCONNECT_REASONS = ("left", "stalled")  # left mid-stream; dropped for not reading

# Buckets fitted to each quantity, so that p50 and p99 fall between two bounds that mean something.
# Reset positions are guard tokens into the attempt: early ones mean the prompt was the problem, late
# ones that the answer drifted; the bounds double up to the longest answers.
RESET_POSITION_BUCKETS = (0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# A verdict takes about a millisecond on a GPU, tens on a CPU; the top bounds reach the policies' guard
# timeouts (1-2 s by default), past which a verdict counts as a guard failure instead. Detectors judged
# inline (the marker, patterns) take microseconds and are not timed.
GUARD_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# A hold-back of 8-40 tokens at 10-100 tokens/s from the upstream: about 0.1 s to 4 s; a hold-back of
# 0 shows the guard's latency alone.
HOLDBACK_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Read where prometheus-client reads it: the two must agree on whether values live in files.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        r = self.registry
        self.streams = Counter(
            "backtrack_streams_total", "Responses handled (streamed or not)",
            ["policy", "route", "model"], registry=r,
        )  # fmt: skip
        self.resets = Counter(
            "backtrack_resets_total", "Resets and flags, by what triggered them and what was done",
            ["policy", "route", "model", "category", "action"], registry=r,
        )  # fmt: skip
        self.reset_position = Histogram(
            "backtrack_reset_position_tokens", "Guard tokens into the response where a reset or flag came",
            ["policy"], buckets=RESET_POSITION_BUCKETS, registry=r,
        )  # fmt: skip
        self.guard_latency = Histogram(
            "backtrack_guard_latency_seconds", "Time from handing text to an awaited guard to its verdict",
            ["policy"], buckets=GUARD_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.holdback_delay = Histogram(
            "backtrack_holdback_delay_seconds", "Time text spends in the hold-back buffer before release",
            ["policy"], buckets=HOLDBACK_DELAY_BUCKETS, registry=r,
        )  # fmt: skip
        self.guard_batch_size = Histogram(
            "backtrack_guard_batch_size", "Streams scored together in one guard forward pass",
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "backtrack_upstream_errors_total", "Upstream failures: refused, timed out, 4xx/5xx, malformed",
            ["route", "kind"], registry=r,
        )  # fmt: skip
        self.guard_failures = Counter(
            "backtrack_guard_failures_total", "Verdicts that did not come (timeout, overload, error)",
            ["policy", "kind", "fail_mode"], registry=r,
        )  # fmt: skip
        self.fail_open = Counter(
            "backtrack_fail_open_total", "Times text was released unjudged because the guard failed and "
            "the policy fails open", ["policy"], registry=r,
        )  # fmt: skip
        self.policy_reloads = Counter(
            "backtrack_policy_reloads_total", "Policy reloads, by whether the new policies were taken",
            ["result"], registry=r,
        )  # fmt: skip
        # Both results exist from the start, so a rule on errors has a series to read before any reload.
        for result in RELOAD_RESULTS:
            self.policy_reloads.labels(result)
        # livesum: across workers the gauge adds up, and a worker that exits takes its streams with it.
        self.active_streams = Gauge(
            "backtrack_active_streams", "Responses in flight", ["route"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.client_disconnects = Counter(
            "backtrack_client_disconnects_total", "Streams whose client left, or was dropped for not "
            "reading; their upstream requests are closed", ["route", "reason"], registry=r,
        )  # fmt: skip
        self._models: set[str] = set()

    def init_routes(self, routes: Iterable[str]) -> None:
        """Create every route's error series at 0."""
        for route in routes:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(route, kind)
            for reason in DISCONNECT_REASONS:
                self.client_disconnects.labels(route, reason)

    def init_policies(self, policies: Iterable[str]) -> None:
        """Create every policy's guard-failure series at 0 (both fail modes: a reload may change it)."""
        for policy in policies:
            for kind in GUARD_FAILURE_KINDS:
                for mode in FAIL_MODES:
                    self.guard_failures.labels(policy, kind, mode)

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric: of all workers together in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        # prometheus_client.multiprocess has no annotations.
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    def close(self) -> None:
        """This process stops serving: its live gauges leave the multiprocess sums."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


class StoreMetrics:
    """Shared state's metrics (`proxy.state.shared`): registered on an app's registry when its store opens.

    Documented with the store, in the README's "Shared state (Redis)" section.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.store_up = Gauge(
            "backtrack_store_up", "1 while the shared-state store (Redis, or memory) answers, else 0",
            registry=registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.audit_spooled = Gauge(
            "backtrack_audit_spool_events", "Audit events waiting in the local spool for the store",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.audit_events = Counter(
            "backtrack_audit_events_total", "Audit events by fate: written to the store, found there "
            "already (a retry), or dropped from a full spool", ["result"], registry=registry,
        )  # fmt: skip
        for result in AUDIT_RESULTS:
            self.audit_events.labels(result)
        self.strike_escalations = Counter(
            "backtrack_strike_escalations_total", "Requests escalated by their tenant's strikes, by the "
            "policy that had them and the outcome (escalate, reject)", ["policy", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.fleet_reloads = Counter(
            "backtrack_fleet_reloads_total", "Reloads this replica made because another one reloaded",
            ["result"], registry=registry,
        )  # fmt: skip
        for result in RELOAD_RESULTS:
            self.fleet_reloads.labels(result)


# A remote judge answers in tens of milliseconds on a GPU next door, in seconds from a busy API; the top
# bounds reach the longest per-attempt timeouts a detector allows.
JUDGE_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
JUDGE_FAILURE_KINDS = ("timeout", "unreachable", "bad_answer")


class JudgeMetrics:
    """Remote judges' metrics (`proxy.server.judges`), per policy and detector (a detector's name is
    from the policy file). Registered on an app's registry with its guards; documented in the README's
    "Remote judges" section."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "backtrack_judge_calls_total", "Calls to a remote judge (each attempt), by policy and detector",
            ["policy", "detector"], registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "backtrack_judge_latency_seconds", "Time from sending a remote judge a call to its answer",
            ["policy", "detector"], buckets=JUDGE_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.failures = Counter(
            "backtrack_judge_failures_total", "Remote judge calls that gave no verdict after their retries",
            ["policy", "detector", "kind"], registry=registry,
        )  # fmt: skip
        self.verdicts = Counter(
            "backtrack_judge_verdicts_total", "Remote judges' verdicts (safe, unsafe) and cascade outcomes "
            "(confirmed, cleared)", ["policy", "detector", "verdict"], registry=registry,
        )  # fmt: skip

    def init_detector(self, policy: str, detector: str) -> None:
        """Create a detector's failure series at 0."""
        for kind in JUDGE_FAILURE_KINDS:
            self.failures.labels(policy, detector, kind)
