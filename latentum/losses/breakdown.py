"""The house return type of every loss: a scalar to backpropagate plus its named parts to log."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LossBreakdown(NamedTuple):
    total: Tensor
    """Scalar that the optimiser sees (already weighted)."""
    parts: dict[str, Tensor]
    """Named scalars for logging (unweighted terms, accuracies, ...); detached by convention of the caller."""
