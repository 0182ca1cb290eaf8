"""A base encoder's weights read straight from its Hugging Face folder, without transformers.

Serving needs only the tensors: `transformers.AutoModel` cost the proxy its imports and a whole second
copy of the model while it loaded, which glibc then kept (the guard-on proxy was 572 MB resident when it
became ready, 373 MB with this module; see the report in issue #14). Here each tensor of
`model.safetensors` is its own copy-on-write mapping of the file: it costs memory only once it is read,
and then as page cache that the kernel can drop and read again; the word embeddings (30k rows, half of
the default base) stay mostly on disk, since only the rows of tokens seen are ever read. One mapping per
tensor, not one for the file (as `safetensors.torch.load_file` does): a tensor the model drops (q, k and
v once fused, Linear weights once quantized to int8) then gives back its pages, which in a shared
mapping would stay resident for as long as any other tensor of the file lives.

Names stay Hugging Face's (`guard.model._hf_to_guard` renames them), with the legacy LayerNorm names
(`gamma`, `beta`) of old BERT checkpoints mapped as transformers maps them.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from torch import Tensor

# Where a folder keeps its weights, in the order transformers prefers them.
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # a checkpoint split into shards
PYTORCH = "pytorch_model.bin"

# The safetensors dtypes a BERT-family checkpoint stores its weights in (integer buffers such as
# `embeddings.position_ids` are not weights and are skipped).
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_state(folder: Path) -> dict[str, Tensor]:
    """The folder's floating-point weights by their Hugging Face names, as float32.

    Tensors already in float32 are the file's own mapped pages, not copies: writing to one copies only
    that page (the file never changes). Raises `FileNotFoundError` when the folder has no weights file,
    `ValueError` when a safetensors file is not one.
    """
    if (folder / SAFETENSORS).exists():
        state = read_safetensors(folder / SAFETENSORS)
    elif (folder / SAFETENSORS_INDEX).exists():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_safetensors(folder / shard))
    elif (folder / PYTORCH).exists():
        # mmap: the same lazy reading (one mapping for the file); weights_only: the pickle runs no code.
        state = torch.load(folder / PYTORCH, map_location="cpu", weights_only=True, mmap=True)
    else:
        raise FileNotFoundError(f"{folder}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH}")
    return {
        _modern_name(name): tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
        for name, tensor in state.items()
        if tensor.is_floating_point()
    }


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The floating-point tensors of a safetensors file, each mapped copy-on-write on its own.

    The format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
    and byte range in the data that follows.
    """
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        base = 8 + length
        state = {}
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] not in FLOAT_DTYPES:
                continue
            dtype, shape = FLOAT_DTYPES[info["dtype"]], info["shape"]
            begin, end = (base + offset for offset in info["data_offsets"])
            count = end - begin
            if count != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"{path}: {name} holds {count} bytes, not {info['dtype']} {shape}")
            if count == 0:
                state[name] = torch.empty(shape, dtype=dtype)
                continue
            start = begin - begin % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
            pages = mmap.mmap(f.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
            flat = torch.frombuffer(pages, dtype=dtype, count=count // dtype.itemsize, offset=begin - start)
            state[name] = flat.view(shape)
    return state


def _modern_name(name: str) -> str:
    """`LayerNorm.gamma` / `LayerNorm.beta` (BERT's first checkpoints) as `LayerNorm.weight` / `.bias`."""
    head, _, last = name.rpartition(".")
    if "LayerNorm" in head and last in {"gamma", "beta"}:
        return f"{head}.{'weight' if last == 'gamma' else 'bias'}"
    return name
