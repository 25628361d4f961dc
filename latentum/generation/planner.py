"""Visual spatial planning: one move, then a visual thought, until "Done" (LatentUM, VSP section).

Rows advance in lockstep. Each step samples the move from the planning alphabet {L, D, R, U, Done} (the
grammar the model is trained on), then the model imagines the next board as latent tokens and reads it back
through the understanding branch. After a thought the model may instead say "hole" (``vsp.FELL``): the move
and its thought go to ``Plan.retracted`` and the model chooses again from the board before, never the same
move twice at one board (``vsp.retry_plan_sample`` teaches this). ``thoughts`` picks the variant evaluated side by side:
"latent" (ours), "pixel" (render with the pixel decoder and re-encode before reading), "none" (text only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from latentum.data.canvas import active_grid, active_index
from latentum.data.frozenlake import ACTIONS
from latentum.data.vsp import DONE, FELL, PLAN_PROMPT, TEXT_PLAN_PROMPT
from latentum.generation.sampling import SamplingParams

THOUGHT_MODES = ("latent", "pixel", "none")


@dataclass
class Plan:
    actions: list[str] = field(default_factory=list)
    thoughts: list = field(default_factory=list)  # list[LatentImage], one per move
    done: bool = False
    """The model said "Done" (rather than running out of steps)."""
    retracted: list = field(default_factory=list)
    """(k, move, thought) for each move the model took back after k kept moves: its thought showed the player
    in a hole and it said so (``vsp.FELL``)."""
    seconds: float = 0.0


def plan_rows(api, canvases: list[np.ndarray], max_steps: int, params: SamplingParams, generator,
              thoughts: str = "latent", oracle=None) -> list[Plan]:
    """Plan every canvas; rows are batched by map size (maps of one size share the thought length).

    ``oracle`` (evaluation only) replaces the generated thoughts: ``oracle(rows, actions) -> ids (B, N, G)`` gives
    the true board of each canvas in ``rows`` after its ``actions``, which the model reads instead of imagining."""
    if thoughts not in THOUGHT_MODES:
        raise ValueError(f"thoughts must be one of {THOUGHT_MODES}, got {thoughts!r}")
    grid = api.config.encoder.grid
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(canvases):
        groups.setdefault(active_grid(c, grid), []).append(i)
    plans: list[Plan | None] = [None] * len(canvases)
    for g, idx in sorted(groups.items()):
        row_oracle = (lambda rows, actions, idx=idx: oracle([idx[r] for r in rows], actions)) if oracle else None
        for p, i in zip(_plan_group(api, [canvases[i] for i in idx], g, max_steps, params, generator, thoughts,
                                    row_oracle), idx):
            plans[i] = p
    return plans


def _plan_group(api, canvases, g: int, max_steps: int, params: SamplingParams, generator,
                thoughts: str, oracle=None) -> list[Plan]:
    from latentum.api import LatentImage

    t0 = time.perf_counter()
    tok = api.tokenizer
    move_ids = [tok.encode(a)[0] for a in ACTIONS]
    done_id, fell_id = tok.encode(DONE)[0], tok.token_to_id(FELL)
    can_retract = thoughts != "none" and fell_id is not None
    B = len(canvases)
    plans = [Plan() for _ in range(B)]
    banned: list[set[int]] = [set() for _ in range(B)]  # moves taken back at each row's current board
    dec = api.new_decoder(B)
    prompt = TEXT_PLAN_PROMPT if thoughts == "none" else PLAN_PROMPT
    dec.prefill([[prompt, c] for c in canvases])
    rows = torch.arange(B)  # which plan each decoder row belongs to
    reread = _pixel_round_trip(api, g) if thoughts == "pixel" else None
    for step in range(max_steps):
        retract = can_retract and step > 0
        nxt = dec.sample_text(params, generator, allowed=move_ids + [done_id] + ([fell_id] if retract else []))
        nxt = nxt.cpu()
        fell = nxt == fell_id
        for r in rows[~fell].tolist():
            banned[r].clear()  # the last move stood (or there was none): a new board, nothing taken back yet
        if fell.any():  # take the last move back, say so, and choose again from the board before it
            for r in rows[fell].tolist():
                a, t = plans[r].actions.pop(), plans[r].thoughts.pop()
                plans[r].retracted.append((len(plans[r].actions), a, t))
                banned[r].add(move_ids[ACTIONS.index(a)])
            _feed_some(dec, fell, fell_id)
            allowed = torch.zeros(int(fell.sum()), dec.model.backbone.lm_head.out_features, dtype=torch.bool)
            for i, r in enumerate(rows[fell].tolist()):  # every move not yet taken back here, and "Done"
                allowed[i, [t for t in move_ids if t not in banned[r]] + [done_id]] = True
            nxt[fell] = dec.sample_text(params, generator, allowed=allowed, rows=torch.nonzero(fell).flatten()).cpu()
        going = nxt != done_id
        for r, t in zip(rows.tolist(), nxt.tolist()):
            if t == done_id:
                plans[r].done = True
            else:
                plans[r].actions.append(ACTIONS[move_ids.index(t)])
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
            ids = dec.think(params, generator, reread=reread, grid=g).cpu()
        for r, x in zip(rows.tolist(), ids):
            plans[r].thoughts.append(LatentImage(x))
    seconds = (time.perf_counter() - t0) / B
    for p in plans:
        p.seconds = seconds
    return plans


def _feed_some(dec, which: torch.Tensor, token: int) -> None:
    """Feed ``token`` to the rows in ``which`` (B,) bool only: the others get a padding slot no query ever sees,
    and keep their last hidden state."""
    last = dec.last
    ids = torch.full((dec.batch, 1), token, dtype=torch.long)
    dec.feed_ids(ids, valid=which[:, None].to(dec.next_pos.device))
    dec.last = torch.where(which[:, None].to(last.device), dec.last, last)


def _pixel_round_trip(api, g: int):
    """ids -> pixel decoder -> canvas -> vision encoder -> MBAQ ids: the pixel-mediated baseline."""
    canvas, grid = api.canvas, api.config.encoder.grid
    index = torch.tensor(active_index(g, grid))

    def reread(ids: torch.Tensor) -> torch.Tensor:
        pixels = api.render_ids(ids)
        up = np.stack([np.asarray(Image.fromarray(p).resize((canvas, canvas), Image.BILINEAR)) for p in pixels])
        return api.model.image_ids(up)[:, index.to(api.model.device)]

    return reread
