"""Behaviour alignment for MBAQ (LatentUM §2): the frozen VLM must answer the same on quantized features.

Legend: B batch, T sequence positions, V vocabulary.

Pure functions. The teacher sees continuous encoder features, the student the same frozen VLM fed with
up-projected quantized codes; the loss is forward KL(p_teacher || p_student) on answer tokens only, with no
pixel reconstruction term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentum.types import LossBreakdown


def _check_inputs(teacher_logits: Tensor, student_logits: Tensor, answer_mask: Tensor) -> None:
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be (B, T, V), got shape {tuple(teacher_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits must match teacher_logits {tuple(teacher_logits.shape)}, "
                         f"got {tuple(student_logits.shape)}")
    if answer_mask.shape != teacher_logits.shape[:2] or answer_mask.dtype != torch.bool:
        raise ValueError(f"answer_mask must be a bool tensor of shape {tuple(teacher_logits.shape[:2])}, "
                         f"got {answer_mask.dtype} {tuple(answer_mask.shape)}")


def behaviour_kl(teacher_logits: Tensor, student_logits: Tensor, answer_mask: Tensor) -> Tensor:
    """Forward KL(p_T || p_S) summed over V and averaged over answer positions; the teacher is detached.

    Forward KL (mass-covering) is what LatentUM uses: the student is penalised wherever the teacher puts
    probability. Computed in fp32 because bf16 log-softmax differences are too coarse for a KL near zero.
    Returns 0 (still attached to the student graph) when there is no answer position.
    """
    _check_inputs(teacher_logits, student_logits, answer_mask)
    t = teacher_logits.detach()[answer_mask].float()  # (A, V), A answer positions
    s = student_logits[answer_mask].float()  # (A, V)
    if t.size(0) == 0:
        return student_logits.sum() * 0.0
    log_pt = t.log_softmax(-1)
    log_ps = s.log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (A,)
    return kl.mean()


def mbaq_loss(teacher_logits: Tensor, student_logits: Tensor, answer_mask: Tensor, vq: LossBreakdown,
              vq_weight: float = 1.0) -> LossBreakdown:
    """Stage-1 objective: behaviour KL + vq_weight * quantizer loss (LatentUM: vq_weight = 1.0)."""
    kl = behaviour_kl(teacher_logits, student_logits, answer_mask)
    total = kl + vq_weight * vq.total
    parts = {"kl": kl.detach(), "vq": vq.total.detach()}
    parts.update({f"vq/{k}": v.detach() for k, v in vq.parts.items()})
    return LossBreakdown(total, parts)
