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
# The speed issue's targets (#14), checked against this run's numbers. The guard-off ones are for a
# paced upstream, where every chunk arrives on its own and pays the proxy's per-chunk price.
TARGET_RATE = 50.0
TARGET_ADDED_TTFT_MS = {1: 2.0, 16: 2.0, 32: 5.0}  # guard off, by concurrency
TARGET_CPU_SHARE_OF_LITELLM = 0.1
TARGET_GUARD_STREAMS = 32
TARGET_ADDED_GAP_MS = 50.0
TARGET_GUARD_TOKENS_PER_S = 2500.0
TARGET_GUARD_RSS_MB = 500.0


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
    """Each of the issue's targets: what it asks, what this run measured, and whether it was met.

    A target this run did not measure is still listed, as not measured, so none goes unnoticed.
    """
    checks: list[dict[str, Any]] = []

    def check(target: str, where: str | None, measured: str | None, met: bool | None) -> None:
        checks.append({"target": target, "where": where or "not run", "measured": measured, "met": met})

    paced = {r["concurrency"]: r for r in ratios if r["path"] == "backtrack" and r["rate"] == TARGET_RATE}
    for streams, limit in TARGET_ADDED_TTFT_MS.items():
        value = paced[streams]["added_ttft_p50_ms"] if streams in paced else None
        check(
            f"guard off: added TTFT p50 ≤ {limit:g} ms at {streams} streams",
            f"{rate_label(TARGET_RATE)}, {streams} streams" if streams in paced else None,
            None if value is None else f"{value:+.2f} ms",
            None if value is None else value <= limit,
        )
    shares = [(n, r["cpu_vs_litellm"]) for n, r in sorted(paced.items()) if r["cpu_vs_litellm"] is not None]
    measured = " / ".join(f"{v:.3f}" for _, v in shares) + " x" if shares else None
    floor = _floor_share(report)
    if measured is not None and floor is not None:
        measured += f" (an idle loop woken once per chunk: {floor:.3f} x at 1 stream)"
    check(
        f"guard off: CPU / 1k chunks ≤ {TARGET_CPU_SHARE_OF_LITELLM:g} x LiteLLM's",
        f"{rate_label(TARGET_RATE)}, " + ",".join(str(n) for n, _ in shares) + " streams" if shares else None,
        measured,
        all(v <= TARGET_CPU_SHARE_OF_LITELLM for _, v in shares) if shares else None,
    )
    guarded = [r for r in report["results"] if r["path"] == "backtrack+guard" and r["rate"] == TARGET_RATE]
    gaps = {r["concurrency"]: r["added_gap_p99_ms"] for r in ratios
            if r["path"] == "backtrack+guard" and r["rate"] == TARGET_RATE}  # fmt: skip
    good = [
        r["concurrency"]
        for r in guarded
        if r["sustained"]
        and gaps.get(r["concurrency"]) is not None
        and gaps[r["concurrency"]] <= TARGET_ADDED_GAP_MS
    ]
    check(
        f"guard on: ≥ {TARGET_GUARD_STREAMS} streams at {TARGET_RATE:g} tokens/s, "
        f"p99 added gap ≤ {TARGET_ADDED_GAP_MS:g} ms",
        "levels " + ",".join(str(r["concurrency"]) for r in guarded) if guarded else None,
        f"{max(good, default=0)} streams" if guarded else None,
        max(good, default=0) >= TARGET_GUARD_STREAMS if guarded else None,
    )
    roofline = report.get("guard_roofline")
    at = [r for r in roofline["rows"] if r["streams"] == TARGET_GUARD_STREAMS] if roofline else []
    check(
        f"guard ≥ {TARGET_GUARD_TOKENS_PER_S:,.0f} tokens/s at {TARGET_GUARD_STREAMS} streams",
        "in-process scorer" if at else None,
        f"{at[0]['tokens_per_s']:,.0f} tokens/s ({at[0]['roofline']:.0%} of roofline)" if at else None,
        at[0]["tokens_per_s"] >= TARGET_GUARD_TOKENS_PER_S if at else None,
    )
    peaks = [p["peak_rss_bytes"] / 2**20 for p in report["peaks"] if p["path"] == "backtrack+guard"]
    check(
        f"guard on: peak RSS ≤ {TARGET_GUARD_RSS_MB:g} MB",
        "backtrack+guard, every rate" if peaks else None,
        f"{max(peaks):.0f} MB" if peaks else None,
        max(peaks) <= TARGET_GUARD_RSS_MB if peaks else None,
    )
    return checks


def _floor_share(report: dict[str, Any]) -> float | None:
    """The idle-loop floor at the target rate's chunk period (`bench.floor`) over LiteLLM's CPU per 1k
    chunks at one stream: the least CPU ratio a proxy woken once per chunk can have at one stream."""
    floor = next((f for f in report.get("wakeup_floor") or [] if f["rate"] == TARGET_RATE), None)
    litellm = next(
        (r for r in report["results"]
         if r["path"] == "litellm" and r["rate"] == TARGET_RATE and r["concurrency"] == 1),
        None,
    )  # fmt: skip
    if floor is None or litellm is None or not litellm["cpu_s_per_1k_chunks"]:
        return None
    return float(floor["cpu_s_per_1k_wakeups"] / litellm["cpu_s_per_1k_chunks"])
