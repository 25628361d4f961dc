"""FrozenLake renders that match the real envs: the env renderers themselves and a fast tile-atlas renderer.

Images are the real environments' ``rgb_array`` renders at 64 px per cell, in two looks: ``"gymnasium"`` (the
installed gymnasium ``FrozenLake-v1``) and ``"classic"`` (``gym==0.26.2``: elf, present, textured holes, the look
of the VSP images). The env renderers are slow (pygame, one full board per call), so training data uses
``render``: it composes cells from a tile atlas cut once out of real env renders and is pixel-identical to
``render_env``.

Every cell of a real render depends only on (what the cell is, whether the player stands there and which way
it last moved, and, for gymnasium's decorative ice cracks, the cell's position). The atlas stores exactly
that, so the same tiles also serve as templates for the pixel oracle (``latentum.worlds.frozenlake.oracle``).

Legend: N map side in cells, P pixels per cell, K atlas tiles.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from einops import rearrange
from PIL import Image

from latentum.worlds.frozenlake.lake import ACTIONS, MAX_SIZE, MIN_SIZE, LakeMap, Pos, _check_action

STYLES = ("gymnasium", "classic")
ENV_CELL_PX = 64
"""Pixels per cell of the real env renders (both envs cap the window at 512 px, so 64 for N <= 8)."""
_NO_PLAYER, _PLAYER_NO_ACTION = -1, 4
"""Overlay codes of an atlas key: no player; player with no last action; 0..3 = player after that action."""


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


# ------------------------------------------------------------------------------- real env renderers


@contextlib.contextmanager
def _headless():
    """pygame needs a video driver even for off-screen surfaces: SDL's dummy one, unless the user set one. SDL
    also takes over SIGTERM (Python leaves it at the default) to queue a quit event no one reads here, so
    ``kill`` and ``timeout`` would no longer stop a process that has rendered a classic board: keep the default."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    yield


def _make_env(style: str, desc: list[str]):
    with _headless():
        if style == "gymnasium":
            import gymnasium

            return gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=False, render_mode="rgb_array")
        # gym 0.26 prints a deprecation banner on import: noise for users who asked for the classic look.
        with contextlib.redirect_stderr(io.StringIO()):
            import gym
        # Its passive env checker uses np.bool8 (gone in NumPy 2); we never step this env, only render it.
        return gym.make("FrozenLake-v1", desc=desc, is_slippery=False, render_mode="rgb_array",
                        disable_env_checker=True)


def _check_pos(m: LakeMap, pos: Pos, name: str) -> Pos:
    if not (len(pos) == 2 and 0 <= pos[0] < m.size and 0 <= pos[1] < m.size):
        raise ValueError(f"{name} must be a (row, col) inside the {m.size}x{m.size} map, got {pos!r}")
    return (int(pos[0]), int(pos[1]))


def _check_last_action(last_action: str | None) -> None:
    if last_action is not None:
        _check_action(last_action, "last_action")


def render_env(m: LakeMap, player: Pos | None = None, style: str = "gymnasium",
               last_action: str | None = None) -> np.ndarray:
    """The real env's ``rgb_array`` render, uint8 (64N, 64N, 3), player at ``player`` (default: start).

    The player cell and the last action (which sets the classic elf's facing) are written into the env
    state (``s``, ``lastaction``) rather than reached by stepping, so any cell can be shown, holes included.
    Slow (pygame); the reference that ``render`` is tested against.
    """
    _check_style(style)
    _check_last_action(last_action)
    player = m.player if player is None else _check_pos(m, player, "player")
    env = _make_env(style, m.desc())
    env.reset(seed=0)
    env.unwrapped.s = player[0] * m.size + player[1]
    env.unwrapped.lastaction = None if last_action is None else ACTIONS.index(last_action)
    # Not closed on purpose: close() calls pygame.quit(), and re-initialising pygame costs ~50 ms per call.
    return np.ascontiguousarray(env.render(), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- tile atlas


@dataclass(frozen=True)
class _Atlas:
    """Unique cell images of one style at P px. ``keys[k] = (base, overlay)``; base is "H", "S", "G" or an
    ice variant "F0", "F1"...; ``variant[r, c]`` names the ice variant the env draws at that position."""

    tiles: np.ndarray  # (K, P, P, 3) uint8
    keys: tuple[tuple[str, int], ...]
    variant: np.ndarray  # (MAX_SIZE, MAX_SIZE) of str
    index: dict[tuple[str, int], int] = field(repr=False)


def _crop(img: np.ndarray, pos: Pos) -> np.ndarray:
    p = ENV_CELL_PX
    return img[pos[0] * p:(pos[0] + 1) * p, pos[1] * p:(pos[1] + 1) * p]


def _probe_maps() -> list[LakeMap]:
    """Two 8x8 maps whose S/G/H sit in opposite corners, so every position is plain ice in one of them."""
    n = MAX_SIZE
    return [LakeMap(n, frozenset({(0, 2)}), (0, 0), (0, 1)),
            LakeMap(n, frozenset({(n - 1, n - 3)}), (n - 1, n - 1), (n - 1, n - 2))]


def _base_crops(style: str) -> tuple[dict[str, np.ndarray], dict[Pos, np.ndarray]]:
    """Player-free crops: {"H","S","G"} tiles, and the ice tile drawn at every position."""
    special: dict[str, np.ndarray] = {}
    ice: dict[Pos, np.ndarray] = {}
    for m in _probe_maps():
        # Two renders with the player on different ice cells, so every cell is seen without the player.
        far = [(3, 3), (4, 4)]
        imgs = [render_env(m, p, style) for p in far]
        for r in range(m.size):
            for c in range(m.size):
                crop = _crop(imgs[0] if (r, c) != far[0] else imgs[1], (r, c))
                letter = m.cell((r, c))
                if letter != "F":
                    special[letter] = crop
                elif (r, c) in ice and not np.array_equal(ice[(r, c)], crop):
                    raise RuntimeError(f"{style} env render is not cell-local at {(r, c)}; "
                                       "cannot build an atlas")
                else:
                    ice[(r, c)] = crop
    return special, ice


@cache
def _env_atlas(style: str) -> _Atlas:
    """Cut the atlas out of ~40 real env renders (once per process)."""
    special, ice = _base_crops(style)
    uniques: list[np.ndarray] = []
    variant = np.empty((MAX_SIZE, MAX_SIZE), dtype=object)
    for pos, crop in sorted(ice.items()):
        k = next((i for i, u in enumerate(uniques) if np.array_equal(u, crop)), None)
        if k is None:
            uniques.append(crop)
            k = len(uniques) - 1
        variant[pos] = f"F{k}"
    # Where to stand the player to see each base under it: a probe-map cell of that kind.
    where: dict[str, tuple[LakeMap, Pos]] = {}
    for m in _probe_maps():
        for pos in sorted(ice):
            letter = m.cell(pos)
            where.setdefault(variant[pos] if letter == "F" else letter, (m, pos))
    tiles = {**{(f"F{k}", _NO_PLAYER): u for k, u in enumerate(uniques)},
             **{(b, _NO_PLAYER): t for b, t in special.items()}}
    for base, (m, pos) in where.items():
        for code, last in [(_PLAYER_NO_ACTION, None), *enumerate(ACTIONS)]:
            tiles[(base, code)] = _crop(render_env(m, pos, style, last), pos)
    keys = tuple(sorted(tiles))
    return _Atlas(np.stack([tiles[k] for k in keys]), keys, variant, {k: i for i, k in enumerate(keys)})


def _resize_cell(tile: np.ndarray, cell_px: int) -> np.ndarray:
    """The one cell resampler (PIL Lanczos, antialiased), shared by the atlas and ``to_canvas``."""
    if tile.shape[0] == cell_px:
        return tile
    return np.asarray(Image.fromarray(tile).resize((cell_px, cell_px), Image.Resampling.LANCZOS))


@cache
def _atlas(style: str, cell_px: int = ENV_CELL_PX) -> _Atlas:
    full = _env_atlas(style)
    if cell_px == ENV_CELL_PX:
        return full
    tiles = np.stack([_resize_cell(t, cell_px) for t in full.tiles])  # (K, P, P, 3)
    return _Atlas(tiles, full.keys, full.variant, full.index)


# ------------------------------------------------------------------------------------- fast renderer


def _tile_ids(m: LakeMap, player: Pos, last_action: str | None, atlas: _Atlas) -> np.ndarray:
    """(N, N) atlas indices of a board."""
    ids = np.empty((m.size, m.size), dtype=np.int64)
    for r in range(m.size):
        for c in range(m.size):
            letter = m.cell((r, c))
            base = atlas.variant[r, c] if letter == "F" else letter
            code = _NO_PLAYER
            if (r, c) == player:
                code = _PLAYER_NO_ACTION if last_action is None else ACTIONS.index(last_action)
            ids[r, c] = atlas.index[(base, code)]
    return ids


def render(m: LakeMap, player: Pos | None = None, style: str = "gymnasium", last_action: str | None = None,
           cell_px: int = ENV_CELL_PX) -> np.ndarray:
    """uint8 (N*P, N*P, 3) board composed from atlas tiles; at P = 64 pixel-identical to ``render_env``."""
    _check_style(style)
    _check_last_action(last_action)
    if not isinstance(cell_px, (int, np.integer)) or cell_px < 1:
        raise ValueError(f"cell_px must be a positive int, got {cell_px!r}")
    player = m.player if player is None else _check_pos(m, player, "player")
    atlas = _atlas(style, int(cell_px))
    cells = atlas.tiles[_tile_ids(m, player, last_action, atlas)]  # (N, N, P, P, 3)
    return np.ascontiguousarray(rearrange(cells, "h w p q c -> (h p) (w q) c"))


def _check_canvas(canvas: int, grid: int, size: int | None = None, name: str = "canvas") -> int:
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not isinstance(canvas, (int, np.integer)) or canvas < grid or canvas % grid:
        raise ValueError(f"{name} must be a positive multiple of grid={grid}, got {canvas!r}")
    if size is not None and not 1 <= size <= grid:
        raise ValueError(f"a {size}x{size} map does not fit a canvas of grid={grid} cells")
    return canvas // grid


def render_canvas(m: LakeMap, player: Pos | None = None, style: str = "gymnasium",
                  last_action: str | None = None, canvas: int = 128, grid: int = 8) -> np.ndarray:
    """The board at model resolution: uint8 (canvas, canvas, 3), black, board top-left, canvas/grid px per
    cell so each ViT patch is exactly one cell. Equals ``to_canvas(render(...))`` exactly."""
    cell_px = _check_canvas(canvas, grid, m.size)
    out = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    board = render(m, player, style, last_action, cell_px)
    out[:board.shape[0], :board.shape[1]] = board
    return out


def _as_rgb(image, name: str = "image") -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] in (3, 4)):
        dtype, shape = getattr(image, "dtype", ""), getattr(image, "shape", "")
        raise ValueError(f"{name} must be a uint8 (H, W, 3|4) array or PIL image, got "
                         f"{type(image).__name__} {dtype} {shape}")
    return image[..., :3]


def _map_size(image: np.ndarray, size: int | None) -> tuple[int, int]:
    """(N, px per cell) of a full-size map render, or a ValueError that says what a map image looks like."""
    h, w = image.shape[:2]
    if size is None:
        if h != w or h % ENV_CELL_PX or not MIN_SIZE <= h // ENV_CELL_PX <= MAX_SIZE:
            raise ValueError(f"image is not a FrozenLake map: expected a square image whose side is 64*N, "
                             f"N in {MIN_SIZE}..{MAX_SIZE}, got {w}x{h}")
        return h // ENV_CELL_PX, ENV_CELL_PX
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if h != w or h % size:
        raise ValueError(f"image is not a {size}x{size} FrozenLake map: expected a square image whose side "
                         f"divides by {size}, got {w}x{h}")
    return int(size), h // size


def to_canvas(image, canvas: int = 128, grid: int = 8, size: int | None = None) -> tuple[np.ndarray, int]:
    """Fit a user's full-size map render onto the model canvas; returns (canvas image, N).

    Cells are resized one by one (not the whole board) so that cell boundaries land exactly on ViT patch
    boundaries and the result equals ``render_canvas`` for our own renders.
    """
    image = _as_rgb(image)
    n, px = _map_size(image, size)
    cell_px = _check_canvas(canvas, grid, n)
    out = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    for r in range(n):
        for c in range(n):
            tile = np.ascontiguousarray(image[r * px:(r + 1) * px, c * px:(c + 1) * px])
            out[r * cell_px:(r + 1) * cell_px, c * cell_px:(c + 1) * cell_px] = _resize_cell(tile, cell_px)
    return out, n
