"""Cross-entropy losses on token logits: text tokens and image codes (pure functions).

Legend: M image-token rows, G codebooks, K codebook size, N supervised text positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from latentum.types import LossBreakdown


def code_loss(logits: Tensor, ids: Tensor, weight: Tensor | None = None) -> LossBreakdown:
    """Depth-head logits (M, G, K) against ids (M, G): cross-entropy over M * G ids, averaged with per-token
    ``weight`` (M,) (default uniform); per-depth accuracy in parts (``acc/d{g}``)."""
    ce = F.cross_entropy(rearrange(logits.float(), "m g k -> m k g"), ids, reduction="none")  # (M, G)
    w = torch.ones_like(ce[:, 0]) if weight is None else weight.to(ce)
    loss = (ce * w[:, None]).sum() / (w.sum() * ce.size(1)).clamp_min(1e-8)
    with torch.no_grad():
        acc = (logits.argmax(-1) == ids).float().mean(0)  # (G,)
    parts = {"ce": ce.detach().mean(), **{f"acc/d{g}": acc[g] for g in range(ids.size(1))}}
    return LossBreakdown(loss, parts)


def text_loss(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> LossBreakdown:
    """Logits (N, V) of the supervised text positions against their targets (N,): cross-entropy averaged with
    per-position ``weight`` (N,) (default uniform: the token mean), with the token accuracy in parts."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    loss = ce.mean() if weight is None else (ce * weight.to(ce)).sum() / weight.sum().to(ce).clamp_min(1e-8)
    with torch.no_grad():
        acc = (logits.argmax(-1) == targets).float().mean()
    return LossBreakdown(loss, {"text_ce": loss.detach(), "text_acc": acc})


def sample_weights(supervised: Tensor) -> Tensor:
    """Bool (B, T) supervised positions -> (N,) weights of those positions (in row-major order) that give every
    row the same total weight, whatever its answer's length: 1 / (the row's supervised count)."""
    per_row = supervised.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
    return (1.0 / per_row).expand_as(supervised)[supervised]
