"""The guard's arithmetic at serving time: `fp32` (the reference), `bf16`, `int8`.

Only the blocks' Linear layers change (most of the FLOPs); embeddings, LayerNorms and the head stay
fp32. Measured on the dev split against fp32 (README: The guard model):
- `bf16`: weights stored and matmuls run in bfloat16, fp32 in and out of each layer. Logits move by
  ~0.005; about 2x faster passes where the CPU has bfloat16 instructions (avx512_bf16, AMX), slower
  than fp32 where it has not. The streaming KV pool and its attention are bf16 too (`kv_dtype`): the
  keys are bf16 numbers already, and the pool is half the size.
- `int8`: torch's dynamic quantization (int8 weights per output channel, activations quantized per
  call over the whole batch). About as fast as bf16 here, but BERT's outlier activation channels make
  the per-tensor activation scale coarse: logits move by ~0.3 and decisions differ on ~4% of dev rows.
"""

from __future__ import annotations

import gc
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard.model import GuardModel

PRECISIONS = ("fp32", "bf16", "int8")
LINEARS = ("qkv", "attn_out", "up", "down")
ROWS = 16  # a bf16 matmul's rows are padded to a multiple of this (see `BF16Linear`)


class BF16Linear(nn.Module):
    """A Linear layer whose weights and matmul are bfloat16; input and output keep their dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if x.dim() == 2 and rows % ROWS:
            # A packed step can have any number of rows, and oneDNN (torch's bf16 matmul) caches a
            # kernel per shape, hundreds of them: padding to multiples of ROWS kept a guard-on proxy at
            # 32 streams 190 MB smaller (674 -> 486 MB peak).
            padded = F.pad(x.to(torch.bfloat16), (0, 0, 0, ROWS - rows % ROWS))
            return F.linear(padded, self.weight, self.bias)[:rows].to(x.dtype)
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def with_precision(model: GuardModel, precision: str) -> GuardModel:
    """The model at `precision` (one of `PRECISIONS`), changed in place, for inference only."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        for block in model.blocks:
            for name in LINEARS:
                setattr(block, name, BF16Linear(getattr(block, name)))
        model.kv_dtype = torch.bfloat16
    elif precision == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            # torch deprecates eager-mode quantization in favour of torchao, yet it is still torch's
            # CPU int8 path and works; pytest turns warnings into errors, so ignore exactly these two.
            warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
            warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor", UserWarning)
            for block in model.blocks:
                quantize_dynamic(block, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)  # type: ignore[no-untyped-call]
    # The replaced fp32 layers sit in reference cycles: collected now, not at some later pass (int8:
    # 366 -> 325 MB resident after loading).
    gc.collect()
    return model
