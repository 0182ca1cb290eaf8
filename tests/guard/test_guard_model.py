"""The guard model equals transformers' causal BERT, and its incremental pass equals the full pass."""

from __future__ import annotations

from pathlib import Path

import torch

from guard.model import Segment, from_base, load_checkpoint, save_checkpoint


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


def test_packed_steps_with_caches_equal_full_passes(tiny_base: Path) -> None:
    model = from_base(str(tiny_base)).eval()
    torch.nn.init.normal_(model.head.weight)
    cfg = model.cfg
    seqs = [torch.randint(5, cfg.vocab_size, (10,)), torch.randint(5, cfg.vocab_size, (7,))]
    with torch.no_grad():
        full = [model(s[None], torch.ones_like(s)[None])[0] for s in seqs]
        caches = [torch.zeros(cfg.n_layers, 2, cfg.n_heads, 16, cfg.hidden // cfg.n_heads) for _ in seqs]
        got: list[list[float]] = [[], []]
        # Two streams at different lengths share each step; one of them sits a step out.
        for cuts in [((0, 4), (0, 1)), ((4, 5), (1, 7)), ((5, 10), None)]:
            segments, ids, positions = [], [], []
            for b, cut in enumerate(cuts):
                if cut is None:
                    continue
                lo, hi = cut
                segments.append(Segment(caches[b], lo, len(ids), hi - lo))
                ids += seqs[b][lo:hi].tolist()
                positions += range(lo, hi)
            logits = model.step(
                torch.tensor(ids), torch.ones(len(ids), dtype=torch.long), torch.tensor(positions), segments
            )
            for b, seg in zip([b for b, c in enumerate(cuts) if c], segments, strict=True):
                got[b] += logits[seg.start : seg.start + seg.n].tolist()
    for b in range(2):
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
