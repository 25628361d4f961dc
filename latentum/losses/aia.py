"""Attention Interaction Alignment (AIA, arXiv 2511.22663): pure, vectorised functions.

The cross-modal interaction intensity of layer l and sample b is the attention mass that the sample's
query span puts on its key span, averaged over the span's queries and over heads (AIA §3, code version;
reference/aia-r3-vsp-geneval.md §1.2). The loss pulls it toward a piecewise-constant per-depth target with
a Huber penalty (§1.3-1.4).

Shape letters:
    L  layers            B  batch           T  query tokens of the forward    S  keys (cached + new)
    H  query heads       K  kv heads        r  query heads per kv head (H = K * r)
    Q  query rows gathered from the span (padded to the batch's largest span)
    d  head dim
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from latentum.config import AIAConfig, AIAStage
from latentum.losses.breakdown import LossBreakdown

UND, GEN = 0, 1


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


def stage_targets(stages: list[AIAStage], depth: int) -> tuple[Tensor, Tensor]:
    """Per-layer (targets (L,), deltas (L,)): layer l takes the last stage whose start <= l / depth."""
    if depth < 1:
        raise ValueError(f"stage_targets: depth must be >= 1, got {depth}")
    if not stages or stages[0].start != 0.0:
        raise ValueError("stage_targets: stages must be non-empty and start with a stage at 0.0")
    targets, deltas = [], []
    for layer in range(depth):
        f = layer / depth
        # The tolerance lets a YAML start of 0.3333 mean 1/3 without moving layer L/3 a stage down.
        stage = [s for s in stages if s.start <= f + 1e-4][-1]
        targets.append(stage.target)
        deltas.append(stage.delta)
    return torch.tensor(targets), torch.tensor(deltas)


def huber(x: Tensor, delta: Tensor) -> Tensor:
    """Elementwise PyTorch ``HuberLoss(delta)``, delta a tensor: 0.5 x^2 inside, delta(|x| - delta/2) out."""
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def _check_inputs(mass: Tensor, task: Tensor, valid: Tensor) -> None:
    if mass.ndim != 2:
        raise ValueError(f"aia_loss: mass must be (L, B), got shape {tuple(mass.shape)}")
    B = mass.shape[1]
    if task.shape != (B,) or task.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"aia_loss: task must be an integer (B={B},) tensor, "
                         f"got {task.dtype} {tuple(task.shape)}")
    if not ((task == UND) | (task == GEN)).all():
        raise ValueError(f"aia_loss: task must hold 0 (und) or 1 (gen), got values {task.unique().tolist()}")
    if valid.shape != (B,) or valid.dtype != torch.bool:
        raise ValueError(f"aia_loss: valid must be a bool (B={B},) tensor, "
                         f"got {valid.dtype} {tuple(valid.shape)}")


def aia_loss(mass: Tensor, task: Tensor, valid: Tensor, cfg: AIAConfig) -> LossBreakdown:
    """AIA loss ``sum_{l,b} w_task(b) * valid_b * Huber_{delta_l}(I_lb - T_l^task(b)) / (L * B)``.

    The mean runs over ALL L*B entries, invalid samples (e.g. prompts dropped for CFG) included, as AIA's
    code does (reference §1.2): dropping samples does not raise the weight of the rest. Invalid samples
    contribute exactly zero loss and zero gradient.

    Parts (detached): ``aia_und`` / ``aia_gen`` (each task's weighted share of ``total``) and
    ``intensity_und`` / ``intensity_gen`` (mean intensity over that task's valid samples and all layers),
    present only for tasks with at least one valid sample in the batch.
    """
    _check_inputs(mass, task, valid)
    L, B = mass.shape
    is_gen = task == GEN  # (B,)
    per_task = []
    for stages in (cfg.und_stages, cfg.gen_stages):
        t, dl = stage_targets(stages, L)
        per_task.append((t.to(mass.device, mass.dtype), dl.to(mass.device, mass.dtype)))
    (t_und, d_und), (t_gen, d_gen) = per_task
    target = torch.where(is_gen[None, :], t_gen[:, None], t_und[:, None])  # (L, B)
    delta = torch.where(is_gen[None, :], d_gen[:, None], d_und[:, None])  # (L, B)
    weight = torch.where(is_gen, cfg.gen_weight, cfg.und_weight).to(mass.dtype) * valid.to(mass.dtype)  # (B,)
    # where() on the residual, not a multiply after: a NaN intensity of an invalid sample (e.g. no key span)
    # must not poison the sum or, through 0 * NaN in backward, the gradient.
    diff = torch.where(valid[None, :], mass - target, torch.zeros_like(mass))  # (L, B)
    per = huber(diff, delta) * weight  # (L, B)
    total = per.sum() / (L * B)
    parts: dict[str, Tensor] = {}
    for name, sel in (("und", ~is_gen & valid), ("gen", is_gen & valid)):
        if sel.any():
            parts[f"aia_{name}"] = (per[:, sel].sum() / (L * B)).detach()
            parts[f"intensity_{name}"] = mass[:, sel].mean().detach()
    return LossBreakdown(total=total, parts=parts)
