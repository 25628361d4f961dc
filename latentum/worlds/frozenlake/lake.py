"""FrozenLake maps and rules: boards, BFS plans and rule-exact simulation.

Maps follow the VSP benchmark (arXiv 2407.01863, reference/aia-r3-vsp-geneval.md §3.2): N x N with N in 3..8,
holes ~ Bernoulli(0.2), player and goal on random distinct cells, rejection until BFS-solvable. ``simulate``
scores a move sequence under the gym rule (the real gymnasium env) or the strict one. Images of a board are in
``latentum.worlds.frozenlake.render``; reading a board off its pixels in ``latentum.worlds.frozenlake.oracle``.

Legend: N map side in cells.
Positions are (row, col), 0-indexed; text shown to the model is 1-indexed (see ``latentum.worlds.frozenlake.tasks``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ACTIONS = ("L", "D", "R", "U")
"""Move letters in gym action-id order (0 left, 1 down, 2 right, 3 up)."""
MIN_SIZE, MAX_SIZE = 3, 8

_DELTAS = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}

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
