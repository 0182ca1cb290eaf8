"""What a `backtrack bench all` run's rows add up to: which paced runs kept up, the ratios to direct and
to LiteLLM, and the issue's targets against this run's numbers. Also the names of its paths and rates.
"""

from __future__ import annotations

from typing import Any

# An answer may end this much later than the upstream's schedule and still count as keeping pace.
SUSTAINED_SLOWDOWN = 1.10
PATHS = ("direct", "backtrack", "backtrack+guard", "litellm", "litellm+guard")
# The LiteLLM path each Backtrack path is compared with in the ratios (LiteLLM paths get none).
LITELLM_PEER = {"backtrack": "litellm", "backtrack+guard": "litellm+guard"}
# The targets, checked against this run's numbers.
TARGET_ADDED_TTFT_MS = 2.0
TARGET_CPU_SHARE_OF_LITELLM = 0.1
TARGET_GUARD_STREAMS = 32
TARGET_GUARD_RATE = 50.0
TARGET_ADDED_GAP_MS = 50.0
TARGET_ROOFLINE = 0.30


def rate_label(rate: float | None) -> str:
    """How the tables name an upstream rate."""
    return f"{rate:g} tokens/s" if rate else "unthrottled"


def model_name(rate: float | None) -> str:
    """The model name LiteLLM serves a rate's replay-upstream under (and the plots' file names)."""
    return f"replay-{rate:g}tps" if rate else "replay-unthrottled"


def sustained(row: dict[str, Any]) -> bool | None:
    """Whether a paced run kept every stream at the upstream's rate (None: unthrottled, no rate to keep)."""
    if not row["rate"]:
        return None
    slowdown = row["slowdown"]["p99"]
    return (
        row["errors"] == 0
        and row["cut"] == 0
        and not row.get("unjudged")
        and slowdown is not None
        and slowdown <= SUSTAINED_SLOWDOWN
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Sustained streams, ratios to direct and to LiteLLM, and the issue's targets, all from this run."""
    results = report["results"]
    added = {(a["rate"], a["path"], a["concurrency"]): a for a in report["added"]}
    cell = {(r["rate"], r["path"], r["concurrency"]): r for r in results}
    for row in results:
        row["sustained"] = sustained(row)

    most: dict[str, dict[str, int | None]] = {}
    for rate in report["settings"]["rates"]:
        if not rate:
            continue
        for path in PATHS:
            levels = [r["concurrency"] for r in results if r["rate"] == rate and r["path"] == path]
            if levels:
                ok = [
                    r["concurrency"]
                    for r in results
                    if r["rate"] == rate and r["path"] == path and r["sustained"]
                ]
                most.setdefault(path, {})[rate_label(rate)] = max(ok, default=0)

    ratios = []
    for (rate, path, concurrency), row in cell.items():
        if path == "direct":
            continue
        # Like for like: Backtrack against LiteLLM; Backtrack's guard against LiteLLM's hook with it.
        peer = LITELLM_PEER.get(path)
        direct, litellm = cell.get((rate, "direct", concurrency)), cell.get((rate, peer, concurrency))
        extra = added.get((rate, path, concurrency))
        litellm_extra = added.get((rate, peer, concurrency))
        cpu = row["cpu_s_per_1k_chunks"]
        ratios.append({
            "rate": rate, "path": path, "concurrency": concurrency,
            "added_ttft_p50_ms": extra["ttft_ms"]["p50"] if extra else None,
            "added_gap_p99_ms": extra["gap_ms"]["p99"] if extra else None,
            "cpu_vs_direct": _ratio(cpu, direct["cpu_s_per_1k_chunks"]) if direct else None,
            "cpu_vs_litellm": _ratio(cpu, litellm["cpu_s_per_1k_chunks"]) if litellm else None,
            "added_ttft_vs_litellm": _ratio(
                extra["ttft_ms"]["p50"] if extra else None,
                litellm_extra["ttft_ms"]["p50"] if litellm_extra else None,
            ),
        })  # fmt: skip
    return {"sustained_streams": most, "ratios": ratios, "targets": targets(report, ratios)}


def targets(report: dict[str, Any], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of the issue's targets: what it asks, what this run measured, and whether it was met."""
    checks: list[dict[str, Any]] = []
    marker = [r for r in ratios if r["path"] == "backtrack"]
    for r in marker:
        where = f"{rate_label(r['rate'])}, {r['concurrency']} streams"
        value = r["added_ttft_p50_ms"]
        checks.append({
            "target": f"guard off: added TTFT p50 ≤ {TARGET_ADDED_TTFT_MS:g} ms", "where": where,
            "measured": None if value is None else f"{value:+.2f} ms",
            "met": None if value is None else value <= TARGET_ADDED_TTFT_MS,
        })  # fmt: skip
    for r in marker:
        value = r["cpu_vs_litellm"]
        checks.append({
            "target": f"guard off: CPU / 1k chunks ≤ {TARGET_CPU_SHARE_OF_LITELLM:g} x LiteLLM's",
            "where": f"{rate_label(r['rate'])}, {r['concurrency']} streams",
            "measured": None if value is None else f"{value:.3f} x",
            "met": None if value is None else value <= TARGET_CPU_SHARE_OF_LITELLM,
        })  # fmt: skip
    # A target this run did not measure is still listed, as not measured, so none goes unnoticed.
    guarded = [
        r for r in report["results"] if r["path"] == "backtrack+guard" and r["rate"] == TARGET_GUARD_RATE
    ]
    gaps = {r["concurrency"]: r["added_gap_p99_ms"] for r in ratios
            if r["path"] == "backtrack+guard" and r["rate"] == TARGET_GUARD_RATE}  # fmt: skip
    good = [
        r["concurrency"]
        for r in guarded
        if r["sustained"]
        and gaps.get(r["concurrency"]) is not None
        and gaps[r["concurrency"]] <= TARGET_ADDED_GAP_MS
    ]
    checks.append({
        "target": f"guard on: ≥ {TARGET_GUARD_STREAMS} streams at {TARGET_GUARD_RATE:g} tokens/s, "
                  f"p99 added gap ≤ {TARGET_ADDED_GAP_MS:g} ms",
        "where": "levels " + ",".join(str(r["concurrency"]) for r in guarded) if guarded else "not run",
        "measured": f"{max(good, default=0)} streams" if guarded else None,
        "met": max(good, default=0) >= TARGET_GUARD_STREAMS if guarded else None,
    })  # fmt: skip
    roofline = report.get("guard_roofline")
    at = [r for r in roofline["rows"] if r["streams"] == TARGET_GUARD_STREAMS] if roofline else []
    checks.append({
        "target": f"guard ≥ {TARGET_ROOFLINE:.0%} of roofline at {TARGET_GUARD_STREAMS} streams",
        "where": "in-process scorer" if at else "not run",
        "measured": f"{at[0]['roofline']:.1%}" if at else None,
        "met": at[0]["roofline"] >= TARGET_ROOFLINE if at else None,
    })  # fmt: skip
    return checks
