"""How well a pixel decoder draws the boards along plans, from their true codes: the pixel oracle's verdict on
the board a plan ends on (the player on the goal) and on every other board, per look and map size.

    python tools/decoder_boards.py --model checkpoints/tiny --decoder checkpoints/tiny/decoder --maps 30

Maps are the development seed's (``eval.vsp.eval_maps`` seed 1, never the evaluation's seed 0). Each board
after each move of the shortest plan is rendered, encoded by the model's frozen encoder + MBAQ, drawn by the
decoder with the input map as its reference (as ``eval vsp`` draws thoughts) and read by ``read_canvas``; the
thoughts' own errors are left out, so this isolates the decoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from latentum.api import LatentUM
from latentum.apps.vsp.evaluate import drawn_right, eval_maps, true_board_ids
from latentum.worlds import frozenlake as fl


def boards_right(api: LatentUM, style: str, level: int, maps: int) -> dict[bool, list[bool]]:
    """{on the goal: [drawn right per board]} for the boards along the shortest plans of ``maps`` maps."""
    truth = []
    for m in eval_maps(level, maps, seed=1):
        pos = m.player
        for a in fl.shortest_plan(m):
            pos = fl.move(m, pos, a)
            truth.append((m, pos, a))
    right = drawn_right(api, true_board_ids(api, truth, style), truth, style)
    out: dict[bool, list[bool]] = {True: [], False: []}
    for ok, (m, pos, _) in zip(right, truth):
        out[pos == m.goal].append(ok)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/tiny", help="model folder (its encoder + MBAQ give the codes)")
    ap.add_argument("--decoder", default=None, help="decoder folder (default: the model's decoder/)")
    ap.add_argument("--maps", type=int, default=30, help="maps per size and look")
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 5, 8], help="map sizes")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    api = LatentUM.from_pretrained(args.model)
    if args.decoder:
        api.decoder_path = Path(args.decoder)  # loaded on first use in place of the model's own
    print("| look | size | goal boards right | other boards right |")
    print("|---|---|---|---|")
    for style in fl.STYLES:
        for level in args.levels:
            ok = boards_right(api, style, level, args.maps)
            print(f"| {style} | {level} | {sum(ok[True])}/{len(ok[True])} | {sum(ok[False])}/{len(ok[False])} |",
                  flush=True)


if __name__ == "__main__":
    main()
