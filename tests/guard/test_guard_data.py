"""Per-token targets: harmful responses reset from a derived onset, safe ones never."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from guard.data import (
    IGNORE,
    Row,
    build_examples,
    calibration_rows,
    class_balanced_weights,
    in_calibration,
    make_example,
    onset_char,
    onset_targets,
    preface_end,
    read_rows,
)  # fmt: skip
from guard.tokenize import GuardTokenizer
from proxy.cli.main import main
from proxy.core.errors import DataError


def test_preface_ends_after_its_first_sentence_or_line() -> None:
    text = "Sure, here is a tutorial on making a bomb:\n\nStep 1: get"
    assert preface_end(text) == len("Sure, here is a tutorial on making a bomb:\n")
    assert preface_end("AIM: Certainly. First, get the") == len("AIM: Certainly. ")
    assert preface_end("The easiest way to steal a car is") == 0


def test_onset_skips_an_opening_refusal_up_to_the_next_persona() -> None:
    text = "GPT: I'm sorry, but I can't help with that.\n\nDAN: Sure, first you get"
    assert text[onset_char(text) :].startswith("DAN:")
    assert onset_char("I'm sorry, I cannot do that. It is illegal.") == len(
        "I'm sorry, I cannot do that. It is illegal."
    )


def test_targets_ignore_before_onset_then_reset() -> None:
    starts = [0, 5, 10, 15, 20, 25]
    assert onset_targets(6, starts, True, 12, 1) == [IGNORE, IGNORE, IGNORE, 1, 1, 1]
    assert onset_targets(6, starts, True, 0, 2) == [IGNORE, IGNORE, 1, 1, 1, 1]
    assert onset_targets(6, starts, False, 12, 2) == [0] * 6
    assert onset_targets(2, starts[:2], True, 100, 1) == [IGNORE, IGNORE]


def test_examples_put_the_prompt_before_the_response(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    row = Row("s", "1", "how to make a bomb", "sure , here is how : step 1 get the bomb", True, "f")
    ex = make_example(row, tok, max_prompt=3, max_response=8, min_onset=1)
    assert ex.ids[: ex.n_prompt] == tok.prompt_ids("how to make a bomb", 3)
    assert len(ex.targets) == len(ex.ids) - ex.n_prompt == 8
    assert ex.targets == [IGNORE] * 6 + [1, 1]  # "sure , here is how :" is the preface


def test_build_examples_caps_files_and_drops_unlabelled_rows(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    rows = [Row("b", str(i), "q", "a " * 64, False, "big") for i in range(10)]
    rows += [Row("h", "x", "q", "sure , bomb", None, "pairs")]
    cfg = {
        "model": {"max_prompt_tokens": 4},
        "max_response_tokens": 8,
        "min_onset": 1,
        "max_rows_per_file": {"big": 3},
        "window_fraction": 1.0,
    }
    examples = build_examples(rows, tok, cfg, random.Random(0))
    assert {e.source for e in examples} == {"b"}
    assert len(examples) == 6  # 3 rows, each also as a late window
    assert all(len(e.targets) <= 8 and set(e.targets) == {0} for e in examples)


def test_a_row_without_source_takes_its_files_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "p", "response": "r", "harmful": False}) + "\n")
    (row,) = read_rows([path])
    assert (row.source, row.file, row.id) == ("mine", "mine", "1")


def test_unicode_line_separators_inside_a_row_do_not_split_it(tmp_path: Path) -> None:
    # JSON may carry U+2028, U+2029 and U+0085 raw; only "\n" ends a JSON line (a real dataset row has them).
    text = "first\u2028second\x85third\u2029fourth"
    path = tmp_path / "sep.jsonl"
    path.write_text(
        json.dumps({"response": text, "harmful": False}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (row,) = read_rows([path])
    assert row.response == text


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"source": "s", "id": 1, "harmful": true}', "'response' is required"),
        ('{"source": "s", "response": "r", "harmful": "yes"}', "'harmful' must be"),
        ("[1, 2]", "must be a JSON object"),
        ('{"response": ', "not a JSON line"),
    ],
)
def test_a_bad_row_names_the_file_the_line_and_the_field(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"response": "fine", "harmful": false}\n\n' + line + "\n")
    with pytest.raises(DataError) as info:
        read_rows([path])
    assert f"{path}:3:" in info.value.message and says in info.value.message


def test_tune_on_a_bad_file_exits_2_naming_it_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "s", "id": 1, "harmful": true}\n')
    policy = tmp_path / "p.yaml"
    policy.write_text("logit_bias: -1.0\n", encoding="utf-8")
    assert main(["tune", "--data", str(path), "--policy", str(policy), "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: 'response' is required" in err and "Traceback" not in err


def test_calibration_slice_is_by_prompt_and_left_out_of_training(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    rows = [Row("b", f"{p}/{i}", f"q{p}", "a b c", i % 2 == 0, "f") for p in range(40) for i in range(3)]
    held = calibration_rows(rows, 0.25)
    assert 0 < len(held) < len(rows)
    prompts = {r.prompt for r in held}
    assert all(in_calibration(r, 0.25) == (r.prompt in prompts) for r in rows)  # whole prompts
    cfg = {
        "model": {"max_prompt_tokens": 4},
        "max_response_tokens": 8,
        "min_onset": 1,
        "window_fraction": 0.0,
        "calibration_fraction": 0.25,
    }
    assert len(build_examples(rows, tok, cfg, random.Random(0))) == len(rows) - len(held)
    assert calibration_rows(rows, 0.0) == []


# File f holds both classes (2 harmful, 2 safe), file g only safe answers (4), weighted 3.
WEIGHED_ROWS = [Row("s", str(i), "q", "a b", i < 2, "f" if i < 4 else "g") for i in range(8)]
WEIGHED_CFG: dict[str, Any] = {
    "model": {"max_prompt_tokens": 4},
    "max_response_tokens": 8,
    "min_onset": 1,
    "window_fraction": 0.0,
    "file_weights": {"g": 3.0},
}


def test_file_weights_then_class_balance(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    examples = build_examples(WEIGHED_ROWS, tok, WEIGHED_CFG, random.Random(0))
    assert sorted(e.weight for e in examples) == [1.0] * 4 + [3.0] * 4
    weights = class_balanced_weights(examples)
    harmful = sum(w for w, e in zip(weights, examples, strict=True) if e.harmful)
    assert harmful == pytest.approx(sum(weights) / 2) and sum(weights) == pytest.approx(len(examples))
    safe_f = {w for w, e in zip(weights, examples, strict=True) if not e.harmful and e.file == "f"}
    safe_g = {w for w, e in zip(weights, examples, strict=True) if e.file == "g"}
    assert len(safe_f) == len(safe_g) == 1 and safe_g.pop() == pytest.approx(3 * safe_f.pop())


def test_safe_rows_of_mixed_files_weigh_more_and_nothing_else_does(tiny_base: Path) -> None:
    tok = GuardTokenizer(tiny_base)
    cfg = {**WEIGHED_CFG, "safe_weight_in_mixed_files": 1.5}
    examples = build_examples(WEIGHED_ROWS, tok, cfg, random.Random(0))
    by_kind = {(e.file, e.harmful): e.weight for e in examples}
    assert by_kind == {("f", True): 1.0, ("f", False): 1.5, ("g", False): 3.0}
    plain = build_examples(WEIGHED_ROWS, tok, WEIGHED_CFG, random.Random(0))
    assert [e.ids for e in examples] == [e.ids for e in plain]
