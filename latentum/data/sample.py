"""The one sample format every data world produces and the model consumes.

A sample is a two-turn conversation, as in the LatentUM interleaved JSONL: a user turn and an assistant turn,
each a list of items that are either text (``str``) or an image (``np.ndarray``, uint8, (H, W, 3), already
at the model's canvas size). Images in the user turn are *inputs* (continuous encoder features); images in
the assistant turn are *targets* (latent tokens the generation branch must produce and the understanding
branch reads back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Item = str | np.ndarray


def final_answer(text: str) -> str:
    """The answer a worked-out reply ends with: the words after its last comma (all of ``text`` if none), as a
    benchmark's scorer reads the answer out of a reply ("player row 2 column 3 , goal row 4 column 4 , Above")."""
    return text.rsplit(",", 1)[-1].strip()


class Attempt(str):
    """Assistant text the model reads but is not trained to say: an action it tries and takes back (a world's
    retry samples). Everything after it (the imagined image, the verdict) is supervised as usual."""


class LatentView(np.ndarray):
    """A user image the model reads as its latent codes (the way it reads a visual thought back) instead of as
    continuous encoder features; never generated. ``image.view(LatentView)``. Training questions about such
    images teaches the model to answer about its own thoughts (``answer_latents``;
    ``PackedStageConfig.latent_inputs``)."""


@dataclass
class Sample:
    user: list[Item]
    assistant: list[Item]
    task: str
    """Task name, e.g. a world's "..._plan" or "..._t2i"; selects the AIA task and metrics."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Ground truth for evaluation (map, answer, prompt spec...); never fed to the model."""

    def __post_init__(self):
        for turn in ("user", "assistant"):
            for i, item in enumerate(getattr(self, turn)):
                if isinstance(item, str):
                    continue
                if not (isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3
                        and item.shape[2] == 3):
                    raise TypeError(f"Sample.{turn}[{i}] must be str or a uint8 (H, W, 3) array, got "
                                    f"{type(item).__name__} {getattr(item, 'shape', '')}")

    @property
    def is_text_to_image(self) -> bool:
        """Text in, only images out: the rows classifier-free guidance drops the prompt of."""
        return (bool(self.assistant) and all(isinstance(x, str) for x in self.user)
                and all(isinstance(x, np.ndarray) for x in self.assistant))

    @property
    def images(self) -> list[np.ndarray]:
        return [x for x in self.user + self.assistant if isinstance(x, np.ndarray)]
