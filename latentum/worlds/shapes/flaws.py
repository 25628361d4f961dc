"""Flaw injection for reason-reflect-refine: a scene that shows a prompt, edited so it no longer does, with the
instruction that undoes the edit (``latentum.data.refine``'s protocol), and the R3 task samples built from it.

The edits are the errors GenEval counts (reference §4.1): a wrong shape, a missing or extra object, a wrong
colour (in ``color_attr``: the attribute-binding error) and a flipped relation. Each flawed scene is checked
against the prompt with the oracle's rules on its exact geometry (``satisfies``), so the verdict a reflection
sample teaches is the oracle's.
"""

from __future__ import annotations

from dataclasses import replace

from latentum.data.refine import NO_EDIT, refine_items, reflect_question, words
from latentum.data.sample import LatentView, Sample
from latentum.worlds.shapes.oracle import satisfies
from latentum.worlds.shapes.prompts import PromptSpec, _pick, _rng, sample_prompt
from latentum.worlds.shapes.scene import COLORS, SHAPES, Obj, Scene, render
from latentum.worlds.shapes.tasks import _MAX_SIZE_BY_COUNT, BORDER, MIN_SIZE, _apart, scene_for

EDITS = ("shape", "remove", "add", "color", "swap")
"""Flaw kinds: replace a shape, remove an object, add one, recolour one, swap two objects' places."""


def _subject(o: Obj, spec: PromptSpec) -> str:
    """How an instruction names ``o``: with its colour where the prompt gives colours."""
    return f"the {o.color} {o.shape}" if any(r.color for r in spec.requirements) else f"the {o.shape}"


def _changed(scene: Scene, i: int, **fields) -> Scene:
    """``scene`` with object ``i``'s ``fields`` replaced."""
    objs = list(scene.objects)
    objs[i] = replace(objs[i], **fields)
    return Scene(tuple(objs))


def _recolor(scene: Scene, spec: PromptSpec, rng) -> tuple[Scene, str] | None:
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    color = _pick(rng, COLORS, exclude=(o.color,))[0]
    return _changed(scene, i, color=color), f"make the {o.shape} {o.color}"


def _reshape(scene: Scene, spec: PromptSpec, rng) -> tuple[Scene, str] | None:
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    shape = _pick(rng, SHAPES, exclude=[r.shape for r in spec.requirements])[0]
    return _changed(scene, i, shape=shape), f"replace the {shape} with a {o.shape}"


def _remove(scene: Scene, spec: PromptSpec, rng) -> tuple[Scene, str] | None:
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    rest = scene.objects[:i] + scene.objects[i + 1:]
    what = f"one {o.shape}" if spec.category == "counting" else f"a {o.shape}"
    return Scene(rest), f"add {what}"


def _add(scene: Scene, spec: PromptSpec, rng, tries: int = 200) -> tuple[Scene, str] | None:
    n = len(scene.objects) + 1
    if n not in _MAX_SIZE_BY_COUNT:
        return None
    shape = spec.requirements[0].shape
    color = _pick(rng, COLORS)[0]
    for _ in range(tries):
        size = float(rng.uniform(MIN_SIZE, _MAX_SIZE_BY_COUNT[n]))
        lo, hi = BORDER + size / 2, 1 - BORDER - size / 2
        o = Obj(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size)
        if all(_apart(o, p) for p in scene.objects):
            return Scene((*scene.objects, o)), f"remove one {shape}"
    return None


def _swap(scene: Scene, spec: PromptSpec, rng) -> tuple[Scene, str] | None:
    a, b = scene.objects[:2]
    moved = Scene((replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y), *scene.objects[2:]))
    inside = all(BORDER <= v <= 1 - BORDER for o in moved.objects[:2] for v in o.box)
    if not inside or not _apart(*moved.objects[:2]):
        return None
    return moved, f"move {_subject(a, spec)} {spec.relation} {_subject(b, spec)}"


_BY_CATEGORY = {
    "single_object": (_reshape, _remove),
    "two_objects": (_reshape, _remove),
    "counting": (_remove, _add),
    "colors": (_recolor,),
    "position": (_swap, _recolor),
    "color_attr": (_recolor,),
}


def inject_flaw(scene: Scene, spec: PromptSpec, rng, tries: int = 20) -> tuple[Scene, str]:
    """``scene`` (which shows ``spec``) edited so it does not, and the instruction that undoes the edit."""
    if not isinstance(spec, PromptSpec):
        raise TypeError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    if not satisfies(scene, spec):
        raise ValueError(f"scene must show the prompt {spec.text!r} before a flaw is injected")
    rng = _rng(rng)
    edits = _BY_CATEGORY[spec.category]
    for _ in range(tries):
        out = edits[int(rng.integers(len(edits)))](scene, spec, rng)
        if out is not None and not satisfies(out[0], spec):
            return out
    raise RuntimeError(f"could not inject a flaw into a scene for {spec.text!r} in {tries} tries")


def reflect_sample(rng, canvas: int = 128) -> Sample:
    """Reflection: user [image (read as its latent), reflect question about a prompt], assistant [the edit
    instruction, or NO_EDIT when the image shows the prompt] (half each)."""
    rng = _rng(rng)
    spec = sample_prompt(rng)
    scene = scene_for(spec, rng)
    instruction = NO_EDIT
    if rng.random() < 0.5:
        scene, instruction = inject_flaw(scene, spec, rng)
    image = render(scene, canvas).view(LatentView)  # read as its latent, as refine reads its own image back
    return Sample([image, reflect_question(spec.text)], [instruction], "shapes_reflect",
                  {"spec": spec, "scene": scene, "answer": instruction})


def refine_sample(rng, canvas: int = 128) -> Sample:
    """Refinement: user [prompt, a flawed image read as its latent, the instruction], assistant [the image the
    instruction asks for: the scene before the flaw]."""
    rng = _rng(rng)
    spec = sample_prompt(rng)
    scene = scene_for(spec, rng)
    flawed, instruction = inject_flaw(scene, spec, rng)
    user = refine_items(spec.text, render(flawed, canvas).view(LatentView), instruction)
    return Sample(user, [render(scene, canvas)], "shapes_refine", {"spec": spec, "scene": scene, "flawed": flawed})


def vocabulary() -> set[str]:
    """The words of the instructions and of the R3 protocol."""
    return words() | set("make replace with add remove one move a the".split())
