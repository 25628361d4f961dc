"""The built-in data worlds behind one registry: task name -> sampler, and the shared vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from latentum.data import shapes, vsp
from latentum.data.sample import Sample
from latentum.data.tokenizer import TextTokenizer, build_tokenizer

STYLES = ("gymnasium", "classic")

_VSP = vsp.SAMPLERS
_SHAPES = {"shapes_t2i": shapes.t2i_sample, "shapes_qa": shapes.qa_sample}
TASKS: tuple[str, ...] = tuple(_VSP) + tuple(_SHAPES)


def make_sample(task: str, rng: np.random.Generator, *, map_sizes: Sequence[int] = (3, 4, 5, 6, 7, 8),
                canvas: int = 128, style: str | None = None) -> Sample:
    """Draw one sample of ``task``; FrozenLake tasks pick a size from ``map_sizes`` and a render style."""
    if task in _VSP:
        size = int(rng.choice(list(map_sizes)))
        style = style or STYLES[int(rng.integers(len(STYLES)))]
        return _VSP[task](rng, size, style, canvas)
    if task in _SHAPES:
        return _SHAPES[task](rng, canvas)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


class TaskMixture:
    """Samples tasks by weight: ``{"vsp_plan": 2, "vsp_hole": 1}``."""

    def __init__(self, weights: dict[str, float], **sample_kwargs):
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)} in the mixture; expected some of {TASKS}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"task weights must sum to > 0, got {weights}")
        self.names = list(weights)
        self.probs = np.array([weights[n] / total for n in self.names])
        self.kwargs = sample_kwargs

    def __call__(self, rng: np.random.Generator) -> Sample:
        task = self.names[int(rng.choice(len(self.names), p=self.probs))]
        return make_sample(task, rng, **self.kwargs)


@lru_cache(maxsize=1)
def default_tokenizer() -> TextTokenizer:
    """The word-level tokenizer over every word the built-in worlds can produce (deterministic)."""
    return build_tokenizer(sorted(vsp.vocabulary() | shapes.vocabulary()))
