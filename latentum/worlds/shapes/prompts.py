"""GenEval-style prompts on the Shapes world: the structured constraints (``PromptSpec``), random prompts of
each GenEval category and ``corrupt``, prompt edits a scene built for the original violates (flaw injection)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from latentum.worlds.shapes.scene import COLORS, PLURALS, SHAPES

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
GENEVAL_TEMPLATE = "a photo of {}"
"""GenEval's own phrasing of a prompt (reference §4.1): ``GENEVAL_TEMPLATE.format(spec.text)``."""


@dataclass(frozen=True)
class Requirement:
    """``count`` objects of ``shape`` (of ``color``, when given)."""

    shape: str
    count: int = 1
    color: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Requirement.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"Requirement.color must be None or one of {tuple(COLORS)}, got {self.color!r}")
        if not 1 <= self.count <= 5:
            raise ValueError(f"Requirement.count must be in 1..5, got {self.count}")

    @property
    def phrase(self) -> str:
        words = [self.color] if self.color else []
        if self.count == 1:
            words.append(self.shape)
            return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
        return " ".join([NUMBERS[self.count], *words, PLURALS[self.shape]])


@dataclass(frozen=True)
class PromptSpec:
    """The structured constraints of a prompt. ``relation`` relates requirements[0] to requirements[1]."""

    category: str
    requirements: tuple[Requirement, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"PromptSpec.category must be one of {CATEGORIES}, got {self.category!r}")
        if not 1 <= len(self.requirements) <= 2:
            raise ValueError(f"PromptSpec.requirements must hold 1 or 2 items, got {len(self.requirements)}")
        if self.relation is not None and (self.relation not in RELATIONS or len(self.requirements) != 2):
            raise ValueError(f"PromptSpec.relation must be one of {RELATIONS} with two requirements, "
                             f"got {self.relation!r} with {len(self.requirements)}")

    @property
    def exact(self) -> bool:
        """Counting prompts need exactly N objects (GenEval: >= N and not >= N + 1); others need >= N."""
        return self.category == "counting"

    @property
    def text(self) -> str:
        phrases = [r.phrase for r in self.requirements]
        if self.relation:
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        return " and ".join(phrases)


# ------------------------------------------------------------------------------------------------- prompts


def _rng(rng) -> np.random.Generator:
    if not isinstance(rng, (np.random.Generator, int, np.integer)):
        raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
    return np.random.default_rng(rng)


def _pick(rng: np.random.Generator, options, k: int = 1, exclude=()) -> list:
    pool = [o for o in options if o not in exclude]
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def sample_prompt(rng, category: str | None = None) -> PromptSpec:
    """A random prompt of ``category`` (uniform over CATEGORIES when None); ``spec.text`` is the prompt."""
    rng = _rng(rng)
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES} or None, got {category!r}")
    s1, s2 = _pick(rng, SHAPES, 2)  # the two objects of a compositional prompt always differ in shape
    c1, c2 = _pick(rng, COLORS, 2)  # and colour_attr binds two different colours (GenEval: c1 != c2)
    reqs = {
        "single_object": (Requirement(s1),),
        "two_objects": (Requirement(s1), Requirement(s2)),
        "counting": (Requirement(s1, count=int(rng.integers(2, 5))),),
        "colors": (Requirement(s1, color=c1),),
        "position": (Requirement(s1, color=c1), Requirement(s2, color=c2)),
        "color_attr": (Requirement(s1, color=c1), Requirement(s2, color=c2)),
    }[category]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if category == "position" else None
    return PromptSpec(category, reqs, relation)


def corrupt(spec: PromptSpec, rng) -> PromptSpec:
    """A prompt that a scene built for ``spec`` violates: another shape, count or colour, the opposite
    relation, or (colour_attr) swapped colours, the classic attribute-binding error."""
    rng = _rng(rng)
    reqs = list(spec.requirements)
    if spec.relation is not None:
        return replace(spec, relation=OPPOSITE[spec.relation])
    if spec.category == "color_attr":
        a, b = reqs
        return replace(spec, requirements=(replace(a, color=b.color), replace(b, color=a.color)))
    if spec.category == "counting":
        count = _pick(rng, range(2, 5), exclude=(reqs[0].count,))[0]
        return replace(spec, requirements=(replace(reqs[0], count=count),))
    if spec.category == "colors":
        color = _pick(rng, COLORS, exclude=(reqs[0].color,))[0]
        return replace(spec, requirements=(replace(reqs[0], color=color),))
    i = int(rng.integers(len(reqs)))  # single_object / two_objects: ask for a shape that is not there
    reqs[i] = replace(reqs[i], shape=_pick(rng, SHAPES, exclude=[r.shape for r in reqs])[0])
    return replace(spec, requirements=tuple(reqs))
