"""What one path's requests measured, and its summary: quantiles, the latency added over direct, and
how the tables print them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One streamed request as the client saw it; times in seconds from sending the request."""

    ttfb: float | None = None
    ttft: float | None = None
    last: float | None = None  # the last content chunk
    gaps: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    chunks: int = 0
    ok: bool = False
    done: bool = False  # False: still streaming when the run was cut
    # The upstream's own time for the answer (its schedule for the last token); None when unpaced.
    scheduled: float | None = None


@dataclass
class PathRun:
    """All requests of one path at one concurrency, and the CPU time spent while they ran."""

    path: str
    concurrency: int
    seconds: float
    cpu_seconds: float  # the server's
    samples: list[Sample]
    client_cpu_seconds: float = 0.0  # the load client's (this process)
    busy: float | None = None  # share of all CPUs of the machine busy meanwhile, from /proc/stat
    upstream_cpu_seconds: float | None = None  # the upstream's, when it is not the server measured

    def summary(self) -> dict[str, Any]:
        chunks = sum(s.chunks for s in self.samples)
        ms = 1000.0
        ttfb = [s.ttfb * ms for s in self.samples if s.ttfb is not None]
        ttft = [s.ttft * ms for s in self.samples if s.ttft is not None]
        gaps = [g * ms for s in self.samples for g in s.gaps]
        lags = [g * ms for s in self.samples for g in s.lags]
        slowdowns = [
            s.last / s.scheduled for s in self.samples if s.ok and s.last is not None and s.scheduled
        ]
        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "errors": sum(s.done and not s.ok for s in self.samples),
            "cut": sum(not s.done for s in self.samples),
            "chunks": chunks,
            "ttfb_ms": _quantiles(ttfb),
            "ttft_ms": _quantiles(ttft),
            "gap_ms": _quantiles(gaps),
            "lag_ms": _quantiles(lags),
            "slowdown": _quantiles(slowdowns),
            "seconds": self.seconds,
            "chunks_per_s": chunks / self.seconds if self.seconds else None,
            "cpu_s_per_1k_chunks": self.cpu_seconds / chunks * 1000 if chunks else None,
            "client_cpu_s": self.client_cpu_seconds,
            "upstream_cpu_s": self.upstream_cpu_seconds,
            "machine_busy": self.busy,
            "other_load": self._other_load(),
        }

    def _other_load(self) -> float | None:
        """Share of the machine busy with something other than this run: other people's work (noise)."""
        if self.busy is None or not self.seconds:
            return None
        ours = self.cpu_seconds + self.client_cpu_seconds + (self.upstream_cpu_seconds or 0.0)
        capacity = (os.cpu_count() or 1) * self.seconds
        return max(0.0, self.busy - ours / capacity)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values`, linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}


def added_latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Proxy minus direct at the same concurrency, for TTFB, TTFT, inter-chunk gap and lag (ms)."""
    direct = {r["concurrency"]: r for r in rows if r["path"] == "direct"}
    added = []
    for row in rows:
        base = direct.get(row["concurrency"])
        if row["path"] == "direct" or base is None:
            continue
        entry: dict[str, Any] = {"path": row["path"], "concurrency": row["concurrency"]}
        for metric in ("ttfb_ms", "ttft_ms", "gap_ms", "lag_ms"):
            entry[metric] = {q: _minus(row[metric][q], base[metric][q]) for q in ("p50", "p99")}
        added.append(entry)
    return added


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def format_pair(values: dict[str, float | None], signed: bool = False) -> str:
    """`p50 / p99` of a quantile pair, – for a missing one."""
    spec = "+.2f" if signed else ".2f"
    return " / ".join("–" if values[q] is None else format(values[q], spec) for q in ("p50", "p99"))


def format_number(value: float | None, spec: str) -> str:
    """`value` in `spec`, – for None."""
    return "–" if value is None else format(value, spec)
