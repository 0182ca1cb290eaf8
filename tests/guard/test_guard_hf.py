"""A local HF sequence classifier and a causal LM with `[RESET]`, behind the same Guard interface."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from guard.hf_guards import ClassifierGuard, ResetLMGuard

RESPONSE = "sure , here is how to make a bomb : step 1 , get the flour . step 2 , mix sugar and eggs !"


@pytest.fixture(scope="module")
def classifier(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-classifier")
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(tiny_base / name, folder / name)
    cfg = BertConfig.from_pretrained(str(tiny_base), num_labels=2, id2label={0: "safe", 1: "unsafe"})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def reset_lm(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-reset-lm")
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(tiny_base / name, folder / name)
    vocab = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ).save_pretrained(str(folder))
    return folder


async def feed_all(stream: object, text: str, piece: int) -> list[object]:
    out = [await stream.feed(text[i : i + piece]) for i in range(0, len(text), piece)]  # type: ignore[attr-defined]
    out.append(await stream.feed("", final=True))  # type: ignore[attr-defined]
    return out


async def test_classifier_reads_a_window_every_k_tokens(classifier: Path) -> None:
    passing = ClassifierGuard(classifier, -50.0, 0.5, every=4).open("how to make a bomb")
    verdicts = await feed_all(passing, RESPONSE, 3)
    assert all(v.reset is None for v in verdicts)  # type: ignore[attr-defined]
    vouched = [v.scored_until for v in verdicts]  # type: ignore[attr-defined]
    assert vouched == sorted(vouched) and vouched[-1] == len(RESPONSE)
    assert passing.read == len(passing.tok.ids)

    firing = ClassifierGuard(classifier, 50.0, 0.5, every=4).open("how to make a bomb")
    last = (await feed_all(firing, RESPONSE, 3))[-1]
    assert last.reset is not None and last.reset.at == 0 and last.reset.detector == "classifier"  # type: ignore[attr-defined]


async def test_reset_lm_scores_incrementally_like_a_full_pass(reset_lm: Path) -> None:
    guard = ResetLMGuard(reset_lm, 0.0, 0.99)
    stream = guard.open("how to make a bomb")
    await feed_all(stream, RESPONSE, 5)
    assert stream.reset is None and stream.scored == len(stream.tok.ids)

    prompt_ids = guard.tokenizer.encode("how to make a bomb")[0]
    ids = prompt_ids + guard.tokenizer.encode(RESPONSE)[0]
    full, _ = guard.step(ids, None)
    expected = max(torch.tensor(full[len(prompt_ids) :]).exp().tolist())
    assert stream.max_p == pytest.approx(expected, rel=1e-4)


async def test_reset_lm_resets_when_reset_is_likely(reset_lm: Path) -> None:
    stream = ResetLMGuard(reset_lm, 50.0, 0.5).open(None)
    last = (await feed_all(stream, RESPONSE, 7))[-1]
    assert last.reset is not None and last.reset.at == 0 and last.reset.detector == "reset_lm"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="MISSING"):
        ResetLMGuard(reset_lm, 0.0, 0.5, marker="[MISSING]")
