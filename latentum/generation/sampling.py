"""Token sampling: temperature, then top-k, then top-p, then a seeded multinomial draw; and the depth-wise
sampling loop that draws one image token's G codebook ids from the AR head.

Legend: N rows, V vocabulary (or codebook) entries, M image-token rows, D width, G codebooks, K codebook size.
"""

from __future__ import annotations

import torch

from latentum.types import SamplingParams


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int in [0, 2**63)); every sampler takes one."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.Generator().manual_seed(seed)


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


@torch.no_grad()
def sample_codes(head, h: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 h_uncond: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Backbone states h (M, D) -> ids (M, G) from the depth head (``model.heads.DepthHead``), one sub-step per
    depth (no cache: the depth sequence is at most G long, as the reference).

    With ``h_uncond`` and cfg_scale != 1, classifier-free guidance is applied to the logits at every depth,
    l = l_u + s * (l_c - l_u), and the sampled id is fed to both streams (LatentUM §4).
    """
    head.check_states(h)
    guided = h_uncond is not None and cfg_scale != 1.0
    if guided:
        if h_uncond.shape != h.shape:
            raise ValueError(f"h_uncond must match h {tuple(h.shape)}, got {tuple(h_uncond.shape)}")
        h = torch.cat([h, h_uncond])  # (2M, D): conditional rows first
    M = h.size(0) // 2 if guided else h.size(0)
    ids = torch.zeros(M, 0, dtype=torch.long, device=h.device)
    for _ in range(head.codebooks):
        prefix = torch.cat([ids, ids]) if guided else ids
        logits = head.logits(h, prefix)[:, -1].float()  # (M or 2M, K)
        if guided:
            l_c, l_u = logits.chunk(2)
            logits = l_u + cfg_scale * (l_c - l_u)
        nxt = sample_logits(logits, params, generator)  # (M,)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids
