"""Training examples: rows of the shared JSONL schema turned into token ids with per-token targets.

Targets, per response token: 1 = `[RESET]` should be emitted now, 0 = it should not, -1 = no loss.
- A safe response (benign answer or refusal) never resets: every token is 0.
- A harmful response resets from its derived onset onward. The data has no onset labels; harmful
  answers usually open with a compliant preface ("Sure, here is a tutorial on …:") and turn harmful
  after it. So the onset is the end of the first sentence or line when that sentence reads as a
  preface, else the response's start; at least `min_onset` tokens in either case. Tokens before the
  onset get no loss: from a preface alone one cannot yet tell compliance from a benign answer.
- Jailbreak answers often open with a refusal and then comply in a second persona ("GPT: I'm sorry …
  DAN: Sure, …"). When the opening refuses, the onset is the next paragraph or persona label; with
  neither, the whole response gets no token loss and counts only through the response-level loss.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guard.tokenize import GuardTokenizer
from proxy.core.errors import DataError

IGNORE = -1

_PREFACE = re.compile(
    r"^\W*(?:[\w ]{1,30}:\s*)?(?:sure|certainly|of course|absolutely|okay|ok|yes|alright|great|fine|"
    r"here(?:'s| is| are)|i (?:can|will|'ll|would be (?:happy|glad))|happy to|glad to|as requested|"
    r"title|step 1|to \w+)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?:](?:\s|$)|\n")
_REFUSAL = re.compile(
    r"\b(?:i'm sorry|i am sorry|i apologi[sz]e|i can ?not|i can't|i won't|i will not|as an ai|i'm unable|"
    r"i am unable|i must (?:decline|refuse))",
    re.IGNORECASE,
)
_NEXT_PART = re.compile(r"\n\s*\n|\n(?=\W{0,3}[\w ]{1,30}:)")


def onset_char(response: str) -> int:
    """Where a harmful response's harmful part is taken to start (see the module docstring)."""
    refusal = _REFUSAL.search(response, 0, 200)
    if refusal:
        m = _NEXT_PART.search(response, refusal.end())
        return m.end() if m else len(response)
    return preface_end(response)


def preface_end(response: str, max_chars: int = 300) -> int:
    """Character offset where a compliant preface ends, or 0 when the response opens without one."""
    preface = _PREFACE.match(response)
    if not preface:
        return 0
    m = _SENTENCE_END.search(response, preface.end(), max_chars)
    return m.end() if m else 0


@dataclass(frozen=True, slots=True)
class Row:
    source: str
    id: str
    prompt: str | None
    response: str
    harmful: bool | None
    file: str  # the file it came from: metrics are per file

    @classmethod
    def from_json(cls, data: Any, file: str, line: int) -> Row:
        """A row of the shared data schema; `source` defaults to the file's name and `id` to the line.
        Raises `DataError` naming the field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise DataError(f"{file}:{line}: a row must be a JSON object")
        response, harmful, prompt = data.get("response"), data.get("harmful"), data.get("prompt")
        if not isinstance(response, str):
            raise DataError(f"{file}:{line}: 'response' is required and must be a string")
        if harmful is not None and not isinstance(harmful, bool):
            raise DataError(f"{file}:{line}: 'harmful' must be true, false or null")
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{file}:{line}: 'prompt' must be a string or null")
        source = data.get("source") or Path(file).stem
        return cls(str(source), str(data.get("id", line)), prompt, response, harmful, Path(file).stem)


def read_rows(paths: Sequence[Path]) -> list[Row]:
    """The rows of JSONL files in the shared schema; a bad line raises `DataError` naming file and line."""
    rows = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read it: {exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{number}: not a JSON line") from None
            rows.append(Row.from_json(data, str(path), number))
    return rows


@dataclass(frozen=True, slots=True)
class Example:
    ids: list[int]  # [CLS] prompt [SEP] response
    n_prompt: int  # tokens before the response, specials included
    targets: list[int]  # one per response token
    harmful: bool
    source: str
    file: str
    weight: float = 1.0  # the file's weight (`file_weights`), before class balancing


def onset_targets(
    n_tokens: int, starts: Sequence[int], harmful: bool, onset_char: int, min_onset: int
) -> list[int]:
    """Per-token targets for a response of `n_tokens` tokens (see the module docstring)."""
    if not harmful:
        return [0] * n_tokens
    onset = next((i for i, s in enumerate(starts) if s >= onset_char), n_tokens)
    onset = max(onset, min_onset)
    return [IGNORE] * min(onset, n_tokens) + [1] * max(n_tokens - onset, 0)


def make_example(
    row: Row, tok: GuardTokenizer, max_prompt: int, max_response: int, min_onset: int, window_from: int = 0
) -> Example:
    """One example; `window_from` > 0 starts the response part later (how the scorer rolls over)."""
    assert row.harmful is not None
    # Tokenizing a bounded prefix is enough: ~6 characters per token is generous for English.
    limit = (window_from + max_response) * 8
    ids, starts = tok.encode(row.response[:limit])
    onset = onset_char(row.response) if row.harmful else 0
    targets = onset_targets(len(ids), starts, row.harmful, onset, min_onset)
    ids, targets = (
        ids[window_from : window_from + max_response],
        targets[window_from : window_from + max_response],
    )
    head = tok.prompt_ids(row.prompt, max_prompt)
    return Example(head + ids, len(head), targets, row.harmful, row.source, row.file)


def in_calibration(row: Row, fraction: float) -> bool:
    """Whether a row belongs to its file's held-out calibration slice (by prompt, stable across runs).

    The split key is the prompt (the row id when there is none), so every answer to one prompt falls
    on the same side; a slice of `fraction` of the prompts is left out of training for choosing the
    operating point.
    """
    key = f"{row.file}\0{row.prompt if row.prompt else row.id}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return bucket < fraction


def calibration_rows(rows: Sequence[Row], fraction: float) -> list[Row]:
    """The labelled rows of the held-out calibration slice (see `in_calibration`)."""
    return [r for r in rows if r.harmful is not None and r.response.strip() and in_calibration(r, fraction)]


def build_examples(
    rows: Sequence[Row], tok: GuardTokenizer, cfg: dict[str, Any], rng: random.Random
) -> list[Example]:
    """Labelled rows, big files subsampled (`max_rows_per_file`), each weighted by its file's weight
    (`file_weights`, default 1); some long benign answers also as late windows. Rows of the calibration
    slice (`calibration_fraction` of the prompts, see `in_calibration`) are left out.
    """
    holdout = float(cfg.get("calibration_fraction", 0.0))
    per_source: dict[str, list[Row]] = {}
    for row in rows:
        if row.harmful is not None and row.response.strip() and not in_calibration(row, holdout):
            per_source.setdefault(row.file, []).append(row)
    caps: dict[str, int] = cfg.get("max_rows_per_file", {})
    file_weights: dict[str, float] = cfg.get("file_weights", {})
    # Safe answers in files that also hold harmful ones (refusals, safe answers to harmful prompts) are
    # the false resets an operator sees most: `safe_weight_in_mixed_files` weighs them up.
    mixed_safe = float(cfg.get("safe_weight_in_mixed_files", 1.0))
    examples = []
    for file, file_rows in sorted(per_source.items()):
        rng.shuffle(file_rows)
        weight = float(file_weights.get(file, 1.0))
        mixed = any(r.harmful for r in file_rows) and not all(r.harmful for r in file_rows)
        for row in file_rows[: caps.get(file, len(file_rows))]:
            ex = make_example(
                row, tok, cfg["model"]["max_prompt_tokens"], cfg["max_response_tokens"], cfg["min_onset"]
            )
            examples.append(replace(ex, weight=weight * (mixed_safe if mixed and not row.harmful else 1.0)))
            if not row.harmful and rng.random() < cfg["window_fraction"]:
                # Late text of long answers, as the scorer sees it after a context rollover.
                n = len(tok.encode(row.response[: 8 * 2 * cfg["max_response_tokens"]])[0])
                if n > cfg["max_response_tokens"] + 32:
                    start = rng.randrange(32, n - cfg["max_response_tokens"] // 2)
                    ex = make_example(
                        row, tok, cfg["model"]["max_prompt_tokens"], cfg["max_response_tokens"], 0, start
                    )
                    examples.append(replace(ex, weight=weight))
    return examples


def class_balanced_weights(examples: Sequence[Example]) -> list[float]:
    """Per-example loss weights: file weights, scaled so that harmful and safe each weigh half in all."""
    totals = {c: sum(e.weight for e in examples if e.harmful == c) for c in (True, False)}
    half = len(examples) / 2
    return [e.weight * half / totals[e.harmful] for e in examples]


def batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Index batches of similar length (little padding), in random order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].ids), rng.random()))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    yield from chunks
