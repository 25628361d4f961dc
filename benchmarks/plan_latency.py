"""Batch-1 planning latency of the shipped checkpoint: seconds per plan and per move, with thoughts decoded one
image token per forward and drafted from the board before (``draft_thoughts``), side by side.

    python benchmarks/plan_latency.py --model checkpoints/tiny --level 8 --maps 5 --repeats 3

Maps are the evaluation's own (``eval.vsp.eval_maps``, seed 0), so the drafted per-plan median matches the
``sec_per_plan`` that ``latentum eval vsp`` reports for that level. Each map is planned ``repeats`` times per
mode, the modes interleaved, and its fastest time kept (the machines are shared; the minimum is the least noisy
estimate of one map); then the median over maps and the ratio of the medians are printed. Each line also says
whether both modes planned the same moves and thoughts, which they must.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentum.api import LatentUM
from latentum.apps.vsp import entry
from latentum.apps.vsp.evaluate import eval_maps
from latentum.worlds import frozenlake as fl

MODES = {"token-by-token": False, "drafted": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/tiny")
    ap.add_argument("--level", type=int, default=8)
    ap.add_argument("--maps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--styles", nargs="+", default=["gymnasium", "classic"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    api = LatentUM.from_pretrained(args.model)
    maps = eval_maps(args.level, args.maps)
    entry.plan(api, fl.render_canvas(maps[0], maps[0].player, "gymnasium", canvas=api.canvas))  # warm-up
    for style in args.styles:
        per_plan = {mode: [] for mode in MODES}
        per_move = {mode: [] for mode in MODES}
        for i, m in enumerate(maps):
            canvas = fl.render_canvas(m, m.player, style, canvas=api.canvas)
            best, plans = dict.fromkeys(MODES, float("inf")), {}
            for _ in range(args.repeats):
                for mode, draft in MODES.items():
                    t0 = time.perf_counter()
                    plans[mode] = entry.plan_batch(api, [canvas], draft_thoughts=draft)[0]
                    best[mode] = min(best[mode], time.perf_counter() - t0)
            a, b = plans.values()
            same = a.actions == b.actions and all(x.ids.equal(y.ids) for x, y in zip(a.thoughts, b.thoughts))
            for mode in MODES:
                per_plan[mode].append(best[mode])
                per_move[mode].append(best[mode] / max(1, len(plans[mode].actions)))
            print(f"{style:9s} map {i}: " + "  ".join(f"{mode} {best[mode]:6.3f} s" for mode in MODES)
                  + f"  {len(b.actions)} moves {''.join(b.actions)}  same plan: {same}")
        med = {mode: statistics.median(per_plan[mode]) for mode in MODES}
        print(f"{style:9s} {args.level}x{args.level} median s/plan: "
              + "  ".join(f"{mode} {med[mode]:.3f} ({statistics.median(per_move[mode]):.3f} s/move)"
                          for mode in MODES)
              + f"  ratio {med['token-by-token'] / med['drafted']:.2f}x")


if __name__ == "__main__":
    main()
