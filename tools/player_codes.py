"""Does a model's quantizer tell the player from the start? A diagnostic that prints two numbers per look.

- ``aliased``: the share of boards after a random walk (player off the start) whose code grid equals the code
  grid of the board with the player and the start swapped. 1.0 means the codes cannot say which is which.
- ``read``: "Where is the player ?" answered about the codes of such boards, per map size (the model reads
  them as it reads a visual thought). With ``--projector-from-quantizer`` the visual projector is first set to
  the quantizer's up-projection, which is how a stage-1 export (no stage 2 yet) reads codes.

    python tools/player_codes.py checkpoints/tiny
    python tools/player_codes.py runs/tiny_walkq/mbaq/export --projector-from-quantizer
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from latentum.api import LatentUM
from latentum.generation.interleaved import answer_latents
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake import tasks as vsp


def walk_boards(rng: np.random.Generator, size: int, n: int) -> list[tuple[fl.LakeMap, fl.Pos, str]]:
    """n (map, player cell, last move) after random safe walks of 1-5 moves that end off the start."""
    out = []
    while len(out) < n:
        m = fl.generate_map(size, rng)
        actions = vsp._walk(m, rng, int(rng.integers(1, 6)), None)
        if actions is None:
            continue
        pos = m.player
        for a in actions:
            pos = fl.move(m, pos, a)
        if pos not in (m.player, m.goal):
            out.append((m, pos, actions[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 8])
    p.add_argument("--per-size", type=int, default=30)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--projector-from-quantizer", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    api = LatentUM.from_pretrained(args.model)
    if args.projector_from_quantizer:
        api.model.init_visual_projector()
    ids = lambda img: api.image_latent(img).ids  # noqa: E731
    for style in fl.STYLES:
        rng = np.random.default_rng(args.seed)
        aliased, read = [], {}
        for size in args.sizes:
            boards = walk_boards(rng, size, args.per_size)
            codes, gold = [], []
            for m, pos, a in boards:
                here = ids(fl.render_canvas(m, pos, style, a, canvas=api.canvas))
                swapped = fl.LakeMap(m.size, m.holes, pos, m.goal)  # start where the player is, and back
                there = ids(fl.render_canvas(swapped, m.player, style, a, canvas=api.canvas))
                aliased.append(bool(torch.equal(here, there)))
                codes.append(here)
                gold.append(api.tokenizer.normalize(vsp.PLAYER_A.format(row=pos[0] + 1, col=pos[1] + 1)))
            said = answer_latents(api.model, api.tokenizer, torch.stack(codes), [vsp.PLAYER_Q] * len(codes))
            read[size] = float(np.mean([s == g for s, g in zip(said, gold)]))
        per_size = " ".join(f"{s}x{s} {v:.2f}" for s, v in read.items())
        print(f"{style:9s} aliased {np.mean(aliased):.3f} | read the player off the codes: {per_size}")


if __name__ == "__main__":
    main()
