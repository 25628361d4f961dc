"""The Shapes world: flat-colour shapes on a white canvas, GenEval-style prompts and an exact pixel oracle.

GenEval (reference/aia-r3-vsp-geneval.md §4.1) scores text-to-image models with a detector, CLIP colours and
box-centre geometry. Here the world is synthetic (§4.3), so the detector is replaced by deterministic parsing
(palette quantisation, connected components, fill-ratio invariants) while the *rules* stay GenEval's:
counting is exact, colour is judged per matched object, position compares box centres after shrinking the
offset by 0.1 * (dim_a + dim_b) and accepts a +-60 degree cone. The same world also yields understanding QA
with answers known by construction, and ``corrupt`` gives prompt edits a scene violates (flaw injection).

Geometry: an ``Obj`` lives in canvas fractions (centre x, y and side ``size`` in [0, 1]) so one scene renders
at any canvas; a ``Detected`` object lives in pixels, boxes as (x0, y0, x1, y1) with x1, y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from latentum.data.sample import Sample

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 230, 20),
    "purple": (150, 40, 190),
    "orange": (250, 120, 0),
}
BACKGROUND = (255, 255, 255)
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QA_TYPES = ("count", "color", "relation", "match")

POSITION_MARGIN = 0.1
"""GenEval's per-axis shrink of the centre offset, times (dim_a + dim_b)."""
CONE = 0.5
"""A relation holds when its direction component exceeds cos(60 degrees)."""
SAFE_CONE = 0.6
"""Scenes are built with this stricter cone so a relation survives downsampling to 64 px."""
MIN_SIZE, MAX_SIZE = 22 / 128, 40 / 128
GAP = 8 / 128
"""Minimum gap between object boxes: connected components stay separate even at 64 px."""
BORDER = 3 / 128
MIN_CANVAS = 64


@dataclass(frozen=True)
class Obj:
    """One shape: centre (x, y) and bounding-box side ``size``, all as fractions of the canvas side."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Obj.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"Obj.color must be one of {tuple(COLORS)}, got {self.color!r}")
        if not 0 < self.size < 1:
            raise ValueError(f"Obj.size must be in (0, 1) (fraction of the canvas), got {self.size}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = ()


@dataclass(frozen=True)
class Detected:
    """An object found in pixels (or taken from a scene's geometry).

    ``box`` is (x0, y0, x1, y1) in pixels with exclusive ends; ``shape`` may be "other" for blobs that are
    none of SHAPES (they never match a requirement).
    """

    shape: str
    color: str
    box: tuple[float, float, float, float]
    area: float

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def dims(self) -> tuple[float, float]:
        return (self.box[2] - self.box[0], self.box[3] - self.box[1])


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


class OracleReport(NamedTuple):
    correct: bool
    reason: str
    score: float
    """Fraction of the prompt's constraints satisfied (partial credit)."""
    detections: list[Detected]


# ----------------------------------------------------------------------------------------------- rendering


def _pixel_box(o: Obj, canvas: int) -> tuple[int, int, int, int]:
    side = max(3, round(o.size * canvas))
    left, top = round(o.x * canvas - side / 2), round(o.y * canvas - side / 2)
    return left, top, left + side - 1, top + side - 1  # inclusive, as PIL draws


def render(scene: Scene, canvas: int = 128) -> np.ndarray:
    """Draw ``scene`` as a uint8 (canvas, canvas, 3) array (no antialiasing, deterministic)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render: scene must be a Scene, got {type(scene).__name__}")
    if canvas < MIN_CANVAS:
        raise ValueError(f"render: canvas must be >= {MIN_CANVAS}, got {canvas}")
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = _pixel_box(o, canvas)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # an upright triangle filling the box: apex at the top centre
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return np.asarray(img, dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------------------- parsing


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise TypeError(f"image must be a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__} "
                        f"{getattr(image, 'shape', '')}")
    if min(image.shape[:2]) < MIN_CANVAS:
        raise ValueError(f"image must be at least {MIN_CANVAS} px on each side, got {image.shape[:2]}")
    return image


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True as (row, start, end exclusive), sorted by row then start."""
    d = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)
    ys, x0 = np.nonzero(d == 1)
    _, x1 = np.nonzero(d == -1)
    return ys, x0, x1


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask`` as arrays of run indices, by union-find over overlapping runs."""
    ys, x0, x1 = _runs(mask)
    parent = np.arange(len(ys))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bounds = np.searchsorted(ys, np.arange(mask.shape[0] + 1))
    for y in np.unique(ys)[1:]:
        i, i_end, j, j_end = bounds[y - 1], bounds[y], bounds[y], bounds[y + 1]
        while i < i_end and j < j_end:  # two pointers over the sorted runs of rows y-1 and y
            if x0[i] < x1[j] and x0[j] < x1[i]:
                parent[find(i)] = find(j)
            if x1[i] < x1[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(len(ys))], dtype=np.int64)
    return [np.nonzero(roots == r)[0] for r in np.unique(roots)]


def _classify(fill: float, aspect: float, upper: float) -> str:
    """Shape from invariants: a triangle keeps ~1/4 of its mass above its box's middle, a square fills its
    box (~1.0), a circle fills pi/4 of it. Elongated or sparse blobs are "other" (never a match)."""
    if aspect > 1.5 or fill < 0.35:
        return "other"
    if upper < 0.38:
        return "triangle"
    return "square" if fill >= 0.9 else "circle"


def _describe(color: str, ys: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> Detected:
    lengths = x1 - x0
    area = float(lengths.sum())
    top, bottom = ys.min(), ys.max() + 1
    left, right = x0.min(), x1.max()
    mid = (top + bottom) / 2
    upper = float((lengths * np.clip(mid - ys, 0, 1)).sum()) / area
    w, h = right - left, bottom - top
    shape = _classify(area / (w * h), max(w, h) / min(w, h), upper)
    return Detected(shape, color, (float(left), float(top), float(right), float(bottom)), area)


def parse(image, max_color_dist: float = 80.0, min_area_frac: float = 0.0015) -> list[Detected]:
    """Objects in ``image`` (PIL or uint8 (H, W, 3), any size >= 64 px), sorted by area, largest first.

    Each pixel takes the nearest palette colour (background included) within ``max_color_dist``; blended
    edge pixels match nothing. Blobs smaller than ``min_area_frac`` of the image are dropped.
    """
    image = _as_array(image)
    names = list(COLORS)
    palette = np.array([BACKGROUND] + [COLORS[c] for c in names], dtype=np.float32)  # (P, 3)
    flat = image.reshape(-1, 3).astype(np.float32)  # (H*W, 3)
    # squared distances as |x|^2 - 2 x.p + |p|^2: one small matmul instead of an (H, W, P, 3) tensor
    d2 = (flat**2).sum(1, keepdims=True) - 2 * flat @ palette.T + (palette**2).sum(1)  # (H*W, P)
    nearest = d2.argmin(1)
    ok = d2[np.arange(len(flat)), nearest] <= max_color_dist**2
    label = np.where(ok, nearest, -1).reshape(image.shape[:2])  # 0 = background, -1 = no colour
    min_area = max(4.0, min_area_frac * image.shape[0] * image.shape[1])
    found = []
    for k, color in enumerate(names, start=1):
        mask = label == k
        if not mask.any():
            continue
        ys, x0, x1 = _runs(mask)
        for idx in _components(mask):
            det = _describe(color, ys[idx], x0[idx], x1[idx])
            if det.area >= min_area:
                found.append(det)
    return sorted(found, key=lambda d: (-d.area, d.box))


def scene_detections(scene: Scene, canvas: int = 128) -> list[Detected]:
    """The scene's ground truth in the same form as ``parse`` output (exact geometry, no pixels)."""
    return [Detected(o.shape, o.color, tuple(v * canvas for v in o.box),
                     (o.size * canvas) ** 2) for o in scene.objects]


# ---------------------------------------------------------------------------------------- GenEval's rules


def _direction_components(a: Detected, b: Detected) -> dict[str, float]:
    """GenEval's direction components of ``a`` relative to ``b``: the centre offset shrunk per axis by
    0.1 * (dim_a + dim_b), divided by the unshrunk offset's norm (image y points down)."""
    (ax, ay), (bx, by) = a.center, b.center
    offset = np.array([ax - bx, ay - by])
    margin = POSITION_MARGIN * (np.array(a.dims) + np.array(b.dims))
    shrunk = np.maximum(np.abs(offset) - margin, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return dict.fromkeys(RELATIONS, 0.0)
    dx, dy = shrunk / np.linalg.norm(offset)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}


def relations(a: Detected, b: Detected, cone: float = CONE) -> set[str]:
    """The relations of ``a`` to ``b`` whose direction component exceeds ``cone`` (GenEval: +-60 degrees)."""
    return {k for k, v in _direction_components(a, b).items() if v > cone}


def _check_requirement(req: Requirement, dets: list[Detected], exact: bool) -> tuple[list[Detected], str]:
    same_shape = [d for d in dets if d.shape == req.shape]
    matched = [d for d in same_shape if req.color is None or d.color == req.color]
    what = PLURALS[req.shape]
    if exact and len(same_shape) != req.count:
        return matched, f"expected exactly {req.count} {what}, found {len(same_shape)}"
    if len(matched) < req.count:
        if len(same_shape) > len(matched):
            colors = sorted({d.color for d in same_shape})
            return matched, f"expected {req.count} {req.color} {what}, found {what} coloured {colors}"
        return matched, f"expected {req.count} {what}, found {len(same_shape)}"
    return matched, ""


def check(dets: list[Detected], spec: PromptSpec) -> OracleReport:
    """Apply ``spec`` to detected objects: every requirement, then the relation between all matched pairs."""
    failures, groups = [], []
    for req in spec.requirements:
        matched, why = _check_requirement(req, dets, spec.exact)
        groups.append(matched)
        if why:
            failures.append(why)
    total = len(spec.requirements) + (spec.relation is not None)
    if spec.relation is not None:
        a_req, b_req = spec.requirements
        bad = [(a, b) for a in groups[0] for b in groups[1] if spec.relation not in relations(a, b)]
        if not groups[0] or not groups[1]:
            failures.append(f"cannot check {spec.relation!r}: an object is missing")
        elif bad:
            a, b = bad[0]
            failures.append(f"{a_req.phrase} at {_fmt(a.center)} is not {spec.relation} "
                            f"{b_req.phrase} at {_fmt(b.center)}")
    score = 1.0 - len(failures) / total
    return OracleReport(not failures, "; ".join(failures) or "ok", score, dets)


def _fmt(p: tuple[float, float]) -> str:
    return f"({p[0]:.0f}, {p[1]:.0f})"


def oracle_report(image, spec: PromptSpec) -> OracleReport:
    """Parse ``image`` and judge it against ``spec``; ``reason`` says which constraint failed."""
    if not isinstance(spec, PromptSpec):
        raise TypeError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    return check(parse(image), spec)


def oracle(image, spec: PromptSpec) -> bool:
    """GenEval's binary verdict for one image."""
    return oracle_report(image, spec).correct


def satisfies(scene: Scene, spec: PromptSpec) -> bool:
    """The verdict on the scene's exact geometry: the truth that QA answers are built from."""
    return check(scene_detections(scene), spec).correct


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


def vocabulary() -> set[str]:
    """Every word the Shapes prompts, questions and answers contain ("?" is a word of its own)."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS)
    words |= {w for r in RELATIONS for w in r.split()}
    words |= set("a an and the ? How many are there What colour is Is Does image show Yes No".split())
    return words
