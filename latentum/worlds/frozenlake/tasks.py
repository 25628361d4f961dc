"""VSP task samples on FrozenLake: the main planning task (with visual thoughts) and the perception /
reasoning sub-tasks T1-T4 of the VSP benchmark (reference/aia-r3-vsp-geneval.md §3.1).

Every sampler has the signature ``(rng, size, style, canvas=128) -> Sample``, draws a fresh VSP-style map,
and puts the ground truth (the ``LakeMap`` and the answer) in ``Sample.meta``. Texts are word-level: words
and punctuation separated by single spaces, rows and columns 1-indexed as in VSP, so a word-level tokenizer
built from ``vocabulary()`` covers every text exactly. Images are canvases from ``render_canvas``.

Safety (T4) follows the gym scorer: a sequence is safe iff it never enters a hole. Generated sequences never
touch the goal before their end, so the label is the same whether or not the episode stops at the goal.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from latentum.data.sample import Attempt, Sample
from latentum.worlds.frozenlake.lake import (
    ACTIONS,
    MAX_SIZE,
    MIN_SIZE,
    LakeMap,
    Pos,
    _check_size,
    generate_map,
    move,
    shortest_plan,
)
from latentum.worlds.frozenlake.render import _check_style, render_canvas

PLAN_PROMPT = ("Plan a safe path for the player to the goal . "
               "Move L D R or U one cell at a time and imagine the board after each move .")
TEXT_PLAN_PROMPT = "Plan a safe path for the player to the goal . Answer with the moves L D R or U ."
DONE = "Done"
FELL = "hole"
"""What the model says after a thought that shows the player in a hole: the move is taken back and another one
is tried from the board before it (``retry_plan_sample``; the planner drops the move and its thought)."""
HOLE_Q = "Is there a hole at row {row} column {col} ?"
RELATION_Q = "Where is the player relative to the goal ?"
GRID_Q = "Which text grid matches the map ? A : {A} B : {B} C : {C} D : {D}"
PLAYER_Q = "Where is the player ?"
PLAYER_A = "row {row} column {col}"
RELATION_STEPS_A = "player row {pr} column {pc} , goal row {gr} column {gc} , {relation}"
SAFETY_Q = "Is the action sequence {actions} safe ?"
DESCRIBE_Q = "Write the map as a text grid ."
NEIGHBOURS_Q = "What is left of , below , right of and above the player ?"
EDGE = "Edge"
SAFETY_LENGTHS = (1, 3, 5, 7, 9)
OPTIONS = ("A", "B", "C", "D")
RELATIONS = ("Above", "Below", "Left", "Right")
YES, NO = "Yes", "No"


def _check(size: int, style: str, canvas: int) -> None:
    _check_size(size)
    _check_style(style)
    if not isinstance(canvas, (int, np.integer)) or canvas < MAX_SIZE or canvas % MAX_SIZE:
        raise ValueError(f"canvas must be a positive multiple of {MAX_SIZE} (one patch per cell), "
                         f"got {canvas!r}")


def _map_image(m: LakeMap, style: str, canvas: int) -> np.ndarray:
    return render_canvas(m, m.player, style, None, canvas=canvas)


def _meta(m: LakeMap, style: str, answer: str, **extra) -> dict:
    return {"map": m, "size": m.size, "style": style, "answer": answer, **extra}


# ------------------------------------------------------------------------------------------- planning


def plan_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """Main task with visual thoughts: assistant = [a1, board after a1, a2, board after a2, ..., "Done"]
    along the BFS plan; each board shows the player facing its last move (LatentUM's FrozenLake format)."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    plan = shortest_plan(m)
    pos, assistant, positions = m.player, [], [m.player]
    for a in plan:
        pos = move(m, pos, a)
        positions.append(pos)
        assistant += [a, render_canvas(m, pos, style, a, canvas=canvas)]
    return Sample([PLAN_PROMPT, _map_image(m, style, canvas)], assistant + [DONE], "vsp_plan",
                  _meta(m, style, " ".join(plan), actions=plan, positions=positions))


def retry_plan_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """``plan_sample`` with one imagined mistake taken back: at a step next to a hole the assistant first tries
    the move into the hole (an ``Attempt``: read, never a target), imagines the board with the player in the
    hole, says ``FELL``, then makes the BFS move from the board before. The model learns to check the
    consequence of a move in its own visual thought; maps with no hole beside the path give a plain plan."""
    sample = plan_sample(rng, size, style, canvas)
    m, positions = sample.meta["map"], sample.meta["positions"]
    risky = [(k, a) for k, pos in enumerate(positions[:-1]) for a in ACTIONS if move(m, pos, a) in m.holes]
    if not risky:
        return Sample(sample.user, sample.assistant, "vsp_plan_retry", sample.meta)
    k, bad = risky[rng.integers(len(risky))]
    fell = render_canvas(m, move(m, positions[k], bad), style, bad, canvas=canvas)
    assistant = sample.assistant[:2 * k] + [Attempt(bad), fell, FELL] + sample.assistant[2 * k:]
    return Sample(sample.user, assistant, "vsp_plan_retry", {**sample.meta, "retry": (k, bad)})


def look_plan_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """``plan_sample`` that looks before each move: [look, a1, board after a1, look, a2, ..., "Done"], where
    a look is ``neighbour_words`` of the board just seen ("F H Edge G": left, below, right, above). The
    policy then conditions on what it read off the current board, the local perception a safe move needs;
    with visual thoughts that board is the model's own imagined one."""
    sample = plan_sample(rng, size, style, canvas)
    m, positions = sample.meta["map"], sample.meta["positions"]
    assistant = []
    for k, pos in enumerate(positions[:-1]):
        assistant += [neighbour_words(m, pos), *sample.assistant[2 * k:2 * k + 2]]
    return Sample(sample.user, assistant + [DONE], "vsp_plan_look", sample.meta)


def walk_look_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """Imagine given moves: [look, a1, board after a1, look, a2, ...] along a random in-grid walk of 1-9 moves
    that avoids the goal and, half the time, ends in a hole. The moves are ``Attempt`` s (read, never targets:
    the policy stays the planner's); the looks and boards are supervised. Plans never turn back, so without this
    the model cannot imagine a move back to a cell it left (``LatentUM.imagine``, safety with visual thoughts)."""
    return _walk_sample(rng, size, style, canvas, boards=True)


def text_walk_look_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """The text-only counterpart of ``walk_look_sample`` (same walks and looks, no boards): [look, a1, look, a2,
    ...] with the moves as ``Attempt`` s, so the text-only baseline sees the same walks as the latent planner."""
    return _walk_sample(rng, size, style, canvas, boards=False)


def _walk_sample(rng: np.random.Generator, size: int, style: str, canvas: int, boards: bool) -> Sample:
    """A random in-grid walk of 1-9 moves that avoids the goal and, half the time, ends in a hole: a look
    before each given move, and with ``boards`` the board after it."""
    _check(size, style, canvas)
    m, actions = _random_walk(rng, size)
    pos, assistant = m.player, []
    for a in actions:
        assistant += [neighbour_words(m, pos), Attempt(a)]
        pos = move(m, pos, a)
        if boards:
            assistant.append(render_canvas(m, pos, style, a, canvas=canvas))
    prompt, task = (PLAN_PROMPT, "vsp_walk_look") if boards else (TEXT_PLAN_PROMPT, "vsp_walk_text_look")
    return Sample([prompt, _map_image(m, style, canvas)], assistant, task,
                  _meta(m, style, " ".join(actions), actions=actions, safe=pos not in m.holes))


def text_look_plan_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """The text-only counterpart of ``look_plan_sample`` (same looks, no boards), e.g. "F H Edge G R ... Done":
    with no thoughts to look at, the planner has to track where the player is to say what is around it."""
    sample = text_plan_sample(rng, size, style, canvas)
    m, plan = sample.meta["map"], sample.meta["actions"]
    pos, words = m.player, []
    for a in plan:
        words += [neighbour_words(m, pos), a]
        pos = move(m, pos, a)
    return Sample(sample.user, [" ".join(words + [DONE])], "vsp_plan_text_look", sample.meta)


def text_plan_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """Main task without visual thoughts: the whole plan as one text, e.g. "R D D R Done"."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    plan = shortest_plan(m)
    user = [TEXT_PLAN_PROMPT, _map_image(m, style, canvas)]
    answer = " ".join(plan)
    return Sample(user, [" ".join(plan + [DONE])], "vsp_plan_text", _meta(m, style, answer, actions=plan))


# ------------------------------------------------------------------------------------------ perception


def _cells(size: int) -> list[Pos]:
    return [(r, c) for r in range(size) for c in range(size)]


def hole_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """T1: "Is there a hole at row r column c ?" -> Yes / No, balanced 50/50."""
    _check(size, style, canvas)
    want_hole = bool(rng.random() < 0.5)
    m = generate_map(size, rng)
    while want_hole and not m.holes:  # a hole-free map cannot give a Yes; draw another, keep the balance
        m = generate_map(size, rng)
    pool = sorted(m.holes) if want_hole else [p for p in _cells(size) if p not in m.holes]
    r, c = pool[rng.integers(len(pool))]
    answer = YES if want_hole else NO
    question = HOLE_Q.format(row=r + 1, col=c + 1)
    return Sample([_map_image(m, style, canvas), question], [answer], "vsp_hole",
                  _meta(m, style, answer, cell=(r, c)))


def relation_words(player: Pos, goal: Pos) -> str:
    """VSP T2: Above/Below (rows) then Left/Right (columns); an axis on which they agree gives no word."""
    words = []
    if player[0] != goal[0]:
        words.append("Above" if player[0] < goal[0] else "Below")
    if player[1] != goal[1]:
        words.append("Left" if player[1] < goal[1] else "Right")
    return " ".join(words)


def relation_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """T2: where the player is relative to the goal, e.g. "Above Left"."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    answer = relation_words(m.player, m.goal)
    return Sample([_map_image(m, style, canvas), RELATION_Q], [answer], "vsp_relation",
                  _meta(m, style, answer))


def relation_steps_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """T2 worked out: where the player is, where the goal is, then the relation, e.g. "player row 2 column 3 ,
    goal row 4 column 4 , Above Left" (the answer is the words after the last comma,
    ``latentum.data.sample.final_answer``). Each step is one the model already takes well (finding a cell, as
    "Where is the player ?") or a comparison of two written numbers; asked directly, the relation goes wrong
    when the two cells are a column or a row apart (README, "The relation worked out")."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    relation = relation_words(m.player, m.goal)
    (pr, pc), (gr, gc) = m.player, m.goal
    answer = RELATION_STEPS_A.format(pr=pr + 1, pc=pc + 1, gr=gr + 1, gc=gc + 1, relation=relation)
    return Sample([_map_image(m, style, canvas), RELATION_Q], [answer], "vsp_relation_steps",
                  _meta(m, style, relation))


def _near_miss(m: LakeMap, rng: np.random.Generator) -> str:
    """The true text grid with one ice cell turned into a hole or one hole into ice."""
    rows = [list(row) for row in m.desc()]
    flippable = [(r, c) for r, c in _cells(m.size) if rows[r][c] in "FH"]
    r, c = flippable[rng.integers(len(flippable))]
    rows[r][c] = "H" if rows[r][c] == "F" else "F"
    return " / ".join(" ".join(row) for row in rows)


def grid_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """T3: pick the text grid of the map among four; distractors are a one-cell near miss and grids of
    other random maps (any size, as in VSP)."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    options = [m.text_grid(), _near_miss(m, rng)]
    while len(options) < len(OPTIONS):
        other = generate_map(int(rng.integers(MIN_SIZE, MAX_SIZE + 1)), rng).text_grid()
        if other not in options:
            options.append(other)
    order = rng.permutation(len(OPTIONS))
    shuffled = [options[i] for i in order]
    answer = OPTIONS[int(np.flatnonzero(order == 0)[0])]
    question = GRID_Q.format(**dict(zip(OPTIONS, shuffled)))
    return Sample([_map_image(m, style, canvas), question], [answer], "vsp_grid",
                  _meta(m, style, answer, options=dict(zip(OPTIONS, shuffled))))


def player_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """Where is the player? -> "row r column c" (1-indexed)."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    answer = PLAYER_A.format(row=m.player[0] + 1, col=m.player[1] + 1)
    return Sample([_map_image(m, style, canvas), PLAYER_Q], [answer], "vsp_player", _meta(m, style, answer))


def walk_player_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """``player_sample`` on the board after a random walk of 1-9 moves (as ``vsp_walk_look`` draws them), so the
    player mostly stands off the start, where the start shows alone (a stool in the classic look), facing its
    last move: a visual thought's board. On input maps the player always covers the start, so a quantizer
    aligned on them alone gives a lone start and the player one code (README, "What the codes keep")."""
    _check(size, style, canvas)
    m, actions = _random_walk(rng, size)
    return _player_after(m, actions, style, canvas, "vsp_walk_player")


def plan_player_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """``player_sample`` on a board along the shortest plan, half the time its last (the player on the goal):
    the thought a plan ends with. In the classic look MBAQ codes the goal cell with the elf in front
    of the present exactly as the goal alone, so the board's codes show no player at all; the reader has to
    learn that an elf coded nowhere stands on the goal (README, "The board a plan ends on")."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    plan = shortest_plan(m)
    steps = len(plan) if rng.random() < 0.5 else int(rng.integers(1, len(plan) + 1))
    return _player_after(m, plan[:steps], style, canvas, "vsp_plan_player")


def _player_after(m: LakeMap, moves: list[str], style: str, canvas: int, task: str) -> Sample:
    """"Where is the player ?" on the board after ``moves`` (at least one), the player facing the last."""
    pos = m.player
    for a in moves:
        pos = move(m, pos, a)
    answer = PLAYER_A.format(row=pos[0] + 1, col=pos[1] + 1)
    image = render_canvas(m, pos, style, moves[-1], canvas=canvas)
    return Sample([image, PLAYER_Q], [answer], task, _meta(m, style, answer, actions=moves, pos=pos))


def neighbour_words(m: LakeMap, pos: Pos) -> str:
    """The cells left of, below, right of and above ``pos`` (the move order L D R U): F, H, G or Edge (off
    the grid)."""
    return " ".join(m.cell(nxt) if (nxt := move(m, pos, a)) != pos else EDGE for a in ACTIONS)


def neighbour_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """What is next to the player, e.g. "F H Edge G": the local perception a safe move needs (our addition to
    VSP's T1-T4; it asks about a cell relative to another rather than at written coordinates)."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    answer = neighbour_words(m, m.player)
    return Sample([_map_image(m, style, canvas), NEIGHBOURS_Q], [answer], "vsp_neighbours",
                  _meta(m, style, answer))


def describe_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """Write the map as a text grid ("S F H / F F G / ..."): one answer token per cell in raster order, the
    densest perception signal there is (every cell supervised, not one cell per question)."""
    _check(size, style, canvas)
    m = generate_map(size, rng)
    answer = m.text_grid()
    return Sample([_map_image(m, style, canvas), DESCRIBE_Q], [answer], "vsp_describe", _meta(m, style, answer))


# ------------------------------------------------------------------------------------------- reasoning


def _random_walk(rng: np.random.Generator, size: int) -> tuple[LakeMap, list[str]]:
    """A fresh map and an in-grid walk of 1-9 moves on it that avoids the goal and, half the time, ends in a
    hole (``_walk``); maps where such a walk does not exist are drawn again."""
    actions = None
    while actions is None:
        m = generate_map(size, rng)
        length = int(rng.integers(1, 10))
        actions = _walk(m, rng, length, length if rng.random() < 0.5 else None)
    return m, actions


def _walk(m: LakeMap, rng: np.random.Generator, length: int, hole_at: int | None) -> list[str] | None:
    """A random in-grid walk of ``length`` moves that avoids the goal; it steps into a hole exactly at move
    ``hole_at`` (1-based; later moves are arbitrary) or never if None. None when the map cannot do it."""
    pos, actions = m.player, []
    for step in range(1, length + 1):
        if hole_at is not None and step > hole_at:
            actions.append(ACTIONS[rng.integers(len(ACTIONS))])
            continue
        want_hole = step == hole_at
        choices = [a for a in ACTIONS if move(m, pos, a) != pos and move(m, pos, a) != m.goal
                   and (move(m, pos, a) in m.holes) == want_hole]
        if not choices:
            return None
        a = choices[rng.integers(len(choices))]
        actions.append(a)
        pos = move(m, pos, a)
    return actions


def safety_sample(rng: np.random.Generator, size: int, style: str, canvas: int = 128) -> Sample:
    """T4: "Is the action sequence R D D safe ?" -> Yes / No; lengths 1/3/5/7/9, half safe."""
    _check(size, style, canvas)
    length = int(rng.choice(SAFETY_LENGTHS))
    safe = bool(rng.random() < 0.5)
    actions = None
    while actions is None:  # rejection: a map where this kind of walk exists (e.g. has a reachable hole)
        m = generate_map(size, rng)
        actions = _walk(m, rng, length, None if safe else int(rng.integers(1, length + 1)))
    answer = YES if safe else NO
    question = SAFETY_Q.format(actions=" ".join(actions))
    return Sample([_map_image(m, style, canvas), question], [answer], "vsp_safety",
                  _meta(m, style, answer, actions=actions))


Sampler = Callable[[np.random.Generator, int, str, int], Sample]
SAMPLERS: dict[str, Sampler] = {
    "vsp_plan": plan_sample,
    "vsp_plan_retry": retry_plan_sample,
    "vsp_plan_text": text_plan_sample,
    "vsp_plan_look": look_plan_sample,
    "vsp_plan_text_look": text_look_plan_sample,
    "vsp_walk_look": walk_look_sample,
    "vsp_walk_text_look": text_walk_look_sample,
    "vsp_hole": hole_sample,
    "vsp_relation": relation_sample,
    "vsp_relation_steps": relation_steps_sample,
    "vsp_grid": grid_sample,
    "vsp_player": player_sample,
    "vsp_walk_player": walk_player_sample,
    "vsp_plan_player": plan_player_sample,
    "vsp_describe": describe_sample,
    "vsp_neighbours": neighbour_sample,
    "vsp_safety": safety_sample,
}
"""Task name (as used in ``TrainConfig.tasks``) -> sampler."""


def vocabulary() -> set[str]:
    """Every whitespace-separated word a VSP text can contain (templates, answers, grid letters, indices)."""
    templates = [PLAN_PROMPT, TEXT_PLAN_PROMPT, HOLE_Q, RELATION_Q, GRID_Q, PLAYER_Q, PLAYER_A, SAFETY_Q,
                 DESCRIBE_Q, NEIGHBOURS_Q, RELATION_STEPS_A]
    words = {w for t in templates for w in re.sub(r"\{\w+\}", " ", t).split()}
    words |= set(ACTIONS) | {DONE, FELL, YES, NO, EDGE} | set(RELATIONS) | set(OPTIONS) | set("SFHG") | {"/"}
    words |= {str(i) for i in range(1, MAX_SIZE + 1)}
    return words
