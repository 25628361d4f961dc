"""The main job: plan a few maps of each size and style with a trained model, print a table, write GIFs.

Each GIF frame shows, side by side: the input map, the model's visual thought after the move (rendered by the
pixel decoder in the map's look, given the map as reference, only for display) and the true simulated board after
the same move.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from latentum.api import read_image
from latentum.apps.vsp import entry
from latentum.apps.vsp.evaluate import look_checks
from latentum.worlds import frozenlake as fl

DEMO_NAMESPACE = 31_337
PANEL = 192


def _panel(image: np.ndarray, title: str) -> Image.Image:
    im = Image.fromarray(image).resize((PANEL, PANEL), Image.NEAREST)
    out = Image.new("RGB", (PANEL, PANEL + 18), "white")
    out.paste(im, (0, 18))
    ImageDraw.Draw(out).text((4, 3), title, fill="black")
    return out


def write_gif(path: str | Path, m: fl.LakeMap, style: str, actions: list[str], thoughts: list[np.ndarray]) -> None:
    """Frames: [map | thought k | simulated state k] for each move k (thoughts may be empty)."""
    start = fl.render(m, m.player, style)
    frames, pos = [], m.player
    steps = [(None, None)] + list(zip(actions, thoughts if thoughts else [None] * len(actions)))
    for k, (a, thought) in enumerate(steps):
        if a is not None:
            pos = fl.move(m, pos, a)
        true = fl.render(m, pos, style, last_action=a)
        imagined = thought if thought is not None else np.full_like(true[:8, :8], 255)
        row = [_panel(start, "map"), _panel(imagined, f"thought {k}: {a or '-'}"), _panel(true, f"simulated {k}")]
        frame = Image.new("RGB", (3 * PANEL + 8, PANEL + 18), "white")
        for i, p in enumerate(row):
            frame.paste(p, (i * (PANEL + 4), 0))
        frames.append(frame)
        if pos in m.holes or pos == m.goal:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=700, loop=0)


def _rendered_thoughts(api, plan, style: str | None, canvas: np.ndarray) -> list[np.ndarray]:
    """The plan's thoughts rendered in ``style`` (the map's look; None = unknown) given its input map ``canvas``
    (the model-resolution image it planned from) as the reference: MBAQ codes alias the player and the start
    stool, the map tells them apart (``PixelDecoder.cond_map``); empty without a decoder."""
    if not plan.thoughts or api.decoder_path is None:
        return []
    thoughts = torch.stack([t.ids for t in plan.thoughts])  # (T, g*g, G)
    start = api.image_latent(canvas).ids  # (g*g, G): the map's codes, as the planner saw it
    return list(api.render_ids(thoughts, style=style, reference=start))


def run_demo(api, *, per_size: int = 2, out: str | Path = "outputs/demo", seed: int = 0,
             sizes=(3, 4, 5, 6, 7, 8), styles=("gymnasium", "classic")) -> list[dict]:
    """Plan ``per_size`` fresh maps of each size and look, all in one continuously batched call
    (``entry.plan_batch``), then print a row per map and write each plan's GIF."""
    out = Path(out)
    maps = []
    for style in styles:
        for size in sizes:
            rng = np.random.default_rng([DEMO_NAMESPACE, seed, size])
            for i in range(per_size):
                m = fl.generate_map(size, rng)
                maps.append((style, size, i, m, fl.render_canvas(m, m.player, style, canvas=api.canvas)))
    t0 = time.perf_counter()
    plans = entry.plan_batch(api, [canvas for *_, canvas in maps], seed=seed)
    seconds = time.perf_counter() - t0
    print(f"{'style':10s} {'size':>4s} {'map':>3s}  {'plan':24s} {'optimal':>7s} {'back':>4s} {'looks':>5s} "
          f"{'gym':>4s} {'strict':>6s}  gif")
    rows = []
    for (style, size, i, m, canvas), plan in zip(maps, plans):
        gym = fl.simulate(m, plan.actions, "gym").success
        strict = fl.simulate(m, plan.actions, "strict").success
        gif = out / f"{style}_{size}x{size}_{i}.gif"
        write_gif(gif, m, style, plan.actions, _rendered_thoughts(api, plan, style, canvas))
        looks = look_checks(m, plan)
        rows.append({"style": style, "size": size, "actions": plan.actions, "gym": gym, "strict": strict,
                     "seconds": seconds / len(maps), "taken_back": len(plan.retracted), "looks": len(looks),
                     "looks_right": sum(looks)})
        print(f"{style:10s} {size:4d} {i:3d}  {' '.join(plan.actions)[:24]:24s} "
              f"{len(fl.shortest_plan(m)):7d} {len(plan.retracted):4d} {_fraction(sum(looks), len(looks)):>5s} "
              f"{'yes' if gym else 'no':>4s} {'yes' if strict else 'no':>6s}  {gif}")
    n = len(rows)
    print(f"\nsolved {sum(r['strict'] for r in rows)}/{n} (strict), {sum(r['gym'] for r in rows)}/{n} (gym); "
          f"{sum(r['taken_back'] for r in rows)} moves taken back (\"back\": the thought showed a fall); "
          f"{_fraction(sum(r['looks_right'] for r in rows), sum(r['looks'] for r in rows))} looks right; "
          f"planned together in {seconds:.1f} s ({seconds / max(1, n):.2f} s per plan, continuous batching); "
          f"GIFs in {out}/")
    return rows


def _fraction(right: int, total: int) -> str:
    """"right/total" for looks, "-" for a model that never looks."""
    return f"{right}/{total}" if total else "-"


def plan_image(api, image_path: str, *, max_steps: int | None = None, seed: int = 0, gif: str | None = None) -> str:
    """Plan a user's map image; the map read from the pixels (oracle) is used to check and animate the plan."""
    canvas = entry.board_canvas(api, image_path, "image")
    full = read_image(image_path, "image")
    state = fl.read_map(full)
    if state.player is None or state.goal is None:
        n = full.shape[0] // fl.ENV_CELL_PX
        raise ValueError(f"image: {str(image_path)!r} is not a FrozenLake map of 3..8 cells at 64 px per cell (read "
                         f"as {n}x{n}, it shows no single player and goal; a 9x9 or larger map renders at 512 px "
                         f"and is outside VSP's sizes)")
    size = full.shape[0] // fl.ENV_CELL_PX
    m = fl.LakeMap(size, state.holes, state.player, state.goal)
    plan = entry.plan(api, canvas, max_steps=max_steps, seed=seed)
    gym, strict = fl.simulate(m, plan.actions, "gym"), fl.simulate(m, plan.actions, "strict")
    if gif:
        write_gif(gif, m, state.style, plan.actions,
                  _rendered_thoughts(api, plan, state.style, canvas))  # the look read, the map seen
    verdict = "reaches the goal" if strict.success else f"fails ({strict.reason})"
    back = "".join(f"\ntook back {a} after {k} moves: its thought showed a fall" for k, a, _ in plan.retracted)
    looks = "".join(f"\nbefore {a}: looked around the player (left below right above): {look}"
                    for a, look in zip(plan.actions, plan.looks) if look is not None)
    return (f"plan: {' '.join(plan.actions) or '(none)'}{looks}{back}\n{len(plan.thoughts)} visual thoughts; "
            f"under the strict rule the plan {verdict}; gym rule: {'success' if gym.success else 'failure'}"
            + (f"\nGIF written to {gif}" if gif else ""))
