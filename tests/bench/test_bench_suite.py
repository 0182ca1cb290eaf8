"""`backtrack bench all`: tiny runs of every path; it runs, parses and writes its tables and plots.

No timing is asserted anywhere: the numbers depend on the machine. A stream is cut only after 120 s,
so a cut in these tiny runs means a hang, not a slow machine. The guard path runs a tiny random guard
built here (no download, a head that never fires). The LiteLLM path runs only where `backtrack bench
all` has already installed LiteLLM's virtualenv: the tests never install it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.litellm_peer import (
    DEFAULT_LITELLM_VENV,
    litellm_config,
    litellm_guard_installed,
    litellm_installed,
)
from bench.suite_summary import sustained, targets
from proxy.cli.main import main

WORDS = "bed holds red white blue yellow purple tulips roses irises daffodils asters describe the garden"


def children() -> set[str]:
    """Process ids of this process's children that still exist."""
    return {
        pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()
    }


@pytest.fixture(scope="module")
def tiny_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guard checkpoint on a random 2-layer BERT (hidden 32) whose head never fires."""
    import torch
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    from guard.model import from_base, save_checkpoint

    base = tmp_path_factory.mktemp("tiny-bert")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[RESET]", *WORDS.split(), ".", *"0123456789"]
    vocab += letters + ["##" + c for c in letters]
    BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=True).save(
        str(base / "tokenizer.json")
    )
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(str(base))
    model = from_base(str(base), n_trainable_layers=1, max_prompt_tokens=8, consecutive=2)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.constant_(model.head.bias, -10.0)
    folder = tmp_path_factory.mktemp("tiny-guard")
    save_checkpoint(model, folder)
    return folder


def test_a_tiny_run_of_direct_backtrack_and_the_guard_writes_tables_json_and_plots(
    tiny_guard: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = children()
    code = main(
        ["bench", "all", "--concurrency", "1", "--rates", "0,500", "--seconds", "0.2", "--max-seconds", "120",
         "--checkpoint", str(tiny_guard), "--guard-streams", "1", "--skip-litellm", "--out", str(tmp_path)]
    )  # fmt: skip

    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err  # why it could not run
    report = json.loads((tmp_path / "bench-all.json").read_text(encoding="utf-8"))
    table = (tmp_path / "bench-all.md").read_text(encoding="utf-8")
    assert children() <= before
    paths = ["direct", "backtrack", "backtrack+guard"]
    assert [(r["rate"], r["concurrency"], r["path"]) for r in report["results"]] == [
        (rate, 1, path) for rate in (None, 500.0) for path in paths
    ]
    assert all(r["errors"] == 0 and r["cut"] == 0 and r["chunks"] >= r["requests"] for r in report["results"])
    assert all(r["unjudged"] >= 0 for r in report["results"] if r["path"] == "backtrack+guard")
    # Whether a paced run kept pace is a timing: only its presence is checked.
    assert [type(r["sustained"]) for r in report["results"]] == [type(None)] * 3 + [bool] * 3
    assert {(p["rate"], p["path"]) for p in report["peaks"]} == {(r, p) for r in (None, 500.0) for p in paths}
    assert all(p["peak_rss_bytes"] > 0 for p in report["peaks"])
    assert [row["streams"] for row in report["guard_roofline"]["rows"]] == [1]
    # The idle-loop floor, at the one paced rate's chunk period (2 ms at 500 tokens/s).
    [floor] = report["wakeup_floor"]
    assert floor["rate"] == 500.0 and floor["period_s"] == pytest.approx(0.002)
    assert floor["cpu_s_per_1k_wakeups"] > 0
    assert set(report["summary"]["sustained_streams"]) == set(paths)
    targets = report["summary"]["targets"]
    assert len({t["target"] for t in targets}) == 7  # every target is listed, measured or not
    # The paced targets are for 50 tokens/s and the guard's for 32 streams: this run measured neither.
    assert [t["target"] for t in targets if t["met"] is not None] == ["guard on: peak RSS ≤ 500 MB"]
    rss = next(t for t in targets if "RSS" in t["target"])
    guard_peak = max(p["peak_rss_bytes"] for p in report["peaks"] if p["path"] == "backtrack+guard")
    assert rss["measured"] == f"{guard_peak / 2**20:.0f} MB"
    assert report["command"].startswith("backtrack bench all --concurrency 1 --rates 0,500 ")
    assert table.startswith("Machine: ")
    assert "### Upstream 500 tokens/s" in table and "### Guard against its roofline" in table
    assert "### Floor: an idle event loop woken once per chunk period" in table
    assert table.strip() in printed
    for name in ("bench-all-unthrottled.png", "bench-all-500tps.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(
    not litellm_installed(DEFAULT_LITELLM_VENV),
    reason=f"LiteLLM's virtualenv {DEFAULT_LITELLM_VENV} is not installed: `backtrack bench all` installs it "
    "on first use; the tests never do",
)
def test_a_tiny_run_through_litellm_gives_the_ratios_to_it(tiny_guard: Path, tmp_path: Path) -> None:
    # LiteLLM with the guard hook runs too where its packages are there already; nothing is installed.
    hook = litellm_guard_installed(DEFAULT_LITELLM_VENV)
    before = children()
    code = main(
        ["bench", "all", "--concurrency", "1", "--rates", "0", "--seconds", "0.2", "--max-seconds", "120",
         "--checkpoint", str(tiny_guard), "--guard-streams", "1", "--out", str(tmp_path),
         *([] if hook else ["--skip-litellm-guard"])]
    )  # fmt: skip

    report = json.loads((tmp_path / "bench-all.json").read_text(encoding="utf-8"))
    assert code == 0
    assert children() <= before
    paths = ["direct", "backtrack", "backtrack+guard", "litellm", *(["litellm+guard"] if hook else [])]
    assert [r["path"] for r in report["results"]] == paths
    assert all(r["errors"] == 0 and r["cut"] == 0 for r in report["results"])
    ratios = {r["path"]: r for r in report["summary"]["ratios"]}
    assert ratios["backtrack"]["cpu_vs_litellm"] is not None
    assert ratios["backtrack"]["added_ttft_vs_litellm"] is not None


def test_litellm_gets_one_model_per_upstream_and_its_own_master_key() -> None:
    config = litellm_config(
        {"replay-unthrottled": "http://127.0.0.1:1", "replay-50tps": "http://127.0.0.1:2"}, "sk-x"
    )

    assert [(m["model_name"], m["litellm_params"]["api_base"]) for m in config["model_list"]] == [
        ("replay-unthrottled", "http://127.0.0.1:1/v1"), ("replay-50tps", "http://127.0.0.1:2/v1"),
    ]  # fmt: skip
    assert config["general_settings"]["master_key"] == "sk-x"
    assert config["litellm_settings"]["callbacks"] == []


def test_a_paced_run_is_sustained_only_without_failures_cuts_unjudged_text_or_lagging_answers() -> None:
    def row(**changes: object) -> dict[str, object]:
        return {"rate": 50.0, "errors": 0, "cut": 0, "unjudged": 0, "slowdown": {"p99": 1.02}, **changes}

    assert sustained(row()) is True
    assert sustained(row(rate=None)) is None
    assert sustained(row(errors=1)) is False
    assert sustained(row(cut=3)) is False
    assert sustained(row(unjudged=5.0)) is False
    assert sustained(row(slowdown={"p99": 1.5})) is False
    assert sustained(row(slowdown={"p99": None})) is False


def test_the_speed_targets_are_read_from_the_paced_cells_the_guard_rows_and_the_peaks() -> None:
    ratios = [
        {"rate": 50.0, "path": "backtrack", "concurrency": n, "added_ttft_p50_ms": ttft,
         "cpu_vs_litellm": cpu, "added_gap_p99_ms": 1.0}
        for n, ttft, cpu in [(1, 1.5, 0.05), (16, 2.5, 0.08), (32, 4.0, 0.12)]
    ] + [{"rate": 50.0, "path": "backtrack+guard", "concurrency": 32, "added_ttft_p50_ms": 500.0,
          "cpu_vs_litellm": None, "added_gap_p99_ms": 40.0}]  # fmt: skip
    report: dict[str, Any] = {
        "results": [{"rate": 50.0, "path": "backtrack+guard", "concurrency": 32, "sustained": True}],
        "guard_roofline": {"rows": [{"streams": 32, "tokens_per_s": 2600.0, "roofline": 0.5}]},
        "peaks": [{"rate": 50.0, "path": "backtrack+guard", "peak_rss_bytes": 600 * 2**20}],
    }
    met = {t["target"]: t["met"] for t in targets(report, ratios)}
    cpu = "guard off: CPU / 1k chunks ≤ 0.1 x LiteLLM's"
    assert {t["target"]: t["measured"] for t in targets(report, ratios)}[cpu] == "0.050 / 0.080 / 0.120 x"
    # With the idle-loop floor and LiteLLM's one-stream cell, the floor's share is shown beside them.
    report["wakeup_floor"] = [{"rate": 50.0, "period_s": 0.02, "cpu_s_per_1k_wakeups": 0.2}]
    report["results"].append({"rate": 50.0, "path": "litellm", "concurrency": 1, "cpu_s_per_1k_chunks": 1.6})
    shown = {t["target"]: t["measured"] for t in targets(report, ratios)}[cpu]
    assert shown == "0.050 / 0.080 / 0.120 x (an idle loop woken once per chunk: 0.125 x at 1 stream)"
    assert met == {
        "guard off: added TTFT p50 ≤ 2 ms at 1 streams": True,
        "guard off: added TTFT p50 ≤ 2 ms at 16 streams": False,
        "guard off: added TTFT p50 ≤ 5 ms at 32 streams": True,
        "guard off: CPU / 1k chunks ≤ 0.1 x LiteLLM's": False,  # 0.12x at 32 streams
        "guard on: ≥ 32 streams at 50 tokens/s, p99 added gap ≤ 50 ms": True,
        "guard ≥ 2,500 tokens/s at 32 streams": True,
        "guard on: peak RSS ≤ 500 MB": False,
    }


def test_bad_options_are_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    before = children()

    assert main(["bench", "all", "--seconds", "5", "--max-seconds", "1"]) == 2
    assert children() <= before
    assert "--max-seconds" in capsys.readouterr().err
