"""Visual spatial planning: one move, then a visual thought, until "Done" (LatentUM, VSP section).

Rows advance in lockstep. Each step samples the move from the planning alphabet {L, D, R, U, Done} (the
grammar the model is trained on), then the model imagines the next board as latent tokens and reads it back
through the understanding branch. After a thought the model may instead say "hole" (``vsp.FELL``): the move
and its thought go to ``Plan.retracted`` and the model chooses again from the board before, never the same
move twice at one board (``vsp.retry_plan_sample`` teaches this). Before a move the model may look: a look
word makes it say 4 (``vsp.look_plan_sample``), then a move; they go to ``Plan.looks``. With ``heed_looks``
the move is then chosen among those whose cell the look did not name a hole or the edge (when the look
leaves any), and a plan ends right after a move into the cell its look named the goal, and only then: the
model is held to what it just said it sees, not to the true map. With ``avoid_revisits`` the
move is also kept off the cells the plan already stood on (while a move to a new cell is left): a shortest
path never comes back, and plans that fail mostly pace back and forth. Greedy thoughts are
drafted from the board before them (``draft_thoughts``; ``Decoder.generate_latent``): the same thoughts,
checked several tokens per forward, since a move changes about two cells. ``imagine_rows`` follows given moves
instead of choosing them (looks and thoughts as above; safety with visual thoughts). ``thoughts`` picks the
variant evaluated side by side:
"latent" (ours), "pixel" (render with the pixel decoder and re-encode before reading), "none" (text only).

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
from latentum.types import LatentImage, SamplingParams
from latentum.worlds.frozenlake.lake import ACTIONS, displace
from latentum.worlds.frozenlake.oracle import read_canvas
from latentum.worlds.frozenlake.tasks import DONE, EDGE, FELL, PLAN_PROMPT, TEXT_PLAN_PROMPT

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


def plan_rows(api, canvases: list[np.ndarray], max_steps: int | None, params: SamplingParams, generator,
              thoughts: str = "latent", oracle=None, heed_looks: bool = False,
              draft_thoughts: bool = True, avoid_revisits: bool = False) -> list[Plan]:
    """Plan every canvas; rows are batched by map size (maps of one size share the thought length). A plan
    stops at "Done" or after ``max_steps`` kept moves (None: ``STEPS_PER_SIDE`` per cell of the map's side).

    ``oracle`` (evaluation only) replaces the generated thoughts: ``oracle(rows, actions) -> ids (B, N, G)`` gives
    the true board of each canvas in ``rows`` after its ``actions``, which the model reads instead of imagining."""
    if thoughts not in THOUGHT_MODES:
        raise ValueError(f"thoughts must be one of {THOUGHT_MODES}, got {thoughts!r}")
    plans: list[Plan | None] = [None] * len(canvases)
    for g, idx in sorted(_by_size(canvases, api.config.encoder.grid).items()):
        row_oracle = (lambda rows, actions, idx=idx: oracle([idx[r] for r in rows], actions)) if oracle else None
        steps = STEPS_PER_SIDE * g if max_steps is None else max_steps
        for p, i in zip(_plan_group(api, [canvases[i] for i in idx], g, steps, params, generator, thoughts,
                                    row_oracle, heed_looks, draft_thoughts, avoid_revisits), idx):
            plans[i] = p
    return plans


def _by_size(canvases: list[np.ndarray], grid: int) -> dict[int, list[int]]:
    """Active grid size -> the indices of the canvases of that size (one size shares the thought length)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(canvases):
        groups.setdefault(active_grid(c, grid), []).append(i)
    return groups


def _plan_group(api, canvases, g: int, max_steps: int, params: SamplingParams, generator,
                thoughts: str, oracle=None, heed_looks: bool = False, draft_thoughts: bool = True,
                avoid_revisits: bool = False) -> list[Plan]:
    t0 = time.perf_counter()
    tok = api.tokenizer
    move_ids = [tok.encode(a)[0] for a in ACTIONS]
    done_id, fell_id = tok.encode(DONE)[0], tok.token_to_id(FELL)
    can_retract = thoughts != "none" and fell_id is not None
    look_ids = [i for w in LOOK_WORDS if (i := tok.token_to_id(w)) is not None]
    B = len(canvases)
    plans = [Plan() for _ in range(B)]
    banned: list[set[int]] = [set() for _ in range(B)]  # moves taken back at each row's current board
    dec = api.new_decoder(B)
    prompt = TEXT_PLAN_PROMPT if thoughts == "none" else PLAN_PROMPT
    dec.prefill([[prompt, c] for c in canvases])
    rows = torch.arange(B)  # which plan each decoder row belongs to
    V = dec.model.backbone.lm_head.out_features
    drafting = draft_thoughts and params.temperature == 0 and thoughts != "none" and oracle is None
    maps = _board_codes(api, canvases, g) if drafting or thoughts == "pixel" else None  # (B, N, G) input maps
    pixel = _pixel_round_trip(api, g, [map_style(c, g) for c in canvases], maps) if thoughts == "pixel" else None
    start = maps if drafting else None  # the first thought's draft
    board = start.clone() if drafting else None  # each row's latest board: the draft of its next thought

    def moves_left(rs: list[int], extra: list[int]) -> torch.Tensor:
        """(len(rs), V) bool: the moves not yet taken back at each row's board, plus ``extra``."""
        allowed = torch.zeros(len(rs), V, dtype=torch.bool)
        for i, r in enumerate(rs):
            allowed[i, [t for t in move_ids if t not in banned[r]] + extra] = True
        return allowed

    def fresh_of(rs: list[int]) -> torch.Tensor | None:
        """(len(rs), V) bool: the moves onto a cell each row's plan has not stood on (None: rule off)."""
        return _fresh_moves([plans[r].actions for r in rs], move_ids, V) if avoid_revisits else None

    def prefer_fresh(rs: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` (len(rs), V) with its moves cut to those onto a new cell (``avoid_revisits``), if any."""
        fresh = fresh_of(rs)
        return allowed if fresh is None else _prefer(allowed, fresh, move_ids)

    def heed_goal(rs: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """With ``heed_looks``: "Done" alone after a move into the cell the look before it named the goal, and
        no "Done" before the first move or after a move whose look named something else there (``goal_named``)."""
        if not heed_looks:
            return allowed
        for i, r in enumerate(rs):
            named = goal_named(plans[r])
            if named:
                allowed[i] = False
                allowed[i, done_id] = True
            elif named is False:
                allowed[i, done_id] = False
        return allowed

    for step in range(max_steps):
        retract = can_retract and step > 0
        first = torch.zeros(len(rows), V, dtype=torch.bool)
        first[:, move_ids + [done_id] + look_ids + ([fell_id] if retract else [])] = True
        first = heed_goal(rows.tolist(), prefer_fresh(rows.tolist(), first))
        nxt = dec.sample_text(params, generator, allowed=first).cpu()
        fell = nxt == fell_id
        for r in rows[~fell].tolist():
            banned[r].clear()  # the last move stood (or there was none): a new board, nothing taken back yet
        if fell.any():  # take the last move back, say so, and choose again from the board before it
            for r in rows[fell].tolist():
                a, t = plans[r].actions.pop(), plans[r].thoughts.pop()
                plans[r].looks.pop()
                plans[r].retracted.append((len(plans[r].actions), a, t))
                banned[r].add(move_ids[ACTIONS.index(a)])
                if drafting:
                    board[r] = plans[r].thoughts[-1].ids if plans[r].thoughts else start[r]
            _feed_some(dec, fell, torch.full_like(nxt, fell_id))
            allowed = prefer_fresh(rows[fell].tolist(), moves_left(rows[fell].tolist(), [done_id]))
            allowed[:, look_ids] = allowed[:, move_ids].any(-1, keepdim=True)  # a look needs a move to follow
            nxt[fell] = dec.sample_text(params, generator, allowed=allowed, rows=torch.nonzero(fell).flatten()).cpu()
        moves = moves_left(rows.tolist(), [])
        nxt, looks = _look_then_move(dec, nxt, look_ids, moves, params, generator, move_ids,
                                     heed=heed_looks, fresh=fresh_of(rows.tolist()))
        going = nxt != done_id
        for r, t, look in zip(rows.tolist(), nxt.tolist(), looks):
            if t == done_id:
                plans[r].done = True
            else:
                plans[r].actions.append(ACTIONS[move_ids.index(t)])
                plans[r].looks.append(look)
        if not going.any():
            break
        if not going.all():
            keep = torch.nonzero(going).flatten()
            dec.keep_rows(keep.to(dec.next_pos.device))
            rows, nxt = rows[keep], nxt[keep]
        dec.feed_ids(nxt[:, None])
        if thoughts == "none":
            continue
        if oracle is not None:  # the true board is read in place of a thought, and kept as one
            ids = oracle(rows.tolist(), [plans[r].actions for r in rows.tolist()]).cpu()
            dec.feed_latents(ids.to(dec.next_pos.device))
        else:
            draft = board[rows] if drafting else None
            reread = functools.partial(pixel, rows=rows.tolist()) if pixel else None
            ids = dec.think(params, generator, reread=reread, grid=g, draft=draft,
                            window=max(1, g * g // len(rows))).cpu()
            if drafting:
                board[rows] = ids
        for r, x in zip(rows.tolist(), ids):
            plans[r].thoughts.append(LatentImage(x))
    seconds = (time.perf_counter() - t0) / B
    for p in plans:
        p.seconds = seconds
    return plans


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
                    move_ids: list[int], heed: bool = False, fresh: torch.Tensor | None = None):
    """Rows whose first token ``nxt`` (B,) is a look word say the rest of their look (4 words in all), then
    choose a move from ``moves`` (B, V) bool; with ``heed``, not one into a cell the look named a hazard
    (``move_ids`` are in ``LOOK_ORDER``), unless that rules out every move; then, with ``fresh`` (B, V) bool,
    not a move back to a cell the plan already stood on, unless that rules out every move left. Returns the
    chosen tokens (B,) and each row's look (or None)."""
    looking = torch.isin(nxt, torch.tensor(look_ids, dtype=nxt.dtype))
    if not looking.any():
        return nxt, [None] * len(nxt)
    idx = torch.nonzero(looking).flatten()
    words = [nxt[idx]]
    _feed_some(dec, looking, nxt)
    for _ in range(len(LOOK_ORDER) - 1):
        w = dec.sample_text(params, generator, allowed=look_ids, rows=idx).cpu()
        words.append(w)
        _feed_some(dec, looking, torch.zeros_like(nxt).index_put((idx,), w))
    said = torch.stack(words, dim=1)  # (n, 4)
    allowed = _heeding(moves[idx], said, move_ids, dec.tok) if heed else moves[idx]
    if fresh is not None:
        allowed = _prefer(allowed, fresh[idx], move_ids)
    nxt = nxt.clone()
    nxt[idx] = dec.sample_text(params, generator, allowed=allowed, rows=idx).cpu()
    said = said.tolist()
    looks: list[str | None] = [None] * len(nxt)
    for i, ids in zip(idx.tolist(), said):
        looks[i] = " ".join(dec.tok.decode([t]) for t in ids)
    return nxt, looks


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


def map_style(canvas: np.ndarray, g: int) -> str | None:
    """The look ("gymnasium" / "classic") of a g x g FrozenLake map canvas as the pixel oracle reads it, None if
    it reads none (the codes do not carry the look, so the pixel decoder is told which one to draw)."""
    try:
        return read_canvas(canvas, g).style
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
