"""`backtrack bench proxy`: a tiny run through the real proxy; it runs, parses and writes its report.

No timing is asserted anywhere: the numbers depend on the machine.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from bench.load import BENCH_RESPONSE_TOKENS, bench_row
from bench.measure import percentile
from proxy.cli.main import main
from proxy.core.tokens import ApproxTokenizer


def children() -> set[str]:
    """Process ids of this process's children that still exist."""
    return {
        pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()
    }


def test_a_tiny_run_through_the_proxy_writes_its_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = children()
    code = main(
        ["bench", "proxy", "--concurrency", "1,2", "--requests-per-stream", "2", "--tokens-per-second", "500",
         "--out", str(tmp_path)]
    )  # fmt: skip

    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err  # why it could not run
    report = json.loads((tmp_path / "bench-proxy.json").read_text(encoding="utf-8"))
    table = (tmp_path / "bench-proxy.md").read_text(encoding="utf-8")
    assert children() <= before
    assert [(r["path"], r["concurrency"]) for r in report["results"]] == [
        ("direct", 1), ("proxy", 1), ("proxy (hb 0)", 1), ("direct", 2), ("proxy", 2), ("proxy (hb 0)", 2),
    ]  # fmt: skip
    assert all(r["errors"] == 0 for r in report["results"])
    assert [r["requests"] for r in report["results"]] == [2, 2, 2, 4, 4, 4]
    assert all(r["chunks"] >= r["requests"] for r in report["results"])
    assert {(a["path"], a["concurrency"]) for a in report["added"]} == {
        ("proxy", 1), ("proxy (hb 0)", 1), ("proxy", 2), ("proxy (hb 0)", 2),
    }  # fmt: skip
    assert all(a["ttft_ms"]["p50"] is not None and a["lag_ms"]["p50"] is not None for a in report["added"])
    assert report["command"] == (
        "backtrack bench proxy --concurrency 1,2 --requests-per-stream 2 --tokens-per-second 500"
    )
    assert table.startswith("| path | streams | requests | errors |")
    assert len([line for line in table.splitlines() if line.startswith("| proxy (hb 0) |")]) == 2
    assert table.strip() in printed


def test_a_proxy_that_cannot_start_is_an_error_and_no_child_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("server: [not, a, mapping]\n", encoding="utf-8")

    before = children()
    code = main(["bench", "proxy", "--concurrency", "1", "--config", str(config)])

    assert code == 1
    assert children() <= before
    assert "backtrack bench proxy: error: proxy exited with" in capsys.readouterr().err


def test_the_generated_answer_has_200_tokens_and_no_repeated_neighbours() -> None:
    tokens = ApproxTokenizer().split(bench_row().response)

    assert len(tokens) == BENCH_RESPONSE_TOKENS
    assert len(set(tokens)) > BENCH_RESPONSE_TOKENS // 4
    assert all(a != b for a, b in pairwise(tokens))


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(i) for i in range(101)], 0.99) == 99.0
