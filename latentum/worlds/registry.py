"""The built-in data worlds behind one registry: task name -> sampler, and the shared vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from latentum.data.sample import Sample
from latentum.data.tokenizer import TextTokenizer, build_tokenizer
from latentum.worlds import shapes
from latentum.worlds.frozenlake import tasks as vsp

STYLES = ("gymnasium", "classic")
"""The looks a FrozenLake sample is rendered in, drawn uniformly unless a style is asked for."""
MAP_SIZES = (3, 4, 5, 6, 7, 8)

_VSP = vsp.SAMPLERS
_SHAPES = {"shapes_t2i": shapes.t2i_sample, "shapes_t2i_photo": shapes.t2i_photo_sample,
           "shapes_t2i_reason": shapes.t2i_reason_sample, "shapes_qa": shapes.qa_sample,
           "shapes_qa_steps": shapes.qa_steps_sample, "shapes_qa_checks": shapes.qa_checks_sample,
           "shapes_describe": shapes.describe_sample, "shapes_reflect": shapes.reflect_sample,
           "shapes_refine": shapes.refine_sample}
TASKS: tuple[str, ...] = tuple(_VSP) + tuple(_SHAPES)
WORLD_OPTIONS: dict[str, tuple[str, ...]] = {"frozenlake": ("map_sizes",), "shapes": ()}
"""World -> the options its tasks take in a mixture (``worlds:`` in a recipe leg)."""


def make_sample(task: str, rng: np.random.Generator, *, map_sizes: Sequence[int] = MAP_SIZES,
                canvas: int = 128, style: str | None = None) -> Sample:
    """Draw one sample of ``task``; FrozenLake tasks pick a size from ``map_sizes`` and a render style."""
    if task in _VSP:
        size = int(rng.choice(list(map_sizes)))
        style = style or STYLES[int(rng.integers(len(STYLES)))]
        return _VSP[task](rng, size, style, canvas)
    if task in _SHAPES:
        return _SHAPES[task](rng, canvas)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def check_mixture(weights: dict[str, float], worlds: dict[str, dict] | None = None) -> None:
    """ValueError naming what is wrong with a task mixture (``tasks:``) and its world options (``worlds:``)."""
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks: unknown tasks {sorted(unknown)}; expected some of {TASKS}")
    if any(w < 0 for w in weights.values()) or (weights and sum(weights.values()) <= 0):
        raise ValueError(f"tasks: weights must be >= 0 and sum to > 0, got {weights}")
    for world, options in (worlds or {}).items():
        if world not in WORLD_OPTIONS:
            raise ValueError(f"worlds: unknown world {world!r}; expected some of {sorted(WORLD_OPTIONS)}")
        bad = set(options) - set(WORLD_OPTIONS[world])
        if bad:
            raise ValueError(f"worlds.{world}: unknown options {sorted(bad)}; expected some of "
                             f"{list(WORLD_OPTIONS[world])}")
    sizes = (worlds or {}).get("frozenlake", {}).get("map_sizes", MAP_SIZES)
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s in MAP_SIZES for s in sizes):
        raise ValueError(f"worlds.frozenlake.map_sizes must be a non-empty list of sizes in {MAP_SIZES}, "
                         f"got {sizes!r}")


class TaskMixture:
    """Samples tasks by weight, e.g. ``{"vsp_plan": 2, "vsp_hole": 1}``, with each world's options."""

    def __init__(self, weights: dict[str, float], canvas: int = 128, worlds: dict[str, dict] | None = None):
        check_mixture(weights, worlds)
        if not weights:
            raise ValueError("tasks: the mixture is empty; name at least one task")
        total = sum(weights.values())
        self.names = list(weights)
        self.probs = np.array([weights[n] / total for n in self.names])
        self.kwargs = {"canvas": canvas, **(worlds or {}).get("frozenlake", {})}

    def __call__(self, rng: np.random.Generator) -> Sample:
        task = self.names[int(rng.choice(len(self.names), p=self.probs))]
        return make_sample(task, rng, **self.kwargs)


@lru_cache(maxsize=1)
def default_tokenizer() -> TextTokenizer:
    """The word-level tokenizer over every word the built-in worlds can produce (deterministic)."""
    return build_tokenizer(sorted(vsp.vocabulary() | shapes.vocabulary()))
