"""The guard model equals transformers' causal BERT, and its incremental pass equals the full pass."""

from __future__ import annotations

from pathlib import Path

import torch

from guard.model import from_base, load_checkpoint, save_checkpoint


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


def test_step_with_cache_equals_full_pass(tiny_base: Path) -> None:
    model = from_base(str(tiny_base)).eval()
    torch.nn.init.normal_(model.head.weight)
    ids = torch.randint(5, model.cfg.vocab_size, (1, 10))
    types = torch.tensor([[0] * 4 + [1] * 6])
    with torch.no_grad():
        full = model(ids, types)[0]
        L = model.cfg.n_layers
        H, D = model.cfg.n_heads, model.cfg.hidden // model.cfg.n_heads
        past = [(torch.zeros(1, H, 0, D), torch.zeros(1, H, 0, D)) for _ in range(L)]
        pieces = []
        for lo, hi in [(0, 4), (4, 5), (5, 10)]:
            n, p = hi - lo, past[0][0].shape[2]
            mask = torch.cat(
                [torch.ones(n, p, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1
            )
            logits, new = model.step(
                ids[:, lo:hi], types[:, lo:hi], torch.arange(lo, hi)[None], mask[None, None], past
            )
            past = [
                (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                for (pk, pv), (k, v) in zip(past, new, strict=True)
            ]
            pieces.append(logits[0])
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=1e-4)


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
