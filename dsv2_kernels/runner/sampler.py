"""Token sampling: greedy, or temperature with optional top-k and top-p (nucleus), reproducible with a seed."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling parameters {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


class Sampler:
    def __init__(self, params: SamplingParams, device):
        self.p = params
        self.gen = torch.Generator(device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] fp32 -> token ids [B] int64."""
        p = self.p
        if p.temperature == 0:
            return logits.argmax(-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = logits.topk(min(p.top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
            drop = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.gen).squeeze(-1)
