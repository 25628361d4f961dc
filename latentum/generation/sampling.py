"""Token sampling: temperature, then top-k, then top-p, then a seeded multinomial draw.

Legend: N rows, V vocabulary (or codebook) entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into ids. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    """Keep only the k most likely entries (0 disables)."""
    top_p: float = 1.0
    """Keep the smallest set whose probability mass reaches top_p (1.0 disables)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = SamplingParams(temperature=0.0)


def sample_logits(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """logits (N, V) -> ids (N,). Filtering order follows the LatentUM reference (§4)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the first entry that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    # multinomial on CPU with a CPU generator; move back afterwards (device-agnostic).
    ids = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return ids.to(logits.device)
