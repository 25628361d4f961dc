"""The VSP application's public entry points: plan or imagine on FrozenLake map images with a ``LatentUM``.

Each checks its arguments at the boundary, lays the map images out on the model's canvas (``board_canvas``) and
runs the loops of ``latentum.apps.vsp.planner`` (which documents the planning rules).
"""

from __future__ import annotations

import numpy as np
import torch

from latentum.api import LatentUM, read_image
from latentum.apps.vsp.planner import BATCH, STEPS_PER_SIDE, Plan, imagine_rows, plan_rows
from latentum.data.canvas import active_grid
from latentum.generation.sampling import seeded_generator
from latentum.types import GREEDY, SamplingParams
from latentum.worlds.frozenlake.render import to_canvas

# ------------------------------------------------------------------------------------------- public API


def board_canvas(api: LatentUM, image, argument: str = "image") -> np.ndarray:
    """A FrozenLake map image -> the model's canvas, uint8 (canvas, canvas, 3): a render at 64 px per cell
    (3..8 cells, gymnasium or classic) is fitted cell by cell onto the top-left patches (``render.to_canvas``);
    an image of the canvas size is taken as already laid out."""
    pixels = read_image(image, argument)
    if pixels.shape[:2] == (api.canvas, api.canvas):
        return pixels
    try:
        return to_canvas(pixels, canvas=api.canvas, grid=api.config.encoder.grid)[0]
    except ValueError as e:
        raise ValueError(f"{argument}: {e}") from None


@torch.inference_mode()
def plan(api: LatentUM, image, *, max_steps: int | None = None, seed: int = 0, sampling: SamplingParams = GREEDY,
         heed_looks: bool = True, avoid_revisits: bool = False) -> Plan:
    """Plan a FrozenLake map: a Plan with ``actions`` (L/D/R/U) and ``thoughts`` (LatentImage), at most
    ``max_steps`` moves (None: ``STEPS_PER_SIDE`` per cell of the map's side). ``heed_looks`` (default): never
    move where the model's own look just named a hole or the edge (when it looks and another move is left);
    False lets the model choose freely. ``avoid_revisits``: never move back to a cell the plan already stood on
    while a move to a new cell is left (off by default)."""
    return plan_batch(api, [image], max_steps=max_steps, seed=seed, sampling=sampling, heed_looks=heed_looks,
                      avoid_revisits=avoid_revisits)[0]


@torch.inference_mode()
def plan_batch(api: LatentUM, images: list, *, max_steps: int | None = None, seed: int = 0,
               sampling: SamplingParams = GREEDY, thoughts: str = "latent", heed_looks: bool = True,
               draft_thoughts: bool = True, avoid_revisits: bool = False, batch: int = BATCH) -> list[Plan]:
    """Plan several maps, ``batch`` at a time: when a plan ends, the next map takes its place (continuous
    batching; greedy plans equal their one-at-a-time plans). ``thoughts``: "latent" (ours), "pixel" (each
    thought rendered and re-encoded before it is read) or "none" (text only). ``draft_thoughts``: check each
    greedy thought against a guess drawn from the board before it, and each look against the map's own
    surroundings, several tokens per forward (the same plans, faster)."""
    canvases = _boards(api, images)
    sizes = {active_grid(c, api.config.encoder.grid) for c in canvases}
    _check_max_steps(api, max_steps, max(sizes) if sizes else 1)
    return plan_rows(api, canvases, max_steps, sampling, seeded_generator(seed), thoughts, heed_looks=heed_looks,
                     draft_thoughts=draft_thoughts, avoid_revisits=avoid_revisits, batch=batch)


def imagine(api: LatentUM, image, actions: list[str] | str, *, seed: int = 0,
            sampling: SamplingParams = GREEDY) -> Plan:
    """Follow the given moves on a FrozenLake map (e.g. "R D D" or ["R", "D", "D"]): the model looks before each
    move and imagines the board after it. ``falls_at(plan)`` is the first move into a cell its own look named a
    hole (None: the sequence is safe by its looks)."""
    return imagine_batch(api, [image], [actions], seed=seed, sampling=sampling)[0]


@torch.inference_mode()
def imagine_batch(api: LatentUM, images: list, actions: list, *, seed: int = 0,
                  sampling: SamplingParams = GREEDY) -> list[Plan]:
    """``imagine`` for several maps, one move sequence each (batched by size)."""
    if isinstance(actions, str) or not isinstance(actions, (list, tuple)):
        raise TypeError(f"actions must be a list of move sequences (one per image), got {type(actions).__name__}")
    moves = [a.split() if isinstance(a, str) else list(a) for a in actions]
    canvases = _boards(api, images)
    for i, m in enumerate(moves):
        g = active_grid(canvases[i], api.config.encoder.grid) if i < len(canvases) else 1
        _check_max_steps(api, len(m), g, argument=f"actions[{i}] (its length)")
    return imagine_rows(api, canvases, moves, sampling, seeded_generator(seed))


def _boards(api: LatentUM, images) -> list[np.ndarray]:
    if isinstance(images, (str, np.ndarray)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of map images, got {type(images).__name__}")
    return [board_canvas(api, im, f"images[{i}]") for i, im in enumerate(images)]


def _check_max_steps(api: LatentUM, steps, g: int, argument: str = "max_steps") -> None:
    """``steps`` moves must fit the model's context: each move costs its look, itself and a g x g thought (a move
    taken back costs more; the cache says so if a plan overflows it)."""
    if steps is None:
        steps = STEPS_PER_SIDE * g
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{argument} must be None (4 moves per cell of the map's side) or an int >= 1, "
                         f"got {steps!r}")
    per_move = g * g + 2 + 6  # the thought with its <img> </img>, the move and its look
    room = (api.config.backbone.max_seq_len - 64 - g * g) // per_move
    if steps > room:
        raise ValueError(f"{argument}={steps} does not fit the model's context (max_seq_len="
                         f"{api.config.backbone.max_seq_len}) on a {g}x{g} map; use at most {room}")
