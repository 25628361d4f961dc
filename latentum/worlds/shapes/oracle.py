"""The Shapes world's exact pixel oracle: GenEval's rules with the detector replaced by deterministic parsing.

GenEval (reference/aia-r3-vsp-geneval.md §4.1) scores text-to-image models with a detector, CLIP colours and
box-centre geometry. Here the world is synthetic (§4.3), so the detector is replaced by deterministic parsing
(palette quantisation, connected components, fill-ratio invariants) while the *rules* stay GenEval's:
counting is exact, colour is judged per matched object, position compares box centres after shrinking the
offset by 0.1 * (dim_a + dim_b) and accepts a +-60 degree cone.

Geometry: a ``Detected`` object lives in pixels, boxes as (x0, y0, x1, y1) with x1, y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from latentum.worlds.shapes.prompts import RELATIONS, PromptSpec, Requirement
from latentum.worlds.shapes.scene import BACKGROUND, COLORS, MIN_CANVAS, PLURALS, Scene

POSITION_MARGIN = 0.1
"""GenEval's per-axis shrink of the centre offset, times (dim_a + dim_b)."""
CONE = 0.5
"""A relation holds when its direction component exceeds cos(60 degrees)."""


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


class OracleReport(NamedTuple):
    correct: bool
    reason: str
    score: float
    """Fraction of the prompt's constraints satisfied (partial credit)."""
    detections: list[Detected]


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
