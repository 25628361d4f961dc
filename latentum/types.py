"""Value types shared by every layer: what a loss returns, how to sample, and a generated latent image.

Nothing here knows about networks or decoding; the layers above pass these around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class LossBreakdown(NamedTuple):
    """The house return type of every loss: a scalar to backpropagate plus its named parts to log."""

    total: Tensor
    """Scalar that the optimiser sees (already weighted)."""
    parts: dict[str, Tensor]
    """Named scalars for logging (unweighted terms, accuracies, ...); detached by convention of the caller."""


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into ids. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    """Keep only the k most likely entries (0 disables)."""
    top_p: float = 1.0
    """Keep the smallest set whose probability mass reaches top_p (1.0 disables)."""

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = SamplingParams(temperature=0.0)


@dataclass
class LatentImage:
    """A generated image as discrete semantic tokens: ``ids`` (N, G), N = grid * grid in raster order (the
    active top-left grid of the canvas, ``data.canvas``)."""

    ids: torch.Tensor

    @property
    def grid(self) -> int:
        return int(round(self.ids.size(0) ** 0.5))

    def __repr__(self) -> str:
        return f"LatentImage(tokens={self.ids.size(0)}, codebooks={self.ids.size(1)})"


@dataclass
class Judged:
    """Latent images made for one ``prompt`` and the model's own verdict on each: ``refine``'s rounds (round 0
    first) or ``best_of``'s samples. ``scores[i]`` is the log-probability that the model, reading
    ``images[i]`` back, says no further edit is needed; ``reflections[i]`` what it says (refine only)."""

    prompt: str
    images: list[LatentImage]
    scores: list[float]
    reflections: list[str]

    @property
    def best(self) -> int:
        """Index of the image the model judges best (the earliest among equals)."""
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))

    @property
    def image(self) -> LatentImage:
        """The image the model judges best."""
        return self.images[self.best]
