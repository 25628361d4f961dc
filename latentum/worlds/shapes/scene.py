"""The Shapes world's scenes: flat-colour shapes on a white canvas, and their render.

Geometry: an ``Obj`` lives in canvas fractions (centre x, y and side ``size`` in [0, 1]) so one scene renders
at any canvas. Prompts are in ``latentum.worlds.shapes.prompts``, the pixel oracle that judges an image against
one in ``latentum.worlds.shapes.oracle``, scenes built for a prompt and the task samples in
``latentum.worlds.shapes.tasks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
