"""Visual spatial planning: one move, then a visual thought, until "Done" (LatentUM, VSP section).

Rows advance in lockstep, one move per step. Each step samples the move from the planning alphabet {L, D, R,
U, Done} (the grammar the model is trained on), then the model imagines the next board as latent tokens and
reads it back through the understanding branch. After a thought the model may instead say "hole"
(``vsp.FELL``): the move and its thought go to ``Plan.retracted`` and the model chooses again from the board
before, never the same move twice at one board (``vsp.retry_plan_sample`` teaches this). Before a move the
model may look: a look word makes it say 4 (``vsp.look_plan_sample``), then a move; they go to ``Plan.looks``.
With ``heed_looks`` the move is then chosen among those whose cell the look did not name a hole or the edge
(when the look leaves any), and a plan ends right after a move into the cell its look named the goal, and only
then: the model is held to what it just said it sees, not to the true map. With ``avoid_revisits`` the move is
also kept off the cells the plan already stood on (while a move to a new cell is left): a shortest path never
comes back, and plans that fail mostly pace back and forth. Greedy thoughts are drafted (``draft_thoughts``;
``Decoder.generate_latent``): the same thoughts, checked several tokens per forward against a guess, the board
before with the two cells the move changes redrawn from what the run has seen (``_Drafts``). ``plan_rows``
batches continuously: maps of every size share ``batch`` decoder rows, and when a plan ends its row restarts
on the next waiting map (``Decoder.take_rows``; waiting maps are prefilled and encoded a batch at a time); every
row decides as it would alone, so greedy plans equal their batch-1 plans. ``imagine_rows`` follows given moves
instead of choosing them (looks and thoughts as above; safety with visual thoughts). ``thoughts`` picks the
variant evaluated side by side: "latent" (ours), "pixel" (render with the pixel decoder and re-encode before
reading), "none" (text only).

The public entry points that take a ``LatentUM`` and map images (``plan``, ``imagine``...) are in
``latentum.apps.vsp.entry``; this module holds the loops under them.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from latentum.data.canvas import active_grid, active_index
from latentum.generation.engine import PAD_CODE, Decoder
from latentum.types import GREEDY, LatentImage, SamplingParams
from latentum.worlds.frozenlake.lake import ACTIONS, LakeMap, displace
from latentum.worlds.frozenlake.oracle import read_canvas
from latentum.worlds.frozenlake.tasks import DONE, EDGE, FELL, PLAN_PROMPT, TEXT_PLAN_PROMPT, neighbour_words

THOUGHT_MODES = ("latent", "pixel", "none")
LOOK_ORDER = ACTIONS
"""A look names the cell after each move, in this order (``vsp.neighbour_words``)."""
LOOK_WORDS = ("F", "H", "G", "S", EDGE)
"""What a look may name: ice, hole, goal, start (plain ice once the player has left it), off the grid."""
STEPS_PER_SIDE = 4
"""The default move budget of a plan, per cell of the map's side: 32 on 8x8, twice the 14 moves of a corner to
corner path (the longest shortest path among 200 fresh 8x8 maps is 19 moves)."""
HAZARDS = ("H", EDGE)
"""Look words that end a plan under the strict rule: with ``heed_looks`` the planner avoids moving there."""


@dataclass
class Plan:
    actions: list[str] = field(default_factory=list)
    thoughts: list = field(default_factory=list)  # list[LatentImage], one per move
    done: bool = False
    """The model said "Done" (rather than running out of steps)."""
    looks: list = field(default_factory=list)
    """What the model said was around the player before each kept move ("F H Edge G": left, below, right,
    above), or None where it did not look (models trained on ``vsp_plan_look`` look before every move)."""
    retracted: list = field(default_factory=list)
    """(k, move, thought) for each move the model took back after k kept moves: its thought showed the player
    in a hole and it said so (``vsp.FELL``)."""
    seconds: float = 0.0


BATCH = 16
"""Rows planned at once by default: a finished plan's row goes to the next waiting map (continuous batching)."""


def plan_rows(api, canvases: list[np.ndarray], max_steps: int | None, params: SamplingParams, generator,
              thoughts: str = "latent", oracle=None, heed_looks: bool = False,
              draft_thoughts: bool = True, avoid_revisits: bool = False, batch: int = BATCH) -> list[Plan]:
    """Plan every canvas, ``batch`` rows at a time: when a plan ends, the next waiting map takes its row (maps of
    every size share the batch; the largest start first). A plan stops at "Done" or after ``max_steps`` kept
    moves (None: ``STEPS_PER_SIDE`` per cell of the map's side). Every row decides as it would alone, so greedy
    plans equal their batch-1 plans; sampled ones draw from one shared generator.

    ``oracle`` (evaluation only) replaces the generated thoughts: ``oracle(rows, actions) -> ids (B, N, G)`` gives
    the true board of each canvas in ``rows`` after its ``actions``, which the model reads instead of imagining."""
    if thoughts not in THOUGHT_MODES:
        raise ValueError(f"thoughts must be one of {THOUGHT_MODES}, got {thoughts!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    run = _Run(api, canvases, max_steps, params, generator, thoughts, oracle, heed_looks, draft_thoughts,
               avoid_revisits)
    return run.plan_all(batch)


class _Run:
    """One continuous planning run: the per-plan state, and a decoder whose rows are the plans in progress
    (``rows[b]``: the plan decoder row b belongs to)."""

    def __init__(self, api, canvases, max_steps, params, generator, thoughts, oracle, heed_looks, draft_thoughts,
                 avoid_revisits):
        self.api, self.canvases, self.params, self.generator = api, canvases, params, generator
        self.thoughts, self.oracle, self.heed_looks, self.avoid_revisits = thoughts, oracle, heed_looks, avoid_revisits
        tok = api.tokenizer
        self.move_ids = [tok.encode(a)[0] for a in ACTIONS]
        self.done_id, self.fell_id = tok.encode(DONE)[0], tok.token_to_id(FELL)
        self.can_retract = thoughts != "none" and self.fell_id is not None
        self.look_ids = [i for w in LOOK_WORDS if (i := tok.token_to_id(w)) is not None]
        self.V = api.model.backbone.lm_head.out_features
        self.grids = [active_grid(c, api.config.encoder.grid) for c in canvases]
        self.budget = [STEPS_PER_SIDE * g if max_steps is None else max_steps for g in self.grids]
        self.drafting = draft_thoughts and params.temperature == 0 and thoughts != "none" and oracle is None
        self.guessing = draft_thoughts and params.temperature == 0  # looks are checked against guesses too
        n = len(canvases)
        self.plans = [Plan() for _ in range(n)]
        self.banned: list[set[int]] = [set() for _ in range(n)]  # moves taken back at each plan's current board
        self.taken = [0] * n  # steps each plan has run
        self.start: list[torch.Tensor | None] = [None] * n  # (N, G) the input map's codes
        self.styles: list[str | None] = [None] * n
        self.origin: list[tuple[int, int] | None] = [None] * n  # where the player starts, if the map shows it
        self.drafts = _Drafts()
        self.lakes: list[LakeMap | None] = [None] * n  # the map as the pixel oracle reads it: guesses at looks
        self.dec = None
        self.rows = torch.zeros(0, dtype=torch.long)
        self.queue: list[int] = []  # the maps waiting for a row, largest first
        self.ready: dict[int, tuple[Decoder, int]] = {}  # a readied map -> (the decoder holding its prompt, row)
        self.chunk = 1

    def plan_all(self, batch: int) -> list[Plan]:
        if not self.canvases:
            return []
        t0 = time.perf_counter()
        self.queue = sorted(range(len(self.canvases)), key=lambda i: -self.grids[i])
        self.chunk = batch
        self.admit(self.next_maps(batch))
        while len(self.rows):
            ended = self.step()
            take = self.next_maps(len(ended))
            slots = ended[:len(take)]
            if len(ended) > len(take):  # more plans ended than maps wait: their rows leave the batch
                keep = torch.ones(len(self.rows), dtype=torch.bool)
                keep[ended[len(take):]] = False
                slots = [s - sum(e < s for e in ended[len(take):]) for s in slots]
                self.dec.keep_rows(torch.nonzero(keep).flatten().to(self.dec.next_pos.device))
                self.rows = self.rows[keep]
            if take:  # the next waiting maps take the places of plans that ended
                self.admit(take, slots)
        seconds = (time.perf_counter() - t0) / max(1, len(self.canvases))
        for p in self.plans:
            p.seconds = seconds
        return self.plans

    def next_maps(self, k: int) -> list[int]:
        """The next ``k`` waiting maps, off the queue. Maps are readied ``chunk`` at a time (``prepare``): one row
        freeing up at a time would otherwise prefill and encode one map at a time."""
        take, self.queue = self.queue[:k], self.queue[k:]
        pending = [i for i in take if i not in self.ready]
        if pending:
            self.prepare(pending + [i for i in self.queue if i not in self.ready][:max(0, self.chunk - len(pending))])
        return take

    def prepare(self, idx: list[int]) -> None:
        """Ready the maps ``idx`` together: their prompts prefilled in one decoder (``Decoder.prefilled``), their
        board codes in one encoder call per size, and what the pixel oracle reads on them (guesses at thoughts
        and looks, the pixel baseline's look)."""
        prompt = TEXT_PLAN_PROMPT if self.thoughts == "none" else PLAN_PROMPT
        source = Decoder.prefilled(self.api.model, self.api.tokenizer, [[prompt, self.canvases[i]] for i in idx])
        for k, i in enumerate(idx):
            self.ready[i] = (source, k)
            state = _read(self.canvases[i], self.grids[i]) if self.guessing or self.thoughts == "pixel" else None
            self.styles[i] = state.style if state is not None else None
            self.origin[i] = state.player if state is not None else None
            self.lakes[i] = _lake(state, self.grids[i])
        if self.drafting or self.thoughts == "pixel":
            for g in sorted({self.grids[i] for i in idx}):
                same = [i for i in idx if self.grids[i] == g]
                for i, codes in zip(same, _board_codes(self.api, [self.canvases[i] for i in same], g)):
                    self.start[i] = codes

    def admit(self, idx: list[int], slots: list[int] | None = None) -> None:
        """Start the plans ``idx`` (readied): their prompts fill a new decoder, or take the decoder rows ``slots``."""
        if slots is None:
            self.dec = self.api.new_decoder(len(idx))
            self.rows = torch.zeros(len(idx), dtype=torch.long)
            slots = list(range(len(idx)))
        for source in {id(self.ready[i][0]): self.ready[i][0] for i in idx}.values():  # rows prefilled together
            at = [b for b, i in zip(slots, idx) if self.ready[i][0] is source]
            rows = [self.ready[i][1] for i in idx if self.ready[i][0] is source]
            self.dec.take_rows(torch.tensor(at), source, torch.tensor(rows))
        self.rows[slots] = torch.tensor(idx, dtype=torch.long)
        for i in idx:
            del self.ready[i]
            if self.drafting:
                self.drafts.begin(i, self.start[i], self.player_cell(i))

    # ----------------------------------------------------------------------------------- the move rules
    def moves_left(self, rs: list[int], extra: list[int]) -> torch.Tensor:
        """(len(rs), V) bool: the moves not yet taken back at each plan's board, plus ``extra``."""
        allowed = torch.zeros(len(rs), self.V, dtype=torch.bool)
        for i, r in enumerate(rs):
            allowed[i, [t for t in self.move_ids if t not in self.banned[r]] + extra] = True
        return allowed

    def fresh_of(self, rs: list[int]) -> torch.Tensor | None:
        """(len(rs), V) bool: the moves onto a cell each plan has not stood on (None: rule off)."""
        return _fresh_moves([self.plans[r].actions for r in rs], self.move_ids, self.V) if self.avoid_revisits \
            else None

    def prefer_fresh(self, rs: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (len(rs), V) with its moves cut to those onto a new cell (``avoid_revisits``), if any."""
        fresh = self.fresh_of(rs)
        return allowed if fresh is None else _prefer(allowed, fresh, self.move_ids)

    def heed_goal(self, rs: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """With ``heed_looks``: "Done" alone after a move into the cell the look before it named the goal, and
        no "Done" before the first move or after a move whose look named something else there (``goal_named``)."""
        if not self.heed_looks:
            return allowed
        for i, r in enumerate(rs):
            named = goal_named(self.plans[r])
            if named:
                allowed[i] = False
                allowed[i, self.done_id] = True
            elif named is False:
                allowed[i, self.done_id] = False
        return allowed

    # ---------------------------------------------------------------------------------------- one step
    def step(self) -> list[int]:
        """Every row: a move (after a look, or after taking the last move back), or "Done"; then the thought of
        the board the move leads to. Returns the decoder rows whose plans ended (said "Done" or used their
        budget); a row that says "Done" sits out the rest of the step."""
        dec, params, generator = self.dec, self.params, self.generator
        rs = self.rows.tolist()
        dec.make_room(2 * max(self.grids[r] for r in rs) ** 2 + 16)  # a step's look, move, thought and read-back
        first = torch.zeros(len(rs), self.V, dtype=torch.bool)
        first[:, self.move_ids + [self.done_id] + self.look_ids] = True
        if self.can_retract:
            first[:, self.fell_id] = torch.tensor([self.taken[r] > 0 for r in rs])
        first = self.heed_goal(rs, self.prefer_fresh(rs, first))
        nxt = dec.sample_text(params, generator, allowed=first).cpu()
        fell = nxt == self.fell_id if self.can_retract else torch.zeros_like(nxt, dtype=torch.bool)
        for r in self.rows[~fell].tolist():
            self.banned[r].clear()  # the last move stood (or there was none): a new board, nothing taken back yet
        if fell.any():
            nxt[fell] = self.take_back(fell, nxt)
        nxt, looks = _look_then_move(dec, nxt, self.look_ids, self.moves_left(rs, []), params, generator,
                                     self.move_ids, heed=self.heed_looks, fresh=self.fresh_of(rs),
                                     guess=self.look_guess(rs) if self.guessing else None)
        for r, t, look in zip(rs, nxt.tolist(), looks):
            self.taken[r] += 1
            if t == self.done_id:
                self.plans[r].done = True
            else:
                self.plans[r].actions.append(ACTIONS[self.move_ids.index(t)])
                self.plans[r].looks.append(look)
        going = nxt != self.done_id
        if going.any():
            _feed_some(dec, going, nxt)
            if self.thoughts != "none":
                self.think(going)
        over = torch.tensor([self.taken[r] >= self.budget[r] for r in rs], dtype=torch.bool)
        return torch.nonzero(~going | over).flatten().tolist()

    def take_back(self, fell: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """The rows in ``fell`` said their last thought showed a hole: take that move back, say so, and choose
        again from the board before it (not the same move). Returns the rows' new first tokens."""
        for r in self.rows[fell].tolist():
            plan = self.plans[r]
            a, t = plan.actions.pop(), plan.thoughts.pop()
            plan.looks.pop()
            plan.retracted.append((len(plan.actions), a, t))
            self.banned[r].add(self.move_ids[ACTIONS.index(a)])
            if self.drafting:
                self.drafts.back(r, plan.thoughts[-1].ids if plan.thoughts else self.start[r])
        _feed_some(self.dec, fell, torch.full_like(nxt, self.fell_id))
        rs = self.rows[fell].tolist()
        allowed = self.prefer_fresh(rs, self.moves_left(rs, [self.done_id]))
        allowed[:, self.look_ids] = allowed[:, self.move_ids].any(-1, keepdim=True)  # a look needs a move to follow
        return self.dec.sample_text(self.params, self.generator, allowed=allowed,
                                    rows=torch.nonzero(fell).flatten()).cpu()

    def think(self, going: torch.Tensor) -> None:
        """Each row in ``going`` (B,) bool imagines (or, with an oracle, is shown) the board its move leads to
        and reads it back; the other rows sit it out."""
        at = torch.nonzero(going).flatten().tolist()
        rs = self.rows.tolist()
        grids = [self.grids[r] for r in rs]
        dev = self.dec.next_pos.device
        moved = {b: (self.player_cell(rs[b], -1), self.player_cell(rs[b]), self.plans[rs[b]].actions[-1])
                 for b in at} if self.drafting else {}  # each thinking row's cells before and after, its move
        if self.oracle is not None:  # the true board is read in place of a thought, and kept as one
            shown = self.oracle([rs[b] for b in at], [self.plans[rs[b]].actions for b in at]).cpu()
            ids = torch.full((len(rs), *shown.shape[1:]), PAD_CODE, dtype=torch.long)
            ids[at] = shown
            self.dec.feed_latents(ids.to(dev), rows=going)
        else:
            draft = _padded([self.drafts.guess(r, *moved[b]) if b in moved else self.drafts.board[r]
                             for b, r in enumerate(rs)]) if self.drafting else None
            reread = functools.partial(self.pixel, rows=rs) if self.thoughts == "pixel" else None
            ids = self.dec.think(self.params, self.generator, reread=reread, grid=grids, draft=draft,
                                 rows=going).cpu()
        for b in at:
            r, g = rs[b], grids[b]
            x = ids[b, :g * g]
            self.plans[r].thoughts.append(LatentImage(x))
            if self.drafting:
                self.drafts.saw(r, x, *moved[b])

    def player_at(self, r: int, moves: int | None = None) -> tuple[int, int] | None:
        """The player's cell after the first ``moves`` kept moves of plan ``r`` (default all), counted from where
        the map shows it (a move off the grid stays put); None if the map shows none."""
        if self.origin[r] is None:
            return None
        g, (row, col) = self.grids[r], self.origin[r]
        for a in self.plans[r].actions[:moves]:
            nr, nc = displace((row, col), a)
            row, col = (nr, nc) if 0 <= nr < g and 0 <= nc < g else (row, col)
        return row, col

    def player_cell(self, r: int, moves: int | None = None) -> int | None:
        """``player_at`` as a raster index."""
        at = self.player_at(r, moves)
        return None if at is None else at[0] * self.grids[r] + at[1]

    def look_guess(self, rs: list[int]) -> torch.Tensor:
        """(len(rs), 3): a guess at words 2-4 of each plan's look, what the map read from its pixels has around
        the player (-1: no guess). The model's own words are checked against it; only the speed depends on it."""
        out = torch.full((len(rs), len(LOOK_ORDER) - 1), -1, dtype=torch.long)
        tok = self.api.tokenizer
        for i, r in enumerate(rs):
            lake, at = self.lakes[r], self.player_at(r)
            if lake is None or at is None:
                continue
            ids = [tok.token_to_id(w) for w in neighbour_words(lake, at).split()[1:]]
            if None not in ids:
                out[i] = torch.tensor(ids)
        return out

    def pixel(self, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """ids (B, N, G) of the plans ``rows`` -> pixel decoder -> canvas -> vision encoder -> MBAQ ids: the
        pixel-mediated baseline, one map size at a time (``_pixel_round_trip``); rows without an image
        (``PAD_CODE``) stay so."""
        out = torch.full_like(ids, PAD_CODE)
        taking = (ids[:, 0, 0] != PAD_CODE).tolist()
        for g in sorted({self.grids[r] for r in rows}):
            at = [b for b, r in enumerate(rows) if self.grids[r] == g and taking[b]]
            if not at:
                continue
            plans = [rows[b] for b in at]
            reread = _pixel_round_trip(self.api, g, [self.styles[r] for r in plans],
                                       torch.stack([self.start[r] for r in plans]))
            out[at, :g * g] = reread(ids[at, :g * g], rows=list(range(len(at)))).to(out)
        return out


class _Drafts:
    """Guesses at each plan's next thought, learned as a run goes. A guess is checked token by token
    (``Decoder.generate_latent(draft=...)``), so it changes the speed, never the thought. It is the board before,
    with the player's cell and the cell it left redrawn from what the run has seen: each cell's latest code
    with nobody on it, the code "the player, after this move, on a cell that looked like this" took (the
    player faces its last move), and the code the player's first cell took once left (the player starts on
    it, so it was never seen empty)."""

    def __init__(self):
        self.board: dict[int, torch.Tensor] = {}  # plan -> (N, G) its latest board
        self.ground: dict[int, torch.Tensor] = {}  # plan -> (N, G) each cell's latest code with nobody on it
        self.known: dict[int, torch.Tensor] = {}  # plan -> (N,) bool: the cell was seen empty
        self.standing: dict[tuple, torch.Tensor] = {}  # (move, an empty cell's code) -> the player on it
        self.left: dict[tuple, torch.Tensor] = {}  # the player's first cell's code -> its code once left

    def begin(self, r: int, codes: torch.Tensor, at: int | None) -> None:
        self.board[r], self.ground[r] = codes, codes.clone()
        self.known[r] = torch.ones(codes.size(0), dtype=torch.bool)
        if at is not None:
            self.known[r][at] = False

    def back(self, r: int, board: torch.Tensor) -> None:
        """A move was taken back: the next thought starts from ``board`` again."""
        self.board[r] = board

    def guess(self, r: int, old: int | None, new: int | None, move: str) -> torch.Tensor:
        """(N, G): plan ``r``'s next thought after ``move`` from cell ``old`` to ``new`` (None: not known)."""
        board = self.board[r]
        if old is None:
            return board
        ground, known, guess = self.ground[r], self.known[r], board.clone()
        if old != new:
            guess[old] = ground[old] if known[old] else self.left.get(_key(board[old]), board[old])
        guess[new] = self.standing.get((move, *_key(ground[new])), board[old]) if known[new] else board[old]
        return guess

    def saw(self, r: int, ids: torch.Tensor, old: int | None, new: int | None, move: str) -> None:
        """Plan ``r`` thought ``ids`` (N, G) after ``move`` from ``old`` to ``new``."""
        if old is not None:
            if self.known[r][new]:  # the player faces its move: the move is part of the key
                self.standing[(move, *_key(self.ground[r][new]))] = ids[new]
            if old != new and not self.known[r][old]:
                self.left[_key(self.board[r][old])] = ids[old]
        if new is not None:
            under, seen = self.ground[r][new].clone(), bool(self.known[r][new])
            self.ground[r] = ids.clone()
            self.ground[r][new] = under
            self.known[r][:] = True
            self.known[r][new] = seen
        self.board[r] = ids


def _key(code: torch.Tensor) -> tuple:
    return tuple(code.tolist())


def _padded(images: list[torch.Tensor]) -> torch.Tensor:
    """Images (N_i, G) of several sizes -> (B, max N_i, G), ``PAD_CODE`` after each."""
    N = max(x.size(0) for x in images)
    out = torch.full((len(images), N, images[0].size(1)), PAD_CODE, dtype=torch.long)
    for b, x in enumerate(images):
        out[b, :x.size(0)] = x
    return out


def _by_size(canvases: list[np.ndarray], grid: int) -> dict[int, list[int]]:
    """Active grid size -> the indices of the canvases of that size (one size shares the thought length)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(canvases):
        groups.setdefault(active_grid(c, grid), []).append(i)
    return groups


def imagine_rows(api, canvases: list[np.ndarray], actions: list[list[str]], params: SamplingParams, generator,
                 draft_thoughts: bool = True) -> list[Plan]:
    """Follow the given moves instead of choosing them (VSP T4 with visual thoughts): before each move the model
    looks, after it the model imagines the board it leads to and reads that back. A row stops at the first
    move into a cell its own look named a hole (``falls_at``): the episode would end there."""
    if len(actions) != len(canvases):
        raise ValueError(f"actions must hold one move sequence per image: got {len(actions)} for "
                         f"{len(canvases)} images")
    for i, moves in enumerate(actions):
        if not moves or any(a not in ACTIONS for a in moves):
            raise ValueError(f"actions[{i}] must be a non-empty list of moves from {ACTIONS}, got {moves!r}")
    plans: list[Plan | None] = [None] * len(canvases)
    for g, idx in sorted(_by_size(canvases, api.config.encoder.grid).items()):
        for p, i in zip(_imagine_group(api, [canvases[i] for i in idx], [actions[i] for i in idx], g, params,
                                       generator, draft_thoughts), idx):
            plans[i] = p
    return plans


def goal_named(plan: Plan) -> bool | None:
    """Did the look before the plan's last kept move name the goal in that move's cell? False before any move
    (the player starts off the goal), None if that move had no look."""
    if not plan.actions:
        return False
    if plan.looks[-1] is None:
        return None
    return plan.looks[-1].split()[LOOK_ORDER.index(plan.actions[-1])] == "G"


def falls_at(plan: Plan) -> int | None:
    """The index of the first kept move whose cell the look before it named a hole, or None (safe by its looks)."""
    for k, (a, look) in enumerate(zip(plan.actions, plan.looks)):
        if look is not None and look.split()[LOOK_ORDER.index(a)] == "H":
            return k
    return None


def _imagine_group(api, canvases, actions, g: int, params: SamplingParams, generator,
                   draft_thoughts: bool) -> list[Plan]:
    t0 = time.perf_counter()
    tok = api.tokenizer
    move_ids = [tok.encode(a)[0] for a in ACTIONS]
    look_ids = [i for w in LOOK_WORDS if (i := tok.token_to_id(w)) is not None]
    plans = [Plan() for _ in canvases]
    dec = api.new_decoder(len(canvases))
    dec.prefill([[PLAN_PROMPT, c] for c in canvases])
    V = dec.model.backbone.lm_head.out_features
    drafting = draft_thoughts and params.temperature == 0
    board = _board_codes(api, canvases, g) if drafting else None
    rows = torch.arange(len(canvases))
    for step in range(max(map(len, actions))):
        live = [i for i, r in enumerate(rows.tolist()) if step < len(actions[r]) and falls_at(plans[r]) is None]
        if not live:
            break
        if len(live) < len(rows):
            keep = torch.tensor(live)
            dec.keep_rows(keep.to(dec.next_pos.device))
            rows = rows[keep]
        forced = torch.zeros(len(rows), V, dtype=torch.bool)
        forced[torch.arange(len(rows)), [move_ids[ACTIONS.index(actions[r][step])] for r in rows.tolist()]] = True
        first = dec.sample_text(params, generator, allowed=look_ids).cpu()
        nxt, looks = _look_then_move(dec, first, look_ids, forced, params, generator, move_ids)
        for r, t, look in zip(rows.tolist(), nxt.tolist(), looks):
            plans[r].actions.append(ACTIONS[move_ids.index(t)])
            plans[r].looks.append(look)
        dec.feed_ids(nxt[:, None])
        ids = dec.think(params, generator, grid=g, draft=board[rows] if drafting else None,
                        window=max(1, g * g // len(rows))).cpu()
        if drafting:
            board[rows] = ids
        for r, x in zip(rows.tolist(), ids):
            plans[r].thoughts.append(LatentImage(x))
    seconds = (time.perf_counter() - t0) / len(canvases)
    for p in plans:
        p.seconds = seconds
    return plans


def _look_then_move(dec, nxt: torch.Tensor, look_ids: list[int], moves: torch.Tensor, params, generator,
                    move_ids: list[int], heed: bool = False, fresh: torch.Tensor | None = None,
                    guess: torch.Tensor | None = None):
    """Rows whose first token ``nxt`` (B,) is a look word say the rest of their look (4 words in all), then
    choose a move from ``moves`` (B, V) bool; with ``heed``, not one into a cell the look named a hazard
    (``move_ids`` are in ``LOOK_ORDER``), unless that rules out every move; then, with ``fresh`` (B, V) bool,
    not a move back to a cell the plan already stood on, unless that rules out every move left. ``guess``
    (B, 3) (greedy only): a guess at each row's words 2-4, checked in one forward (``_checked_look``; -1: no
    guess). Returns the chosen tokens (B,) and each row's look (or None)."""
    looking = torch.isin(nxt, torch.tensor(look_ids, dtype=nxt.dtype))
    if not looking.any():
        return nxt, [None] * len(nxt)
    idx = torch.nonzero(looking).flatten()
    n, W = len(idx), len(LOOK_ORDER)
    words = torch.zeros(n, W, dtype=torch.long)
    words[:, 0] = nxt[idx]
    fed = torch.zeros(n, dtype=torch.long)  # per looking row: its words fed so far (the next one is decided)
    if guess is not None and params.temperature == 0 and bool((guess[idx] >= 0).all()):
        fed = _checked_look(dec, looking, words, guess[idx], look_ids)
    for k in range(W):  # feed each decided word, then choose the next one (its first word is decided)
        now = fed == k
        if not now.any():
            continue
        which = torch.zeros_like(looking)
        which[idx[now]] = True
        _feed_some(dec, which, torch.zeros_like(nxt).index_put((idx[now],), words[now, k]))
        fed[now] = k + 1
        if k + 1 < W:
            words[now, k + 1] = dec.sample_text(params, generator, allowed=look_ids, rows=idx[now]).cpu()
    allowed = _heeding(moves[idx], words, move_ids, dec.tok) if heed else moves[idx]
    if fresh is not None:
        allowed = _prefer(allowed, fresh[idx], move_ids)
    nxt = nxt.clone()
    nxt[idx] = dec.sample_text(params, generator, allowed=allowed, rows=idx).cpu()
    looks: list[str | None] = [None] * len(nxt)
    for i, ids in zip(idx.tolist(), words.tolist()):
        looks[i] = " ".join(dec.tok.decode([t]) for t in ids)
    return nxt, looks


def _checked_look(dec, looking: torch.Tensor, words: torch.Tensor, guess: torch.Tensor,
                  look_ids: list[int]) -> torch.Tensor:
    """Feed each looking row's first word ``words[:, 0]`` (n,) and its guessed words 2-4 ``guess`` (n, 3) in
    one forward. A row keeps its guesses while each is the greedy look word after the words before it; the
    first that is not is replaced by that word (decided, not fed), and the keys of the rest are forgotten, so
    every row goes on as if it had said its words one per forward. Fills ``words`` with the decided words and
    returns how many of them each row has fed (1-4)."""
    idx = torch.nonzero(looking).flatten()
    B, n = looking.numel(), len(idx)
    ids = torch.zeros(B, 1 + guess.size(1), dtype=torch.long)
    ids[idx] = torch.cat([words[:, :1], guess], dim=1)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    valid[idx] = True
    dev = dec.next_pos.device
    mark, pos, last = dec.cache.length, dec.next_pos.clone(), dec.last
    hidden = dec.feed_ids(ids, valid=valid.to(dev))  # (B, 4, D)
    pred = []  # the greedy look word after each fed one, as ``sample_text`` would choose it there
    for j in range(ids.size(1)):
        dec.last = hidden[:, j]
        pred.append(dec.sample_text(GREEDY, allowed=look_ids, rows=idx).cpu())
    pred = torch.stack(pred, dim=1)  # (n, 4)
    hidden = hidden[idx.to(dev)]
    held = (pred[:, :-1] == guess).long().cumprod(1)  # (n, 3)
    a = held.sum(1)  # guesses each row keeps
    for j in range(guess.size(1)):
        words[:, j + 1] = torch.where(held[:, j].bool(), guess[:, j], pred[:, j])
    kept = torch.zeros(B, dtype=torch.long)
    kept[idx] = 1 + a
    dec.cache.truncate_rows(mark, kept.to(dec.cache.device))
    dec.next_pos = pos + kept.to(dev)
    last = last.clone()
    last[idx.to(last.device)] = hidden[torch.arange(n), a.to(dev)]
    dec.last = last
    return 1 + a


def _heeding(moves: torch.Tensor, said: torch.Tensor, move_ids: list[int], tok) -> torch.Tensor:
    """``moves`` (n, V) bool without the moves into cells that ``said`` (n, 4) look ids name a hazard; rows
    whose every move is ruled out keep ``moves``."""
    ids = [i for w in HAZARDS if (i := tok.token_to_id(w)) is not None]
    hazard = torch.isin(said, torch.tensor(ids, dtype=said.dtype))  # (n, 4), in LOOK_ORDER
    clear = torch.ones_like(moves)
    clear[:, move_ids] = ~hazard
    return _prefer(moves, clear, move_ids)


def _prefer(allowed: torch.Tensor, keep: torch.Tensor, move_ids: list[int]) -> torch.Tensor:
    """``allowed`` (n, V) bool with its moves cut to the ``keep`` (n, V) ones in rows that keep any (the others
    keep all their moves); other tokens (looks, "Done") stay as they are."""
    out = allowed.clone()
    moves = allowed[:, move_ids]
    new = moves & keep[:, move_ids]
    out[:, move_ids] = torch.where(new.any(-1, keepdim=True), new, moves)
    return out


def _fresh_moves(actions: list[list[str]], move_ids: list[int], V: int) -> torch.Tensor:
    """(B, V) bool: the moves that lead each row to a cell its plan has not stood on yet. Cells are counted
    from the moves alone (start at the origin, one step per move), with no look at the map: every kept move
    of a plan that scores is an in-grid step, and a shortest path never comes back to a cell."""
    fresh = torch.zeros(len(actions), V, dtype=torch.bool)
    for i, done in enumerate(actions):
        cells = list(itertools.accumulate(done, displace, initial=(0, 0)))
        for a, t in zip(ACTIONS, move_ids):
            fresh[i, t] = displace(cells[-1], a) not in cells
    return fresh


def _board_codes(api, canvases: list[np.ndarray], g: int) -> torch.Tensor:
    """The MBAQ codes (B, N, G) of the input maps' active g x g tokens."""
    index = torch.tensor(active_index(g, api.config.encoder.grid), device=api.model.device)
    return api.model.image_ids(np.stack(canvases))[:, index].cpu()


def _feed_some(dec, which: torch.Tensor, ids: torch.Tensor) -> None:
    """Feed ``ids`` (B,) to the rows in ``which`` (B,) bool only: the others get a padding slot no query ever
    sees, and keep their last hidden state."""
    last = dec.last
    dec.feed_ids(ids.view(-1, 1).to(torch.long), valid=which[:, None].to(dec.next_pos.device))
    dec.last = torch.where(which[:, None].to(last.device), dec.last, last)


def _lake(state, g: int) -> LakeMap | None:
    """The map a ``LakeState`` shows (its player where the plan starts), or None if it shows no player or goal."""
    if state is None or state.player is None or state.goal is None or g < 2:
        return None
    try:
        return LakeMap(g, frozenset(state.holes), state.player, state.goal)
    except (ValueError, TypeError):
        return None


def _read(canvas: np.ndarray, g: int):
    """What the pixel oracle reads on a g x g map canvas (a ``LakeState``), or None if it reads nothing."""
    try:
        return read_canvas(canvas, g)
    except ValueError:
        return None


def _pixel_round_trip(api, g: int, styles: list[str | None], references: torch.Tensor):
    """ids -> pixel decoder -> canvas -> vision encoder -> MBAQ ids: the pixel-mediated baseline. Row r of a
    plan's batch is drawn in ``styles[r]``, the look of its input map, given ``references[r]`` (N, G), the
    input map's own codes: the codes alias the player and the start stool, the map tells them apart
    (``PixelDecoder.cond_map``)."""
    canvas, grid = api.canvas, api.config.encoder.grid
    index = torch.tensor(active_index(g, grid))

    def reread(ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        pixels = api.render_ids(ids, style=[styles[r] for r in rows], reference=references[rows])
        up = np.stack([np.asarray(Image.fromarray(p).resize((canvas, canvas), Image.BILINEAR)) for p in pixels])
        return api.model.image_ids(up)[:, index.to(api.model.device)]

    return reread
