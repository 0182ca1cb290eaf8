"""Prometheus metrics, named as DESIGN.md fixes them. One registry per app, so tests can read values.

Labels stay low-cardinality: policy and route come from config, model names are bounded by
`MAX_MODELS` (the rest are counted as "other"), and never a user, key or request id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_MODELS = 32


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.streams = Counter(
            "backtrack_streams_total", "Responses handled (streamed or not)",
            ["policy", "route", "model"], registry=r,
        )  # fmt: skip
        self.resets = Counter(
            "backtrack_resets_total", "Resets and flags, by what triggered them and what was done",
            ["policy", "route", "model", "category", "action"], registry=r,
        )  # fmt: skip
        self.guard_latency = Histogram(
            "backtrack_guard_latency_seconds", "Time from handing text to the guard to its verdict",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r,
        )  # fmt: skip
        self.holdback_delay = Histogram(
            "backtrack_holdback_delay_seconds", "Time text spends in the hold-back buffer before release",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r,
        )  # fmt: skip
        self.guard_batch_size = Histogram(
            "backtrack_guard_batch_size", "Streams scored together in one guard forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "backtrack_upstream_errors_total", "Upstream failures: refused, timed out, 4xx/5xx, malformed",
            ["route", "kind"], registry=r,
        )  # fmt: skip
        self.guard_failures = Counter(
            "backtrack_guard_failures_total", "Verdicts that did not come (timeout, overload, error)",
            ["policy", "kind", "fail_mode"], registry=r,
        )  # fmt: skip
        self.active_streams = Gauge("backtrack_active_streams", "Responses in flight", ["route"], registry=r)
        self._models: set[str] = set()

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"
