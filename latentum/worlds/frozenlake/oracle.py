"""The FrozenLake pixel oracle: what a board image shows, read by matching each cell to the render atlas.

Every cell of a real render depends only on what the cell is and whether (and how) the player stands there
(``latentum.worlds.frozenlake.render``), so the atlas tiles are the templates: each cell takes the nearest one.

Legend: N map side in cells, P pixels per cell, K atlas tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
from einops import rearrange

from latentum.worlds.frozenlake.lake import LakeMap, Pos, _check_size
from latentum.worlds.frozenlake.render import (
    _NO_PLAYER,
    STYLES,
    _as_rgb,
    _atlas,
    _check_canvas,
    _check_pos,
    _check_style,
    _env_atlas,
    _map_size,
)

# -------------------------------------------------------------------------------------- pixel oracle


@dataclass(frozen=True)
class LakeState:
    """What an image shows. ``player``/``goal``/``start`` are None unless exactly one cell shows them (a
    generated image with two elves has no player).

    ``start`` (the S cell: stool / letter S) and ``style`` are informational and ignored by ``==``: the
    classic elf facing down or up covers its stool completely, so the start is not always visible.
    """

    holes: frozenset[Pos]
    player: Pos | None
    goal: Pos | None
    start: Pos | None = field(default=None, compare=False)
    style: str | None = field(default=None, compare=False)


def state_of(m: LakeMap, player: Pos | None = None, style: str | None = None) -> LakeState:
    """The state an oracle should read from ``render(m, player, style)``.

    gymnasium hides the player when it stands in a hole, so for that style such a player reads as None.
    """
    player = m.player if player is None else _check_pos(m, player, "player")
    visible = not (style == "gymnasium" and player in m.holes)
    return LakeState(m.holes, player if visible else None, m.goal, m.player, style)


@cache
def _labels(style: str) -> tuple[tuple[str, bool], ...]:
    """(base letter, player shown) per atlas tile. Identical tiles (gymnasium hides a player in a hole)
    take the player-free meaning, which is all the pixels can tell."""
    atlas = _env_atlas(style)
    keys, tiles = atlas.keys, atlas.tiles
    out = []
    for (base, code), tile in zip(keys, tiles):
        twin = any(c == _NO_PLAYER and np.array_equal(tiles[i], tile) for i, (b, c) in enumerate(keys))
        out.append((base[0], code != _NO_PLAYER and not twin))
    return tuple(out)


def _classify(image: np.ndarray, size: int, cell_px: int, style: str) -> tuple[list[tuple[str, bool]], float]:
    """Nearest atlas tile (L2) per cell; returns row-major labels and the summed squared distance."""
    atlas = _atlas(style, cell_px)
    board = image[:size * cell_px, :size * cell_px].astype(np.float32)
    x = rearrange(board, "(h p) (w q) c -> (h w) (p q c)", p=cell_px, q=cell_px)  # (N*N, P*P*3)
    t = rearrange(atlas.tiles.astype(np.float32), "k p q c -> k (p q c)")  # (K, P*P*3)
    d = (x * x).sum(1, keepdims=True) - 2 * x @ t.T + (t * t).sum(1)  # (N*N, K)
    best = d.argmin(1)
    labels = _labels(style)
    return [labels[k] for k in best], float(d[np.arange(len(best)), best].sum())


def _state_from_labels(labels: list[tuple[str, bool]], size: int, style: str) -> LakeState:
    cells = [divmod(i, size) for i in range(size * size)]
    def unique(found):
        return found[0] if len(found) == 1 else None

    return LakeState(
        holes=frozenset(p for p, (b, _) in zip(cells, labels) if b == "H"),
        player=unique([p for p, (_, shown) in zip(cells, labels) if shown]),
        goal=unique([p for p, (b, _) in zip(cells, labels) if b == "G"]),
        start=unique([p for p, (b, _) in zip(cells, labels) if b == "S"]),
        style=style,
    )


def _read(image: np.ndarray, size: int, cell_px: int, style: str | None) -> LakeState:
    styles = STYLES if style is None else (style,)
    for s in styles:
        _check_style(s)
    results = {s: _classify(image, size, cell_px, s) for s in styles}
    best = min(results, key=lambda s: results[s][1])
    return _state_from_labels(results[best][0], size, best)


def read_canvas(canvas_img, size: int, style: str | None = None, grid: int = 8) -> LakeState:
    """Pixel oracle for a model-resolution canvas (any side divisible by ``grid``, e.g. 64 px decoder output).

    Each of the size x size cells is matched to the nearest atlas tile at that cell size; with ``style=None``
    the style whose tiles fit best overall is used. Tolerates moderate noise and blur.
    """
    image = _as_rgb(canvas_img, "canvas_img")
    h, w = image.shape[:2]
    _check_size(size)
    if h != w:
        raise ValueError(f"canvas_img must be square, got {w}x{h}")
    cell_px = _check_canvas(h, grid, size, name="canvas_img side")
    return _read(image, size, cell_px, style)


def read_map(image, style: str | None = None) -> LakeState:
    """Pixel oracle for a full-size (64 px per cell) map render such as a VSP benchmark image."""
    image = _as_rgb(image)
    n, px = _map_size(image, None)
    return _read(image, n, px, style)
