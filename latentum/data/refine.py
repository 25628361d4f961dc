"""The text of reason-reflect-refine (R3, reference/aia-r3-vsp-geneval.md §2), shared by the worlds that train it
and the engine that runs it.

One round: the model generates a latent image for a prompt; reads it back and is asked ``reflect_question``;
it answers with an edit instruction, or ``NO_EDIT`` when the image already shows the prompt; a refine turn
(``refine_items``: the prompt, the previous image, the instruction) then generates the next image.
"""

from __future__ import annotations

from latentum.data.sample import Item

NO_EDIT = "no further edit"
"""The reflection that ends refinement: the image already shows the prompt."""
REFLECT_QUESTION = "What should change so that the image shows {} ?"
"""The reflection question about an image, ``{}`` the prompt."""


def reflect_question(prompt: str) -> str:
    """The question that asks what is wrong with an image against ``prompt``."""
    return REFLECT_QUESTION.format(prompt)


def refine_items(prompt: str, previous: Item, instruction: str) -> list[Item]:
    """The user turn of a refine step: the prompt, the image to edit and the model's own instruction."""
    return [prompt, previous, instruction]


def words() -> set[str]:
    """The words the protocol itself adds to a world's vocabulary."""
    return set(NO_EDIT.split()) | set(REFLECT_QUESTION.replace("{}", "").split())
