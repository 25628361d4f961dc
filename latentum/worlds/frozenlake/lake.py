"""FrozenLake: maps, BFS plans, rule-exact simulation, renders that match the real envs, and a pixel oracle.

Maps follow the VSP benchmark (arXiv 2407.01863, reference/aia-r3-vsp-geneval.md §3.2): N x N with N in 3..8,
holes ~ Bernoulli(0.2), player and goal on random distinct cells, rejection until BFS-solvable. Images are the
real environments' ``rgb_array`` renders at 64 px per cell, in two looks: ``"gymnasium"`` (the installed
gymnasium ``FrozenLake-v1``) and ``"classic"`` (``gym==0.26.2``: elf, present, textured holes, the look of the
VSP images). The env renderers are slow (pygame, one full board per call), so training data uses ``render``:
it composes cells from a tile atlas cut once out of real env renders and is pixel-identical to ``render_env``.

Every cell of a real render depends only on (what the cell is, whether the player stands there and which way
it last moved, and, for gymnasium's decorative ice cracks, the cell's position). The atlas stores exactly
that, so the same tiles also serve as templates for the pixel oracle ``read_canvas``.

Legend: N map side in cells, P pixels per cell, K atlas tiles.
Positions are (row, col), 0-indexed; text shown to the model is 1-indexed (see ``latentum.worlds.frozenlake.tasks``).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import numpy as np
from einops import rearrange

ACTIONS = ("L", "D", "R", "U")
"""Move letters in gym action-id order (0 left, 1 down, 2 right, 3 up)."""
STYLES = ("gymnasium", "classic")
MIN_SIZE, MAX_SIZE = 3, 8
ENV_CELL_PX = 64
"""Pixels per cell of the real env renders (both envs cap the window at 512 px, so 64 for N <= 8)."""

_DELTAS = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
_NO_PLAYER, _PLAYER_NO_ACTION = -1, 4
"""Overlay codes of an atlas key: no player; player with no last action; 0..3 = player after that action."""

_MAX_TRIES = 10_000
Pos = tuple[int, int]


# ----------------------------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class LakeMap:
    """One FrozenLake board. ``player`` is where the player starts (the env's S cell)."""

    size: int
    holes: frozenset[Pos]
    player: Pos
    goal: Pos

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 2:
            raise ValueError(f"LakeMap.size must be an int >= 2, got {self.size!r}")
        if not isinstance(self.holes, frozenset):
            raise TypeError(f"LakeMap.holes must be a frozenset of (row, col), "
                            f"got {type(self.holes).__name__}")
        for name, cells in (("holes", self.holes), ("player", [self.player]), ("goal", [self.goal])):
            for r, c in cells:
                if not (0 <= r < self.size and 0 <= c < self.size):
                    raise ValueError(f"LakeMap.{name} cell {(r, c)} is outside the "
                                     f"{self.size}x{self.size} grid")
        if self.player == self.goal:
            raise ValueError(f"LakeMap.player and goal must differ, both are {self.player}")
        if self.player in self.holes or self.goal in self.holes:
            raise ValueError("LakeMap.player and goal must not be holes")

    def cell(self, pos: Pos) -> str:
        """The letter of a cell: S (player start), G, H or F."""
        return "S" if pos == self.player else "G" if pos == self.goal else "H" if pos in self.holes else "F"

    def desc(self) -> list[str]:
        """Rows of S/F/H/G, the ``desc`` argument of the gym/gymnasium FrozenLake envs."""
        return ["".join(self.cell((r, c)) for c in range(self.size)) for r in range(self.size)]

    def text_grid(self) -> str:
        """Word-level text form for QA: letters separated by spaces, rows joined by " / "."""
        return " / ".join(" ".join(row) for row in self.desc())

    @classmethod
    def from_desc(cls, desc: list[str]) -> LakeMap:
        """Inverse of ``desc()``: exactly one S and one G, square, letters from SFHG."""
        n = len(desc)
        if n < 2 or any(len(row) != n or set(row) - set("SFHG") for row in desc):
            raise ValueError(f"desc must be a square list of S/F/H/G strings, got {desc!r}")
        cells = {ch: [(r, c) for r in range(n) for c in range(n) if desc[r][c] == ch] for ch in "SGH"}
        if len(cells["S"]) != 1 or len(cells["G"]) != 1:
            raise ValueError(f"desc must contain exactly one S and one G, got {desc!r}")
        return cls(n, frozenset(cells["H"]), cells["S"][0], cells["G"][0])


def _check_size(size: int, name: str = "size") -> None:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{name} must be an int in {MIN_SIZE}..{MAX_SIZE} (VSP map sizes), got {size!r}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def generate_map(size: int, rng: np.random.Generator, hole_prob: float = 0.2) -> LakeMap:
    """A VSP-style random map: Bernoulli holes, player/goal on distinct free cells, solvable (rejection)."""
    _check_size(size)
    if not 0.0 <= hole_prob < 1.0:
        raise ValueError(f"hole_prob must be in [0, 1), got {hole_prob}")
    for _ in range(_MAX_TRIES):
        is_hole = rng.random((size, size)) < hole_prob  # (N, N)
        free = np.flatnonzero(~is_hole)
        if len(free) < 2:
            continue
        p, g = rng.choice(free, size=2, replace=False)
        holes = frozenset((int(r), int(c)) for r, c in zip(*np.nonzero(is_hole)))
        m = LakeMap(size, holes, divmod(int(p), size), divmod(int(g), size))
        if shortest_plan(m) is not None:
            return m
    raise RuntimeError(f"no solvable {size}x{size} map in {_MAX_TRIES} draws; "
                       f"hole_prob={hole_prob} is too high")


# ------------------------------------------------------------------------------------ moves and plans


def _check_action(action: str, name: str = "action") -> None:
    if action not in _DELTAS:
        raise ValueError(f"{name} must be one of {ACTIONS}, got {action!r}")


def displace(pos: Pos, action: str) -> Pos:
    """The cell one move from ``pos`` on an unbounded grid (no map: off-grid cells are returned as they are)."""
    _check_action(action)
    dr, dc = _DELTAS[action]
    return pos[0] + dr, pos[1] + dc


def move(m: LakeMap, pos: Pos, action: str) -> Pos:
    """The cell after one move; moving off the grid leaves the player where it is (gym semantics)."""
    r, c = displace(pos, action)
    return (r, c) if 0 <= r < m.size and 0 <= c < m.size else tuple(pos)


def shortest_plan(m: LakeMap, start: Pos | None = None) -> list[str] | None:
    """BFS shortest hole-free path to the goal, ties broken by ACTIONS order; None if unreachable."""
    start = m.player if start is None else tuple(start)
    if start in m.holes:
        return None
    parent: dict[Pos, tuple[Pos, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        if pos == m.goal:
            plan = []
            while parent[pos] is not None:
                pos, a = parent[pos]
                plan.append(a)
            return plan[::-1]
        for a in ACTIONS:
            nxt = move(m, pos, a)
            if nxt not in parent and nxt not in m.holes:
                parent[nxt] = (pos, a)
                queue.append(nxt)
    return None


class Rollout(NamedTuple):
    success: bool
    positions: list[Pos]
    """Start cell, then the cell after every executed move (gym: up to termination)."""
    reason: str
    """"goal", "hole", "off_grid" (strict), "overshoot" (strict: passed the goal, ended elsewhere),
    "not_at_goal", or "time_limit" (gym's 100-step truncation)."""


def simulate(m: LakeMap, actions: list[str], rule: str = "gym") -> Rollout:
    """Score an action sequence from the player's start.

    ``"gym"`` is the VSP scorer: the real gymnasium ``FrozenLake-v1`` (``is_slippery=False``); off-grid moves
    are no-ops, the episode ends on the goal or a hole, actions after that are ignored. ``"strict"`` is
    ThinkMorph's scorer: any off-grid move or hole fails and the *final* cell must be the goal.
    """
    for i, a in enumerate(actions):
        _check_action(a, f"actions[{i}]")
    if rule == "gym":
        return _simulate_gym(m, actions)
    if rule == "strict":
        return _simulate_strict(m, actions)
    raise ValueError(f"rule must be 'gym' or 'strict', got {rule!r}")


def _simulate_gym(m: LakeMap, actions: list[str]) -> Rollout:
    import gymnasium

    env = gymnasium.make("FrozenLake-v1", desc=m.desc(), is_slippery=False)
    s, _ = env.reset(seed=0)
    positions = [divmod(int(s), m.size)]
    for a in actions:
        s, reward, terminated, truncated, _ = env.step(ACTIONS.index(a))
        positions.append(divmod(int(s), m.size))
        if terminated:
            return Rollout(reward > 0, positions, "goal" if reward > 0 else "hole")
        if truncated:
            return Rollout(False, positions, "time_limit")
    return Rollout(False, positions, "not_at_goal")


def _simulate_strict(m: LakeMap, actions: list[str]) -> Rollout:
    pos, positions, seen_goal = m.player, [m.player], False
    for a in actions:
        nxt = move(m, pos, a)
        if nxt == pos:  # a real move always changes the cell, so this was an off-grid move
            return Rollout(False, positions, "off_grid")
        pos = nxt
        positions.append(pos)
        if pos in m.holes:
            return Rollout(False, positions, "hole")
        seen_goal |= pos == m.goal
    if pos == m.goal:
        return Rollout(True, positions, "goal")
    return Rollout(False, positions, "overshoot" if seen_goal else "not_at_goal")


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
    from PIL import Image

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
    from PIL import Image

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
