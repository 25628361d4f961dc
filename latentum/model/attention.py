"""Attention statistics the backbone can report: the attention mass a query span puts on a key span (the
cross-modal interaction intensity that the AIA loss regularises, arXiv 2511.22663 §3; reference
aia-r3-vsp-geneval.md §1.2), computed without materialising the attention map.

Shape letters:
    B  batch           T  query tokens of the forward    S  keys (cached + new)
    H  query heads     K  kv heads        r  query heads per kv head (H = K * r)
    Q  query rows gathered from the span (padded to the batch's largest span)
    d  head dim
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def _gather_span_rows(query_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (B, Q) of each sample's span queries in order, and which of the Q slots are real (B, Q)."""
    counts = query_mask.sum(1)  # (B,)
    qmax = int(counts.max().item())
    # Stable sort puts span positions first, in sequence order; the tail of each row is padding.
    order = torch.sort((~query_mask).to(torch.int8), dim=1, stable=True).indices[:, :qmax]  # (B, Q)
    slot = torch.arange(qmax, device=query_mask.device)[None, :] < counts[:, None]  # (B, Q)
    return order, slot


def span_attention_mass(q: Tensor, k: Tensor, allowed: Tensor, query_mask: Tensor,
                        key_mask: Tensor) -> Tensor:
    """Mean attention mass each sample's query span puts on its key span, ``(B,)``, differentiable.

    For a query row q: ``m_q = exp(LSE_{k in key span, allowed} s_qk - LSE_{k allowed} s_qk)``, i.e. the sum
    of its softmax attention over the key span, computed from only the span's rows (Q x S logits per head,
    in fp32) instead of the full T x S map (reference §1.7.1). Averaged over heads and over the span's
    query rows that may attend to at least one key. A sample with an empty query span gets 0.

    Args:
        q: ``(B, H, T, d)`` queries after RoPE; k: ``(B, K, S, d)`` keys after RoPE (GQA: H % K == 0).
        allowed: ``(B, T, S)`` bool, True where query t may attend key s (the attention's own mask).
        query_mask: ``(B, T)`` bool query span; key_mask: ``(B, S)`` bool key span.
    """
    B, H, T, d = q.shape
    S = k.shape[2]
    if k.ndim != 4 or k.shape[0] != B or H % k.shape[1] or k.shape[3] != d:
        raise ValueError(f"span_attention_mass: k must be (B={B}, K, S, d={d}) with H={H} divisible by K, "
                         f"got {tuple(k.shape)}")
    for name, t, shape in (("allowed", allowed, (B, T, S)), ("query_mask", query_mask, (B, T)),
                           ("key_mask", key_mask, (B, S))):
        if t.dtype != torch.bool or tuple(t.shape) != shape:
            raise ValueError(f"span_attention_mass: {name} must be a bool tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if not query_mask.any():
        return q.new_zeros(B, dtype=torch.float32)
    idx, slot = _gather_span_rows(query_mask)  # (B, Q), (B, Q)
    Q = idx.shape[1]
    q_sel = q.gather(2, idx[:, None, :, None].expand(B, H, Q, d))  # (B, H, Q, d)
    ok = allowed.gather(1, idx[:, :, None].expand(B, Q, S)) & slot[:, :, None]  # (B, Q, S)
    q_sel = rearrange(q_sel.float(), "b (k r) q d -> b k r q d", k=k.shape[1])
    with torch.autocast(q.device.type, enabled=False):  # the LSE needs fp32 even under bf16 autocast
        logits = torch.einsum("bkrqd,bksd->bkrqs", q_sel, k.float()) * d**-0.5  # (B, K, r, Q, S)
    # A finite floor instead of -inf keeps empty rows NaN-free in value and gradient; they are zeroed below.
    floor = torch.finfo(torch.float32).min
    ok = ok[:, None, None]  # (B, 1, 1, Q, S)
    lse_all = logits.masked_fill(~ok, floor).logsumexp(-1)  # (B, K, r, Q)
    lse_key = logits.masked_fill(~(ok & key_mask[:, None, None, None, :]), floor).logsumexp(-1)
    mass = (lse_key - lse_all).exp()  # (B, K, r, Q)
    mass = rearrange(mass, "b k r q -> b q (k r)").mean(-1)  # (B, Q)
    live = ok[:, 0, 0].any(-1)  # (B, Q) real span rows with at least one allowed key
    mass = torch.where(live, mass, torch.zeros_like(mass))
    return mass.sum(1) / live.sum(1).clamp(min=1)
