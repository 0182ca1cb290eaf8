"""`backtrack bench all`'s report as people read it: the markdown tables and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.measure import format_number, format_pair
from bench.suite_summary import PATHS, model_name, rate_label


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def _mark(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def markdown(report: dict[str, Any]) -> str:
    """The report's tables, in markdown."""
    m = report["machine"]
    settings = report["settings"]
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; load average at the end "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg'])}; Python {m['python']}; code at {m['commit']}.",
        f"Command: `{report['command']}`. Guard checkpoint: {settings['checkpoint'] or 'not run'}; "
        f"LiteLLM: {settings['litellm'] or 'not run'}. HTTP part: {settings['http_seconds']:.0f} s.",
        "",
    ]
    added = {(a["rate"], a["path"], a["concurrency"]): a for a in report["added"]}
    for rate in settings["rates"]:
        lines += [
            f"### Upstream {rate_label(rate)}",
            "",
            "| path | streams | requests | errors | cut | chunks | TTFT p50 / p99 | gap p50 / p99 "
            "| added TTFT | added gap | slowest answer / schedule p99 | sustained | server CPU s / 1k chunks "
            "| client CPU s | machine busy (others) | unjudged |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|",
        ]
        for row in (r for r in report["results"] if r["rate"] == rate):
            extra = added.get((rate, row["path"], row["concurrency"]))
            unjudged = row.get("unjudged")
            lines.append(
                f"| {row['path']} | {row['concurrency']} | {row['requests']} | {row['errors']} "
                f"| {row['cut']} | {row['chunks']} "
                f"| {format_pair(row['ttft_ms'])} | {format_pair(row['gap_ms'])} "
                f"| {format_pair(extra['ttft_ms'], signed=True) if extra else ''} "
                f"| {format_pair(extra['gap_ms'], signed=True) if extra else ''} "
                f"| {format_number(row['slowdown']['p99'], '.2f')} | {_mark(row['sustained'])} "
                f"| {format_number(row['cpu_s_per_1k_chunks'], '.3f')} | {row['client_cpu_s']:.1f} "
                f"| {_percent(row['machine_busy'])} ({_percent(row['other_load'])}) "
                f"| {'' if unjudged is None else f'{unjudged:.0f}'} |"
            )
        lines.append("")
    lines += [
        "### Per path",
        "",
        "| path | upstream | peak RSS MB | most streams sustained |",
        "|---|---|--:|--:|",
    ]
    most = report["summary"]["sustained_streams"]
    for peak in report["peaks"]:
        kept = most.get(peak["path"], {})
        if peak["rate"] is None and peak["path"].startswith("litellm"):  # one process serves every rate
            label, shown = "all (one process)", ", ".join(f"{n} at {r}" for r, n in kept.items())
        else:
            label = rate_label(peak["rate"])
            shown = str(kept.get(label, "–"))
        lines.append(f"| {peak['path']} | {label} | {peak['peak_rss_bytes'] / 2**20:.0f} | {shown or '–'} |")
    lines += [
        "",
        "### Ratios (same run)",
        "",
        "| upstream | streams | path | added TTFT p50 ms | vs LiteLLM's added TTFT "
        "| CPU / 1k chunks vs direct | vs LiteLLM's |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for r in report["summary"]["ratios"]:
        lines.append(
            f"| {rate_label(r['rate'])} | {r['concurrency']} | {r['path']} "
            f"| {format_number(r['added_ttft_p50_ms'], '+.2f')} "
            f"| {format_number(r['added_ttft_vs_litellm'], '.3f')} "
            f"| {format_number(r['cpu_vs_direct'], '.2f')} | {format_number(r['cpu_vs_litellm'], '.3f')} |"
        )
    roofline = report.get("guard_roofline")
    if roofline:
        lines += [
            "",
            f"### Guard against its roofline ({roofline['flops_per_token'] / 1e6:.1f} MFLOP/token at context "
            f"{roofline['context']}; matmul {roofline['matmul_flops'] / 1e9:.1f} GFLOP/s on "
            f"{roofline['threads']} threads; {roofline['response_tokens']} tokens per stream, "
            f"{roofline['new_tokens']} per feed)",
            "",
            "| streams | tokens/s | verdict p50 ms | verdict p99 ms | roofline |",
            "|--:|--:|--:|--:|--:|",
        ]
        for row in roofline["rows"]:
            lines.append(
                f"| {row['streams']} | {row['tokens_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['roofline']:.1%} |"
            )
    floors = report.get("wakeup_floor") or []
    if floors:
        lines += [
            "",
            "### Floor: an idle event loop woken once per chunk period",
            "",
            "| chunk period ms | loop | wakeups | CPU s / 1k wakeups |",
            "|--:|---|--:|--:|",
        ]
        for f in floors:
            cpu = f["cpu_s_per_1k_wakeups"]
            lines.append(f"| {f['period_s'] * 1000:g} | {f['loop']} | {f['wakeups']} | {cpu:.3f} |")
    lines += ["", "### Targets", "", "| target | where | measured | met |", "|---|---|--:|:-:|"]
    for t in report["summary"]["targets"]:
        lines.append(f"| {t['target']} | {t['where']} | {t['measured'] or '–'} | {_mark(t['met'])} |")
    lines += [
        "",
        "Times in ms from sending the request. Added = path minus direct at the same upstream and "
        "concurrency, p50 / p99. Server CPU: the proxy's (the replay server's for direct). Unjudged: "
        "`backtrack_fail_open_total` during the run (text released because the guard answered too late). "
        "Cut: still streaming when the run was stopped.",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Latency and CPU vs concurrency, one PNG per upstream rate; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for rate in report["settings"]["rates"]:
        rows = [r for r in report["results"] if r["rate"] == rate]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        panels = [
            ("ttft_ms", "TTFT (ms)"),
            ("gap_ms", "inter-chunk gap (ms)"),
        ]
        for ax, (metric, title) in zip(axes, panels, strict=False):
            for path in PATHS:
                points = [(r["concurrency"], r[metric]) for r in rows if r["path"] == path]
                if not points:
                    continue
                xs = [x for x, _ in points]
                (line,) = ax.plot(xs, [v["p50"] for _, v in points], marker="o", label=path)
                ax.plot(xs, [v["p99"] for _, v in points], marker="x", linestyle="--", color=line.get_color())
            # Gaps run from hundredths of a ms to seconds; symlog keeps a zero gap on the chart.
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0)
            ax.set(title=f"{title}, p50 solid, p99 dashed")
        if rate:
            axes[1].axhline(1000 / rate, color="grey", linewidth=0.8, label="upstream's pace")
        for path in PATHS:
            points = [(r["concurrency"], r["cpu_s_per_1k_chunks"]) for r in rows if r["path"] == path]
            if points:
                axes[2].plot([x for x, _ in points], [v for _, v in points], marker="o", label=path)
        axes[2].set(yscale="log", title="server CPU s / 1,000 chunks")
        levels = sorted({r["concurrency"] for r in rows})
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.minorticks_off()
            ax.set_xlabel("concurrent streams")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"backtrack bench all — upstream {rate_label(rate)}, {report['machine']['nproc']} CPUs")
        fig.tight_layout()
        png = out / f"bench-all-{model_name(rate).removeprefix('replay-')}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written
