"""The guard model equals transformers' causal BERT, and its incremental pass equals the full pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from guard.model import GuardModel, KVPool, Segment, from_base, load_checkpoint, save_checkpoint


def test_matches_transformers_bert_run_as_a_decoder(tiny_base: Path) -> None:
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(tiny_base), is_decoder=True).eval()
    model = from_base(str(tiny_base), n_trainable_layers=0).eval()
    ids = torch.randint(5, model.cfg.vocab_size, (2, 12))
    types = torch.zeros_like(ids)
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types).last_hidden_state
        got = model.lower(ids, types)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def packed_logits(
    model: GuardModel, seqs: list[Tensor], steps: list[list[tuple[int, int, int] | None]]
) -> list[list[float]]:
    """Run `steps` of (slot, past, end) per stream (None: sits the step out) through one pool; each
    stream's logits, in the order its tokens were scored."""
    pool = KVPool(model.cfg)
    got: list[list[float]] = [[] for _ in seqs]
    for cuts in steps:
        segments, ids, positions, owners = [], [], [], []
        for b, cut in enumerate(cuts):
            if cut is None:
                continue
            slot, lo, hi = cut
            segments.append(Segment(slot, lo, len(ids), hi - lo))
            ids += seqs[b][lo:hi].tolist()
            positions += range(lo, hi)
            owners.append(b)
        logits = model.step(
            torch.tensor(ids), torch.ones(len(ids), dtype=torch.long), torch.tensor(positions), segments, pool
        )
        for b, seg in zip(owners, segments, strict=True):
            got[b] += logits[seg.start : seg.start + seg.n].tolist()
    return got


def test_packed_steps_with_one_pool_equal_full_passes(tiny_base: Path) -> None:
    torch.manual_seed(0)
    model = from_base(str(tiny_base)).eval()
    torch.nn.init.normal_(model.head.weight)
    cfg = model.cfg
    seqs = [torch.randint(5, cfg.vocab_size, (n,)) for n in (60, 7, 45, 12)]
    # Four streams at different past lengths share each step; slots are not in stream order and slot 4
    # stays idle inside the range; stream 0's 40-token prefill attends alone (> LONE_TOKENS new
    # tokens) while the others attend batched; stream 1 sits steps out; the pool grows twice.
    steps: list[list[tuple[int, int, int] | None]] = [
        [(3, 0, 40), (0, 0, 1), (1, 0, 3), None],
        [(3, 40, 41), (0, 1, 7), (1, 3, 11), (5, 0, 4)],
        [(3, 41, 60), None, (1, 11, 45), (5, 4, 12)],
    ]
    with torch.no_grad():
        full = [model(s[None], torch.ones_like(s)[None])[0] for s in seqs]
        got = packed_logits(model, seqs, steps)
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.tensor(got[b]), full[b], atol=1e-5, rtol=1e-4)


def test_a_rolled_over_stream_restarts_its_slot_over_stale_keys(tiny_base: Path) -> None:
    """Rollover: a stream's slot restarts at position 0 with a replay; the stale keys left behind it in
    the slot (positions 8..29 here) must not be read."""
    torch.manual_seed(1)
    model = from_base(str(tiny_base)).eval()
    torch.nn.init.normal_(model.head.weight)
    cfg = model.cfg
    first = torch.randint(5, cfg.vocab_size, (30,))
    replay = torch.cat([first[:2], first[-6:], torch.randint(5, cfg.vocab_size, (10,))])
    other = torch.randint(5, cfg.vocab_size, (20,))
    seqs = [first, replay, other]  # the first two: one stream's two lives, both in slot 1
    steps: list[list[tuple[int, int, int] | None]] = [
        [(1, 0, 30), None, (0, 0, 10)],
        [None, (1, 0, 8), (0, 10, 14)],
        [None, (1, 8, 12), (0, 14, 20)],
        [None, (1, 12, 18), None],
    ]
    with torch.no_grad():
        full = [model(s[None], torch.ones_like(s)[None])[0] for s in seqs]
        got = packed_logits(model, seqs, steps)
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.tensor(got[b]), full[b], atol=1e-5, rtol=1e-4)


def test_checkpoint_holds_only_trained_weights_and_round_trips(tiny_base: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = from_base(str(tiny_base), n_trainable_layers=1, consecutive=3).eval()
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.blocks[2].up.weight)
    save_checkpoint(model, tmp_path, {"train": {"steps": 1}})

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "guard.safetensors"))
    assert saved and all(k.startswith(("blocks.2.", "head.")) for k in saved)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["train"] == {"steps": 1}
    assert loaded.cfg == model.cfg
    ids = torch.randint(5, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        # fp16 storage of the trained weights: close, not bit-equal.
        torch.testing.assert_close(
            loaded(ids, torch.ones_like(ids)), model(ids, torch.ones_like(ids)), atol=2e-2, rtol=1e-2
        )


def test_only_the_top_layers_and_head_train(tiny_base: Path) -> None:
    model = from_base(str(tiny_base), n_trainable_layers=1)
    model.freeze_lower()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "head.")) for n in trainable)
    assert model.flops_per_token(0) > 0


def test_the_pool_hands_out_the_lowest_free_slot_and_copies_only_past_its_room(tiny_base: Path) -> None:
    cfg = from_base(str(tiny_base)).cfg
    pool = KVPool(cfg)
    f32, cpu = torch.float32, torch.device("cpu")
    assert [pool.acquire() for _ in range(3)] == [0, 1, 2]
    pool.release(1)
    assert pool.acquire() == 1 and pool.live == 3
    kv = pool.reserve(3, 10, f32, cpu)
    assert cfg.max_positions == 64  # the tiny base: every slot has room for 64 positions
    assert kv.shape == (cfg.n_layers, 2, KVPool.SLOTS, 64, cfg.n_heads, cfg.hidden // cfg.n_heads)
    # What attention reads, masked or not, is never uninitialised memory.
    assert (pool.ready, pool.zeroed) == (3, 64) and bool((kv[:, :, :3] == 0).all())
    kv[:, :, 2, 5] = 1.0
    assert pool.reserve(3, 64, f32, cpu) is kv  # a longer stream: no copy
    assert pool.reserve(5, 64, f32, cpu) is kv and bool((kv[:, :, 3:5] == 0).all())  # more streams: none
    grown = pool.reserve(KVPool.SLOTS + 1, 64, f32, cpu)  # past the room: it doubles
    assert grown.shape[2:4] == (2 * KVPool.SLOTS, 64) and bool((grown[:, :, 2, 5] == 1.0).all())
    assert pool.reserve(2, 5, f32, cpu) is grown  # never shrinks while streams live
    with pytest.raises(ValueError, match="changed"):
        pool.reserve(2, 5, torch.bfloat16, cpu)
    for slot in (0, 2, 1):
        pool.release(slot)
    assert pool.live == 0 and pool.acquire() == 0
