"""`backtrack bench guard`: a tiny run at both precisions prints its results as JSON, a row each.

No timing is asserted: the numbers depend on the machine. The guard is a tiny random one built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli.main import main
from tests.guard.tokenizer import write_tiny_bert


@pytest.fixture(scope="module")
def tiny_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guard checkpoint on a random 2-layer BERT (hidden 32)."""
    from guard.model import from_base, save_checkpoint

    base = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)
    folder = tmp_path_factory.mktemp("tiny-guard")
    save_checkpoint(from_base(str(base), n_trainable_layers=1, max_prompt_tokens=8), folder)
    return folder


def test_bench_guard_prints_one_json_row_per_precision(
    tiny_guard: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "guard", "--checkpoint", str(tiny_guard), "--streams", "1", "--threads", "1"]
    argv += ["--response-tokens", "12", "--new-tokens", "4", "--precision", "fp32,int8", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds the JSON alone; the table went to stderr
    assert report["precisions"] == ["fp32", "int8"]
    assert [(row["precision"], row["streams"]) for row in report["rows"]] == [("fp32", 1), ("int8", 1)]
    assert all(row["tokens_per_s"] > 0 for row in report["rows"])
    assert "precision" in captured.err and "int8" in captured.err


def test_bench_guard_refuses_an_unknown_precision(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "guard", "--precision", "fp32,fp8"])
    assert "fp8" in capsys.readouterr().err
