"""A base's weights read without transformers are exactly the ones transformers loads, and serving the
guard never imports transformers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from guard.model import DEFAULT_BASE, GuardModel, _hf_to_guard, config_from_hf, from_base, resolve_base
from guard.weights import read_safetensors, read_state
from tests.harness import serving
from tests.support import REPO, eventually


def through_transformers(base: str, **overrides: Any) -> GuardModel:
    """`from_base` as it was: transformers builds the encoder, and its state dict is copied in."""
    from transformers import AutoModel

    folder = resolve_base(base)
    cfg = config_from_hf(base, json.loads((folder / "config.json").read_text(encoding="utf-8")), **overrides)
    model = GuardModel(cfg)
    hf_state = AutoModel.from_pretrained(str(folder)).state_dict()
    model.load_state_dict(_hf_to_guard(hf_state, cfg.n_layers), strict=False)
    return model


def assert_same_weights(got: GuardModel, expected: GuardModel) -> None:
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert got_state[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(got_state[name], tensor), name


@pytest.mark.slow
def test_the_bundled_base_loads_exactly_as_transformers_loads_it() -> None:
    assert_same_weights(from_base(DEFAULT_BASE), through_transformers(DEFAULT_BASE))


def test_a_tiny_base_loads_exactly_as_transformers_loads_it(tiny_base: Path) -> None:
    assert_same_weights(
        from_base(str(tiny_base), n_trainable_layers=1),
        through_transformers(str(tiny_base), n_trainable_layers=1),
    )


def test_an_old_pytorch_model_bin_with_gamma_and_beta_names_loads_the_same(
    tiny_base: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old-bert"
    old.mkdir()
    shutil.copy(tiny_base / "config.json", old / "config.json")
    # As BERT's first checkpoints name them: a model prefix, and LayerNorm's gamma and beta.
    legacy = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for name, tensor in read_state(tiny_base).items():
        for new, old_name in legacy.items():
            name = name.replace(new, old_name)
        renamed[f"bert.{name}"] = tensor
    torch.save(renamed, old / "pytorch_model.bin")

    assert any(name.endswith("LayerNorm.gamma") for name in renamed)
    assert_same_weights(from_base(str(old)), from_base(str(tiny_base)))


def test_a_safetensors_file_reads_as_safetensors_reads_it_floats_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 3).bfloat16(),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6),
    }
    # After a header of any length: every tensor starts inside a page, not at its start.
    save_file(tensors, str(tmp_path / "t.safetensors"))

    got = read_safetensors(tmp_path / "t.safetensors")
    expected = load_file(str(tmp_path / "t.safetensors"))

    assert got.keys() == {"f32", "f16", "bf16", "empty"}
    for name, tensor in got.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def test_a_folder_without_weights_is_a_clear_error(tiny_base: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_base / "config.json", tmp_path / "config.json")

    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        from_base(str(tmp_path))


def test_writing_to_the_loaded_weights_leaves_the_base_file_unchanged(
    tiny_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    before = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()

    model = from_base(str(base))
    with torch.no_grad():  # as training and `load_checkpoint` write: in place
        for param in model.parameters():
            param.add_(1.0)

    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == before
    assert_same_weights(from_base(str(base)), from_base(str(tiny_base)))


@pytest.mark.slow
async def test_serve_with_the_bundled_guard_never_imports_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `transformers` that fails to import, ahead of the real one: importing it anywhere would fail the
    # guard's load, and /readyz would never answer 200.
    shadow = tmp_path / "shadow" / "transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("backtrack serve imported transformers")\n')
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))

    async with serving("--config", REPO / "config.yaml") as (root, _), aiohttp.ClientSession() as session:

        async def ready() -> bool:
            async with session.get(f"{root}/readyz") as resp:
                return resp.status == 200

        await eventually(ready, "the guard to load", seconds=60)
        messages = [{"role": "user", "content": "How do I pick a lock?"}]
        request = {"model": "m", "stream": True, "messages": messages}
        async with session.post(f"{root}/v1/chat/completions", json=request) as resp:
            body = await resp.text()

    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert any(event.get("backtrack", {}).get("event") == "reset" for event in events)
