"""Batch-1 planning latency of the shipped checkpoint: seconds per plan, per move and per generated token.

    python benchmarks/plan_latency.py --model checkpoints/tiny --level 8 --maps 5 --repeats 3

Maps are the evaluation's own (``eval.vsp.eval_maps``, seed 0), so the per-plan median matches the
``sec_per_plan`` that ``latentum eval vsp`` reports for that level. Each map is planned ``repeats`` times and
its fastest time kept (the machines are shared; the minimum is the least noisy estimate of one map), then
the median over maps is printed. The plans' moves are printed too, so two versions of the code can be checked
to plan the same moves before their times are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentum.api import LatentUM
from latentum.data import frozenlake as fl
from latentum.eval.vsp import eval_maps


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
    api.plan(fl.render_canvas(maps[0], maps[0].player, "gymnasium", canvas=api.canvas))  # warm-up
    for style in args.styles:
        per_plan, per_move = [], []
        for i, m in enumerate(maps):
            canvas = fl.render_canvas(m, m.player, style, canvas=api.canvas)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = api.plan(canvas)
                best = min(best, time.perf_counter() - t0)
            per_plan.append(best)
            per_move.append(best / max(1, len(plan.actions)))
            print(f"{style:9s} map {i}: {best:6.3f} s  {len(plan.actions)} moves  {''.join(plan.actions)}")
        print(f"{style:9s} {args.level}x{args.level}: median {statistics.median(per_plan):.3f} s/plan, "
              f"{statistics.median(per_move):.3f} s/move")


if __name__ == "__main__":
    main()
