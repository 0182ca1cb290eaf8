"""Other models behind the same `Guard` interface, from any local Hugging Face folder.

- `ClassifierGuard`: a sequence classifier (e.g. a toxicity or safety classifier) that reads the
  prompt and a window of the last `window` response tokens every `every` tokens. It vouches only for
  text up to its last read; a reset points at the first token it had not read before.
- `ResetLMGuard`: a causal LM that has a `[RESET]` token, the paper's own kind of model, kept with its
  KV cache; token i resets when the LM's next-token probability of `[RESET]` after it, with the policy's
  `logit_bias` added to that one logit, reaches the threshold.

Both score one stream at a time in a worker thread; the batched path is `guard.scorer` (the bundled
model). They use the folder's `tokenizer.json`, tokenized incrementally like the bundled guard's.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import torch

from guard.tokenize import GuardTokenizer, IncrementalTokenizer, TextTokenizer
from proxy.core.detectors import Reset, Verdict

_UNSAFE_LABELS = ("unsafe", "harmful", "toxic", "toxicity", "flagged", "label_1")


def unsafe_logit(logits: torch.Tensor, index: int) -> float:
    """The log-odds of the unsafe class: the logit itself for a one-output head."""
    if logits.shape[-1] == 1:
        return float(logits[0])
    others = torch.cat([logits[:index], logits[index + 1 :]])
    return float(logits[index] - torch.logsumexp(others, 0))


def _sigmoid(x: float) -> float:
    return 0.5 * (1 + math.tanh(x / 2))


class ClassifierGuard:
    name = "classifier"

    def __init__(
        self,
        folder: Path,
        logit_bias: float,
        threshold: float,
        *,
        every: int = 16,
        window: int = 256,
        category: str = "unsafe",
        max_prompt_tokens: int = 64,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        self.model: Any = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        self.tokenizer = GuardTokenizer(folder)
        labels = {str(v).lower(): int(k) for k, v in (self.model.config.id2label or {}).items()}
        self.unsafe_index = next(
            (labels[n] for n in _UNSAFE_LABELS if n in labels), 1 if len(labels) > 1 else 0
        )
        self.logit_bias, self.threshold, self.category = logit_bias, threshold, category
        self.every, self.window, self.max_prompt_tokens = every, window, max_prompt_tokens

    @torch.no_grad()
    def score(self, ids: list[int]) -> float:
        logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return unsafe_logit(logits, self.unsafe_index)

    def open(self, prompt: str | None) -> ClassifierStream:
        return ClassifierStream(self, prompt)


class ClassifierStream:
    def __init__(self, guard: ClassifierGuard, prompt: str | None) -> None:
        self.guard = guard
        self.head = guard.tokenizer.prompt_ids(prompt, guard.max_prompt_tokens)
        self.tok = IncrementalTokenizer(guard.tokenizer)
        self.read = 0  # response tokens the classifier has read
        self.vouched = 0  # character offset it vouches for
        self.max_p = 0.0
        self.reset: Reset | None = None

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        self.tok.feed(text, final=final)
        n = len(self.tok.ids)
        if self.reset is None and n > self.read and (n - self.read >= self.guard.every or final):
            g = self.guard
            ids = self.head + self.tok.ids[max(0, n - g.window) : n] + [g.tokenizer.sep_id]
            p = _sigmoid(await asyncio.to_thread(g.score, ids) + g.logit_bias)
            self.max_p = max(self.max_p, p)
            if p >= g.threshold:
                self.reset = Reset(self.tok.starts[self.read], g.category, p, self.guard.name)
            self.read, self.vouched = n, self.tok.done_until
        if self.reset is not None:
            return Verdict(len(self.tok.text), self.reset, self.max_p)
        return Verdict(self.vouched, None, self.max_p)

    def close(self) -> None:
        self.tok = IncrementalTokenizer(self.guard.tokenizer)


class ResetLMGuard:
    name = "reset_lm"

    def __init__(
        self,
        folder: Path,
        logit_bias: float,
        threshold: float,
        *,
        marker: str = "[RESET]",
        category: str = "unsafe",
        max_prompt_tokens: int = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(str(folder))
        self.model = model.eval()
        self.tokenizer = TextTokenizer(folder)
        reset_id = self.tokenizer.tok.token_to_id(marker)
        if reset_id is None:
            raise ValueError(f"{folder}: the tokenizer has no {marker!r} token")
        self.reset_id: int = reset_id
        self.logit_bias, self.threshold, self.category = logit_bias, threshold, category
        self.max_prompt_tokens = max_prompt_tokens

    @torch.no_grad()
    def step(self, ids: list[int], past: Any) -> tuple[list[float], Any]:
        """Log-probability of `[RESET]` after each of `ids`, with the bias on its logit; the new cache."""
        out = self.model(input_ids=torch.tensor([ids]), cache=past, use_cache=True)
        logits = out.logits[0].float()
        logits[:, self.reset_id] += self.logit_bias
        return torch.log_softmax(logits, -1)[:, self.reset_id].tolist(), out.cache

    def open(self, prompt: str | None) -> ResetLMStream:
        return ResetLMStream(self, prompt)


class ResetLMStream:
    def __init__(self, guard: ResetLMGuard, prompt: str | None) -> None:
        self.guard = guard
        self.pending = guard.tokenizer.encode(prompt)[0][-guard.max_prompt_tokens :] if prompt else []
        self.n_prompt = len(self.pending)
        self.past: Any = None
        self.tok = IncrementalTokenizer(guard.tokenizer)
        self.scored = 0
        self.max_p = 0.0
        self.reset: Reset | None = None

    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        ids, _ = self.tok.feed(text, final=final)
        if self.reset is None and ids:
            feed, skip = self.pending + ids, len(self.pending)
            self.pending = []
            logps, self.past = await asyncio.to_thread(self.guard.step, feed, self.past)
            for logp in logps[skip:]:
                p = math.exp(logp)
                self.max_p = max(self.max_p, p)
                if p >= self.guard.threshold:
                    at = self.tok.starts[self.scored]
                    self.reset = Reset(at, self.guard.category, p, self.guard.name)
                    break
                self.scored += 1
        if self.reset is not None:
            return Verdict(len(self.tok.text), self.reset, self.max_p)
        return Verdict(self.tok.done_until, None, self.max_p)

    def close(self) -> None:
        self.past = None
