"""Shapes task samples: scenes built for a prompt, text to image, and understanding QA with answers known by
construction (the oracle's rules on the scene's exact geometry, ``satisfies``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from latentum.data.sample import Sample
from latentum.worlds.shapes.oracle import CONE, _direction_components, satisfies, scene_detections
from latentum.worlds.shapes.prompts import (
    GENEVAL_TEMPLATE,
    NUMBERS,
    RELATIONS,
    PromptSpec,
    _pick,
    _rng,
    corrupt,
    sample_prompt,
)
from latentum.worlds.shapes.scene import COLORS, PLURALS, SHAPES, Obj, Scene, render

QA_TYPES = ("count", "color", "relation", "match")
SAFE_CONE = 0.6
"""Scenes are built with this stricter cone so a relation survives downsampling to 64 px."""
MIN_SIZE, MAX_SIZE = 22 / 128, 40 / 128
GAP = 8 / 128
"""Minimum gap between object boxes: connected components stay separate even at 64 px."""
BORDER = 3 / 128


# ------------------------------------------------------------------------------------------------- scenes

_MAX_SIZE_BY_COUNT = {1: 40 / 128, 2: 40 / 128, 3: 34 / 128, 4: 30 / 128, 5: 28 / 128}


def _apart(o: Obj, p: Obj) -> bool:
    """Boxes separated by at least GAP along some axis."""
    a, b = o.box, p.box
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= GAP


def _obj_direction(a: Obj, b: Obj) -> dict[str, float]:
    da, db = scene_detections(Scene((a, b)), canvas=1)
    return _direction_components(da, db)


def _place(items: list[tuple[str, str]], rng: np.random.Generator, tries: int = 200) -> Scene | None:
    """Random non-overlapping placement of (shape, colour) items, or None when the canvas is too crowded."""
    hi = _MAX_SIZE_BY_COUNT[len(items)]
    objs: list[Obj] = []
    for shape, color in items:
        for _ in range(tries):
            size = float(rng.uniform(MIN_SIZE, hi))
            lo_c, hi_c = BORDER + size / 2, 1 - BORDER - size / 2
            o = Obj(shape, color, float(rng.uniform(lo_c, hi_c)), float(rng.uniform(lo_c, hi_c)), size)
            if all(_apart(o, p) for p in objs):
                objs.append(o)
                break
        else:
            return None
    return Scene(tuple(objs))


def _scene(items: list[tuple[str, str]], rng: np.random.Generator, accept=lambda s: True,
           tries: int = 1000) -> Scene:
    for _ in range(tries):
        scene = _place(items, rng)
        if scene is not None and accept(scene):
            return scene
    raise RuntimeError(f"could not place {items} in {tries} tries")


def scene_for(spec: PromptSpec, rng) -> Scene:
    """A random scene satisfying ``spec`` with exactly the objects it asks for (colours drawn where the
    prompt leaves them free). Relations are built inside a stricter cone so they survive a 64 px render."""
    if not isinstance(spec, PromptSpec):
        raise TypeError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    rng = _rng(rng)
    items = [(r.shape, r.color or _pick(rng, COLORS)[0]) for r in spec.requirements for _ in range(r.count)]
    if spec.relation is None:
        return _scene(items, rng)
    rel = spec.relation
    return _scene(items, rng, lambda s: _obj_direction(s.objects[0], s.objects[1])[rel] > SAFE_CONE)


# ------------------------------------------------------------------------------------------------ samples


def t2i_sample(rng, canvas: int = 128) -> Sample:
    """Text to image: user [prompt], assistant [image of a scene satisfying it]."""
    rng = _rng(rng)
    spec = sample_prompt(rng)
    scene = scene_for(spec, rng)
    return Sample([spec.text], [render(scene, canvas)], "shapes_t2i", {"spec": spec, "scene": scene})


def t2i_photo_sample(rng, canvas: int = 128) -> Sample:
    """Text to image with the prompt in GenEval's template ("a photo of a red circle")."""
    s = t2i_sample(rng, canvas)
    return Sample([GENEVAL_TEMPLATE.format(s.user[0])], s.assistant, "shapes_t2i_photo", s.meta)


def t2i_reason_sample(rng, canvas: int = 128) -> Sample:
    """Text to image after a plan (R3's reason step): user [prompt], assistant [the layout the image will show,
    written as ``describe_text`` writes a scene ("a red circle at row 2 column 5 , a blue square at row 2 column
    1"), the image]. The plan lists every object once, so counts and places are decided in words before any code
    is drawn."""
    s = t2i_sample(rng, canvas)
    return Sample(s.user, [describe_text(s.meta["scene"]), *s.assistant], "shapes_t2i_reason", s.meta)


def _count_question(rng: np.random.Generator) -> tuple[Scene, str, str, PromptSpec | None]:
    shape = _pick(rng, SHAPES)[0]
    k = int(rng.integers(0, 5))
    n_other = int(rng.integers(1 if k == 0 else 0, 4 - k + 1))
    items = [(shape, _pick(rng, COLORS)[0]) for _ in range(k)]
    items += [(_pick(rng, SHAPES, exclude=(shape,))[0], _pick(rng, COLORS)[0]) for _ in range(n_other)]
    items = [items[i] for i in rng.permutation(len(items))]
    scene = _scene(items, rng)
    answer = NUMBERS[sum(o.shape == shape for o in scene.objects)]
    return scene, f"How many {PLURALS[shape]} are there ?", answer, None


def _color_question(rng: np.random.Generator) -> tuple[Scene, str, str, PromptSpec | None]:
    shape, color = _pick(rng, SHAPES)[0], _pick(rng, COLORS)[0]
    items = [(shape, color)] + [(_pick(rng, SHAPES, exclude=(shape,))[0], _pick(rng, COLORS)[0])
                                for _ in range(int(rng.integers(0, 3)))]
    scene = _scene([items[i] for i in rng.permutation(len(items))], rng)
    answer = next(o.color for o in scene.objects if o.shape == shape)
    return scene, f"What colour is the {shape} ?", answer, None


def _relation_question(rng: np.random.Generator) -> tuple[Scene, str, str, PromptSpec]:
    spec = sample_prompt(rng, "position")
    rel = spec.relation
    if rng.random() < 0.5:
        scene = scene_for(spec, rng)
    else:  # the asked relation clearly fails: built for another relation, kept only well outside the cone
        other = replace(spec, relation=_pick(rng, RELATIONS, exclude=(rel,))[0])
        items = [(r.shape, r.color) for r in spec.requirements]

        def clear_no(s: Scene) -> bool:
            d = _obj_direction(*s.objects)
            return d[other.relation] > SAFE_CONE and d[rel] < 2 * CONE - SAFE_CONE

        scene = _scene(items, rng, clear_no)
    a, b = (f"the {r.color} {r.shape}" for r in spec.requirements)
    answer = "Yes" if satisfies(scene, spec) else "No"
    return scene, f"Is {a} {rel} {b} ?", answer, spec


def _match_question(rng: np.random.Generator) -> tuple[Scene, str, str, PromptSpec]:
    spec = sample_prompt(rng)
    scene = scene_for(spec, rng)
    asked = spec if rng.random() < 0.5 else corrupt(spec, rng)
    answer = "Yes" if satisfies(scene, asked) else "No"
    return scene, f"Does the image show {asked.text} ?", answer, asked


_QUESTIONS = {"count": _count_question, "color": _color_question, "relation": _relation_question,
              "match": _match_question}


def qa_sample(rng, canvas: int = 128, qtype: str | None = None) -> Sample:
    """Understanding QA with answers known from the scene: count, colour, relation (Yes/No balanced) and
    prompt match (Yes/No balanced). ``qtype`` picks one of QA_TYPES (uniform when None)."""
    rng = _rng(rng)
    if qtype is None:
        qtype = QA_TYPES[int(rng.integers(len(QA_TYPES)))]
    if qtype not in _QUESTIONS:
        raise ValueError(f"qtype must be one of {QA_TYPES} or None, got {qtype!r}")
    scene, question, answer, spec = _QUESTIONS[qtype](rng)
    meta = {"scene": scene, "spec": spec, "question_type": qtype, "answer": answer}
    return Sample([render(scene, canvas), question], [answer], "shapes_qa", meta)


DESCRIBE_QUESTION = "Write the image as text ."
DESCRIBE_GRID = 8
"""A description places each object in the cell of a DESCRIBE_GRID x DESCRIBE_GRID grid that holds its centre."""


def _cell(v: float) -> int:
    return min(int(v * DESCRIBE_GRID), DESCRIBE_GRID - 1)


def _at(o: Obj) -> str:
    return f"{o.color} {o.shape} at row {_cell(o.y) + 1} column {_cell(o.x) + 1}"


def _reading_order(scene: Scene) -> list[Obj]:
    return sorted(scene.objects, key=lambda o: (_cell(o.y), _cell(o.x), o.x))


def describe_text(scene: Scene) -> str:
    """Every object of ``scene`` in reading order of its centre's cell: "a red circle at row 2 column 5 , a blue
    square at row 6 column 1" (rows and columns from 1, top left)."""
    return " , ".join(f"a {_at(o)}" for o in _reading_order(scene))


def describe_sample(rng, canvas: int = 128) -> Sample:
    """Dense understanding: user [image, DESCRIBE_QUESTION], assistant [every object's colour, shape and cell,
    ``describe_text``]. One to five objects of any shapes and colours, repeats allowed. Each answer supervises every
    object of the scene, where a QA sample supervises one word."""
    rng = _rng(rng)
    items = [(_pick(rng, SHAPES)[0], _pick(rng, COLORS)[0]) for _ in range(int(rng.integers(1, 6)))]
    scene = _scene(items, rng)
    return Sample([render(scene, canvas), DESCRIBE_QUESTION], [describe_text(scene)], "shapes_describe",
                  {"scene": scene})


def qa_steps_sample(rng, canvas: int = 128, qtype: str | None = None) -> Sample:
    """Shapes QA worked out: the description of the image first (``describe_text``), then the answer after a
    comma, e.g. "a red circle at row 2 column 5 , a blue square at row 6 column 1 , Yes" (the answer is the words
    after the last comma, ``final_answer``). A question asks one word that sums up the whole scene; the model
    reads the scene object by object, as it describes, and answers from its own words. Same questions and
    answers as ``qa_sample``."""
    s = qa_sample(rng, canvas, qtype)
    answer = f"{describe_text(s.meta['scene'])} , {s.meta['answer']}"
    return Sample(s.user, [answer], "shapes_qa_steps", s.meta)


def checks_text(scene: Scene, spec: PromptSpec) -> str:
    """What a Yes / No about ``spec`` rests on, read off ``scene``: how many of each asked object it holds ("two
    red circles", "zero squares"), then, for a relation, where the first of each related object is ("the red
    circle at row 2 column 5 , the blue square at row 2 column 1")."""
    objs = _reading_order(scene)
    steps, found = [], []
    for r in spec.requirements:
        matched = [o for o in objs if o.shape == r.shape and r.color in (None, o.color)]
        found.append(matched)
        noun = r.shape if len(matched) == 1 else PLURALS[r.shape]
        steps.append(" ".join(w for w in (NUMBERS[len(matched)], r.color, noun) if w))
    if spec.relation is not None and all(found):
        steps += [f"the {_at(group[0])}" for group in found]
    return " , ".join(steps)


def qa_checks_sample(rng, canvas: int = 128, qtype: str | None = None) -> Sample:
    """Shapes QA worked out further than ``qa_steps_sample``: after the description, a relation or match question
    writes the checks its Yes / No rests on (``checks_text``), then answers, e.g. "a red circle at row 2 column 5 ,
    a blue square at row 2 column 1 , one red circle , one blue square , the red circle at row 2 column 5 , the blue
    square at row 2 column 1 , No" for "Is the red circle left of the blue square ?". Each check copies or counts
    from the model's own description, so the answer compares words already written (FrozenLake's relation is
    answered the same way). Count and colour questions, whose answer is itself such a check, read as in
    ``qa_steps_sample``. Same questions and answers as ``qa_sample``."""
    s = qa_sample(rng, canvas, qtype)
    steps = [describe_text(s.meta["scene"])]
    if s.meta["spec"] is not None:
        steps.append(checks_text(s.meta["scene"], s.meta["spec"]))
    return Sample(s.user, [" , ".join([*steps, s.meta["answer"]])], "shapes_qa_checks", s.meta)


def vocabulary() -> set[str]:
    """Every word the Shapes prompts, questions and answers contain ("?" is a word of its own)."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS)
    words |= {w for r in RELATIONS for w in r.split()}
    words |= set("a an and the ? How many are there What colour is Is Does image show Yes No".split())
    words |= set(DESCRIBE_QUESTION.split()) | set("at row column ,".split())
    words |= {str(k) for k in range(1, DESCRIBE_GRID + 1)}
    return words | set(GENEVAL_TEMPLATE.replace("{}", "").split())
