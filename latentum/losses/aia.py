"""Attention Interaction Alignment (AIA, arXiv 2511.22663): pure, vectorised functions.

The cross-modal interaction intensity of layer l and sample b is the attention mass that the sample's
query span puts on its key span, averaged over the span's queries and over heads (AIA §3, code version;
reference/aia-r3-vsp-geneval.md §1.2); the backbone measures it (``model.attention.span_attention_mass``).
The loss pulls it toward a piecewise-constant per-depth target with a Huber penalty (§1.3-1.4).

Shape letters:
    L  layers            B  batch           T  query tokens of the forward    S  keys (cached + new)
    H  query heads       K  kv heads        r  query heads per kv head (H = K * r)
    Q  query rows gathered from the span (padded to the batch's largest span)
    d  head dim
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentum.config import AIAConfig, AIAStage
from latentum.types import LossBreakdown

UND, GEN = 0, 1


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
