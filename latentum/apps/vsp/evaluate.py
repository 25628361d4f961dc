"""``latentum eval vsp``: planning and perception on fresh FrozenLake maps, with baselines side by side.

Evaluation maps come from their own seed namespace (``EVAL_NAMESPACE``), disjoint from the training streams,
which seed with ``[cfg.seed, rank, worker, restart]``. Small maps can still coincide with training maps by
chance (a 3x3 board has few configurations); the report counts how many evaluation maps repeat within it.

Metrics per style and level:
- success under the **gym** rule (VSP's scorer) and the **strict** rule (ThinkMorph's);
- perception QA (hole / relation / text grid) and action-sequence safety accuracy, safety both answered directly
  and with visual thoughts (``vsp_safety_imagined``: ``entry.imagine`` follows the moves); also ``vsp_describe``, the
  share of maps the model transcribes exactly as a text grid, and ``vsp_neighbours`` (what is next to the
  player), when the model's vocabulary has its words (both reported, not part of ``perception``); and, as a
  diagnostic, the hole and grid questions answered from the model's own transcription of the map
  (``*_transcribed``, ``perception_transcribed``: a fixed rule reads the answer off the grid it wrote); the grid
  question is also scored in the cloze form (``vsp_grid_scored``: the option the model finds most likely as the
  map's text grid, ``LatentUM.score_options``; ``perception_scored`` counts it in place of the letter);
- visual-thought fidelity: the share of thoughts equal to the simulated next state, judged by the pixel oracle
  on the rendered thought (full board), by the model reading the latent back ("Where is the player ?"), and
  in latent space (every token's codes equal those of the true next board, encoded; ``fidelity_latent``);
- with ``oracle``: success when every thought is replaced by the true next board (encoded), which separates
  the thoughts' errors from the choice of moves;
- seconds per plan: the median over batch-1 plans of a subset, i.e. latency, not throughput.

``heed_looks`` (default, as in ``entry.plan``) holds every planner to its own looks (``apps.vsp.planner``):
the same rule for the latent, text-only and pixel-mediated planners; off, they are scored on free choices.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from latentum.api import LatentUM
from latentum.apps.vsp import entry, planner
from latentum.data.canvas import active_index
from latentum.data.sample import final_answer
from latentum.generation.interleaved import answer_latents
from latentum.types import GREEDY
from latentum.worlds import frozenlake as fl
from latentum.worlds.frozenlake import tasks as vsp
from latentum.worlds.registry import make_sample

EVAL_NAMESPACE = 90_210_777
QA_TASKS = ("vsp_hole", "vsp_relation", "vsp_grid")
PLANNERS = ("latent", "text", "pixel", "oracle")
"""latent thoughts; text only (baseline a); pixel-mediated thoughts (baseline b); oracle thoughts (diagnostic)."""


def eval_maps(level: int, n: int, seed: int = 0) -> list[fl.LakeMap]:
    rng = np.random.default_rng([EVAL_NAMESPACE, seed, level])
    return [fl.generate_map(level, rng) for _ in range(n)]


def plan_metrics(maps, plans) -> dict[str, float]:
    gym = [fl.simulate(m, p.actions, rule="gym").success for m, p in zip(maps, plans)]
    strict = [fl.simulate(m, p.actions, rule="strict").success for m, p in zip(maps, plans)]
    return {"gym": float(np.mean(gym)), "strict": float(np.mean(strict))}


def takeback_metrics(maps, plans) -> dict[str, float]:
    """Moves taken back per plan, and the share of them that really entered a hole (the model's own check)."""
    real = []
    for m, p in zip(maps, plans):
        for k, a, _ in p.retracted:
            pos = m.player
            for b in p.actions[:k]:
                pos = fl.move(m, pos, b)
            real.append(fl.move(m, pos, a) in m.holes)
    return {"takebacks": float(np.mean([len(p.retracted) for p in plans])),
            "takeback_hole": float(np.mean(real)) if real else float("nan")}


def look_checks(m: fl.LakeMap, plan) -> list[bool]:
    """One bool per look of ``plan``: does it name the true cells around the player (at the cell its kept moves
    really reached)? Empty for models that do not look (``vsp_plan_look``)."""
    checks, pos = [], m.player
    for a, look in zip(plan.actions, plan.looks):
        if look is not None:
            checks.append(look == vsp.neighbour_words(m, pos))
        pos = fl.move(m, pos, a)
    return checks


def look_metrics(maps, plans) -> dict[str, float]:
    """``look_exact``: the share of all looks that name the true cells around the player. Empty without looks."""
    exact = [ok for m, p in zip(maps, plans) for ok in look_checks(m, p)]
    return {"look_exact": float(np.mean(exact))} if exact else {}


def thought_fidelity(api, maps, plans, style: str, pixel_oracle: bool) -> dict[str, float]:
    """Compare each thought with the simulated board after that move (pixel oracle and model reading); the
    pixel oracle judges thoughts rendered in the eval's ``style``, each given its plan's input map (encoded as
    the planner saw it) as the reference: MBAQ codes alias the player and the start stool, the map tells them
    apart (``PixelDecoder.cond_map``)."""

    ids, truth, questions, answers = [], [], [], []
    for m, p in zip(maps, plans):
        pos = m.player
        for a, t in zip(p.actions, p.thoughts):
            pos = fl.move(m, pos, a)
            ids.append(t.ids)
            truth.append((m, pos, a))
            questions.append(vsp.PLAYER_Q)
            answers.append(vsp.PLAYER_A.format(row=pos[0] + 1, col=pos[1] + 1))
            if pos in m.holes or pos == m.goal:
                break
    if not ids:
        return {"fidelity_read": float("nan"), "fidelity_latent": float("nan"), "fidelity_pixel": float("nan"),
                "thoughts": 0}
    read = answer_latents(api.model, api.tokenizer, torch.stack(ids), questions)
    out = {"fidelity_read": float(np.mean([r == a for r, a in zip(read, answers)])),
           "fidelity_latent": latent_match(api, ids, truth, style), "thoughts": len(ids)}
    if pixel_oracle and api.decoder_path is not None:
        out["fidelity_pixel"] = float(np.mean(drawn_right(api, torch.stack(ids), truth, style)))
    return out


def drawn_right(api, ids: torch.Tensor, truth: list, style: str) -> list[bool]:
    """Render thoughts ``ids`` (B, N, G) in ``style``, each with its plan's input map (encoded as the planner saw
    it) as the reference, and ask the pixel oracle whether each shows its true board ``truth`` = [(map, player
    cell, last move)]."""
    ok = []
    for i in range(0, len(truth), 64):
        chunk = truth[i:i + 64]
        start = true_board_ids(api, [(m, m.player, None) for m, _, _ in chunk], style)  # the input maps' codes
        pixels = api.render_ids(ids[i:i + 64], style=style, reference=start)  # in the oracle's look
        ok += [fl.read_canvas(img, m.size, style) == fl.state_of(m, pos, style)
               for img, (m, pos, _) in zip(pixels, chunk)]
    return ok


def true_board_ids(api, truth: list, style: str) -> torch.Tensor:
    """Codes (B, N, G) of the true boards ``truth`` = [(map, player cell, last move)], maps of one size:
    rendered as the thoughts' targets are, then encoded."""
    index = torch.tensor(active_index(truth[0][0].size, api.config.encoder.grid), device=api.model.device)
    boards = np.stack([fl.render_canvas(m, pos, style, a, canvas=api.canvas) for m, pos, a in truth])
    return api.model.image_ids(boards)[:, index].cpu()


def latent_match(api, ids: list[torch.Tensor], truth: list, style: str) -> float:
    """Share of thoughts whose codes all equal the codes of the true next board (rendered, then encoded)."""
    ok = []
    for i in range(0, len(ids), 64):
        true = true_board_ids(api, truth[i:i + 64], style)
        ok += (torch.stack(ids[i:i + 64]).cpu() == true).flatten(1).all(1).tolist()
    return float(np.mean(ok))


def oracle_plans(api, maps, style: str, heed_looks: bool = True, avoid_revisits: bool = False) -> list:
    """Plans whose thoughts are the true next boards (rendered, encoded) instead of generated ones: the
    success the planner's move choice reaches when every visual thought is right (a diagnostic, not a planner)."""

    def oracle(rows: list[int], actions: list[list[str]]) -> torch.Tensor:
        truth = []
        for i, done in zip(rows, actions):
            pos = maps[i].player
            for a in done:
                pos = fl.move(maps[i], pos, a)
            truth.append((maps[i], pos, done[-1]))
        return true_board_ids(api, truth, style)

    canvases = [fl.render_canvas(m, m.player, style, canvas=api.canvas) for m in maps]
    return planner.plan_rows(api, canvases, None, GREEDY, None, thoughts="latent", oracle=oracle, heed_looks=heed_looks,
                     avoid_revisits=avoid_revisits)


def extra_qa_tasks(tok) -> tuple[str, ...]:
    """``vsp_neighbours`` if the tokenizer knows its words (models trained before the task existed do not)."""
    words = (vsp.NEIGHBOURS_Q + " " + vsp.EDGE).split()
    return ("vsp_neighbours",) if all(tok.token_to_id(w) is not None for w in words) else ()


def qa_metrics(api, level: int, style: str, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([EVAL_NAMESPACE, seed, level, 1])
    out = {}
    for task in QA_TASKS + ("vsp_safety", "vsp_describe") + extra_qa_tasks(api.tokenizer):
        samples = [make_sample(task, rng, map_sizes=[level], canvas=api.canvas, style=style) for _ in range(n)]
        images = [s.user[0] for s in samples]
        questions = [s.user[1] for s in samples]
        longest = max(len(api.tokenizer.encode(s.assistant[0])) for s in samples)
        pred = api.answer_batch(images, questions, max_new_tokens=max(20, longest + 2))  # room for worked steps
        gold = [api.tokenizer.normalize(s.assistant[0]) for s in samples]
        if task == "vsp_relation":  # answered directly or worked out ("player row ... , Above Left")
            pred = [final_answer(p) for p in pred]
        out[task] = float(np.mean([p == g for p, g in zip(pred, gold)]))
        if task == "vsp_safety":
            out["vsp_safety_imagined"] = imagined_safety(api, samples)
        if task in ("vsp_hole", "vsp_grid"):
            out[f"{task}_transcribed"] = transcribed_answers(api, samples)
        if task == "vsp_grid":
            out["vsp_grid_scored"] = scored_grids(api, samples)
    out["perception"] = float(np.mean([out[t] for t in QA_TASKS]))
    out["perception_scored"] = float(np.mean([out["vsp_hole"], out["vsp_relation"], out["vsp_grid_scored"]]))
    out["perception_transcribed"] = float(np.mean([out["vsp_hole_transcribed"], out["vsp_relation"],
                                                   out["vsp_grid_transcribed"]]))
    return out


def transcribed_answers(api, samples) -> float:
    """Hole (T1) or grid (T3) questions answered from the model's own transcription of the map (``DESCRIBE_Q``,
    "S F H / F F G / ..."): the letter at the asked cell is H, or the option equal to the transcript. A
    diagnostic of what the model perceives, not the model answering the question: a fixed rule reads the
    answer off what it wrote, as ``imagined_safety`` reads it off its looks."""
    images = [s.user[0] for s in samples]
    longest = max(len(s.meta["map"].text_grid().split()) for s in samples)
    grids = api.answer_batch(images, [vsp.DESCRIBE_Q] * len(samples), max_new_tokens=longest + 2)
    return float(np.mean([read_answer(s, g) == s.meta["answer"] for s, g in zip(samples, grids)]))


def scored_grids(api, samples) -> float:
    """Grid (T3) questions in the cloze form: the option whose text grid the model finds most likely as its
    answer to ``DESCRIBE_Q`` (each option's words and <eos>, teacher-forced), as lm-eval-harness and OLMES
    score multiple choice for models too small to answer by letter. The model's likelihoods choose; no rule
    reads its text."""
    options = [list(s.meta["options"].items()) for s in samples]
    scores = api.score_options_batch([s.user[0] for s in samples], [vsp.DESCRIBE_Q] * len(samples),
                                     [[grid for _, grid in o] for o in options])
    said = [o[int(np.argmax(sc))][0] for o, sc in zip(options, scores)]
    return float(np.mean([a == s.meta["answer"] for a, s in zip(said, samples)]))


def read_answer(sample, grid: str) -> str:
    """The answer to ``sample``'s hole or grid question that the text grid ``grid`` gives ("" if it cannot)."""
    if sample.task == "vsp_grid":
        return next((k for k, v in sample.meta["options"].items() if v == grid), "")
    rows = [row.split() for row in grid.split("/")]
    r, c = sample.meta["cell"]
    if r >= len(rows) or c >= len(rows[r]):
        return ""
    return vsp.YES if rows[r][c] == "H" else vsp.NO


def imagined_safety(api, samples) -> float:
    """Safety (T4) answered with visual thoughts: the model follows the sequence (``entry.imagine``), looking
    before each move and imagining the board after it; "No" iff a move enters a cell its own look named a hole."""

    plans = entry.imagine_batch(api, [s.user[0] for s in samples], [s.meta["actions"] for s in samples])
    said = [vsp.YES if planner.falls_at(p) is None else vsp.NO for p in plans]
    return float(np.mean([a == s.meta["answer"] for a, s in zip(said, samples)]))


def latency(api, canvases, thoughts: str, n: int, **rules) -> dict[str, float]:
    """Batch-1 wall time on the first ``n`` maps: median seconds per plan and per move."""
    per_plan, per_step = [], []
    for c in canvases[:n]:
        t0 = time.perf_counter()
        plan = entry.plan_batch(api, [c], thoughts=thoughts, **rules)[0]
        dt = time.perf_counter() - t0
        per_plan.append(dt)
        per_step.append(dt / max(1, len(plan.actions)))
    if not per_plan:
        return {"sec_per_plan": float("nan"), "sec_per_step": float("nan")}
    return {"sec_per_plan": statistics.median(per_plan), "sec_per_step": statistics.median(per_step)}


def evaluate_vsp(api, *, levels=(3, 4, 5, 6, 7, 8), styles=("gymnasium", "classic"), per_level: int = 100,
                 seed: int = 0, text_model: str | None = None, pixel: bool = False,
                 latency_maps: int = 5, oracle: bool = False, heed_looks: bool = True,
                 avoid_revisits: bool = False) -> dict:

    text_api = LatentUM.from_pretrained(text_model) if text_model else None
    rules = {"heed_looks": heed_looks, "avoid_revisits": avoid_revisits}  # every planner plays by the same rules
    rows = []
    for style in styles:
        for level in tqdm(levels, desc=f"eval vsp ({style})"):
            maps = eval_maps(level, per_level, seed)
            canvases = [fl.render_canvas(m, m.player, style, canvas=api.canvas) for m in maps]
            row = {"style": style, "level": level, "maps": len(maps),
                   "distinct_maps": len({(m.holes, m.player, m.goal) for m in maps})}
            plans = entry.plan_batch(api, canvases, thoughts="latent", **rules)
            row["latent"] = {**plan_metrics(maps, plans), **takeback_metrics(maps, plans), **look_metrics(maps, plans),
                             **thought_fidelity(api, maps, plans, style, True),
                             **latency(api, canvases, "latent", latency_maps, **rules),
                             "steps": float(np.mean([len(p.actions) for p in plans]))}
            row["qa"] = qa_metrics(api, level, style, per_level, seed)
            if text_api is not None:
                tplans = entry.plan_batch(text_api, canvases, thoughts="none", **rules)
                row["text"] = {**plan_metrics(maps, tplans), **look_metrics(maps, tplans),
                               **latency(text_api, canvases, "none", latency_maps, **rules),
                               "steps": float(np.mean([len(p.actions) for p in tplans]))}
            if pixel:
                pplans = entry.plan_batch(api, canvases, thoughts="pixel", **rules)
                row["pixel"] = {**plan_metrics(maps, pplans), **takeback_metrics(maps, pplans),
                                **look_metrics(maps, pplans),
                                **latency(api, canvases, "pixel", latency_maps, **rules),
                                "steps": float(np.mean([len(p.actions) for p in pplans]))}
            if oracle:
                oplans = oracle_plans(api, maps, style, **rules)
                row["oracle"] = {**plan_metrics(maps, oplans), "sec_per_plan": float("nan"),
                                 "sec_per_step": float("nan"),
                                 "steps": float(np.mean([len(p.actions) for p in oplans]))}
            rows.append(row)
    return {"rows": rows, "summary": summarize(rows), **rules}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for style in sorted({r["style"] for r in rows}):
        sub = [r for r in rows if r["style"] == style]
        s = {}
        for kind in PLANNERS:
            if kind in sub[0]:
                s[kind] = {k: float(np.mean([r[kind][k] for r in sub]))
                              for k in ("gym", "strict", "sec_per_plan", "sec_per_step", "steps")}
                s[kind]["min_strict"] = float(min(r[kind]["strict"] for r in sub))
        for kind in ("latent", "pixel", "text"):
            for k in ("fidelity_read", "fidelity_latent", "fidelity_pixel", "takebacks", "takeback_hole",
                      "look_exact"):
                if kind in sub[0] and any(k in r[kind] for r in sub):
                    s[kind][k] = float(np.nanmean([r[kind].get(k, np.nan) for r in sub]))
        s["qa"] = {k: float(np.mean([r["qa"][k] for r in sub])) for k in sub[0]["qa"]}
        out[style] = s
    return out


def print_report(report: dict) -> None:
    print(format_table(report["rows"]))
    if "heed_looks" in report:
        print(f"\nplanners held to their own looks (heed_looks): {'yes' if report['heed_looks'] else 'no'}")
    if "avoid_revisits" in report:
        print(f"planners kept off cells their plan already stood on (avoid_revisits): "
              f"{'yes' if report['avoid_revisits'] else 'no'}")
    for style, s in report["summary"].items():
        print(f"\n[{style}] overall")
        for kind in PLANNERS:
            if kind in s:
                v = s[kind]
                extra = "".join(f" {k}={v[k]:.3f}" for k in ("takebacks", "takeback_hole", "look_exact",
                                                               "fidelity_pixel", "fidelity_read", "fidelity_latent")
                                if k in v)
                print(f"  {kind:6s} gym={v['gym']:.3f} strict={v['strict']:.3f} min_strict={v['min_strict']:.3f}"
                      f" s/plan={v['sec_per_plan']:.3f} s/step={v['sec_per_step']:.3f} steps={v['steps']:.2f}{extra}")
        if "pixel" in s:
            ratio = s["pixel"]["sec_per_step"] / s["latent"]["sec_per_step"]
            print(f"  pixel-mediated thoughts take {ratio:.2f}x the time per move of latent thoughts")
        print("  qa     " + " ".join(f"{k}={v:.3f}" for k, v in s["qa"].items()))


def format_table(rows: list[dict]) -> str:
    head = ("| style | level | latent gym | latent strict | text gym | text strict | pixel gym | pixel strict "
            "| fidelity pixel | fidelity read | fidelity latent | perception | perception (grid scored) | safety "
            "| safety imagined "
            "| s/plan latent | s/plan text | s/plan pixel |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def g(kind, key, r=r):
            return f"{r[kind][key]:.3f}" if kind in r and key in r[kind] else "-"
        lines.append(f"| {r['style']} | {r['level']} | {g('latent', 'gym')} | {g('latent', 'strict')} | "
                     f"{g('text', 'gym')} | {g('text', 'strict')} | {g('pixel', 'gym')} | {g('pixel', 'strict')} | "
                     f"{g('latent', 'fidelity_pixel')} | {g('latent', 'fidelity_read')} | "
                     f"{g('latent', 'fidelity_latent')} | "
                     f"{r['qa']['perception']:.3f} | {r['qa'].get('perception_scored', float('nan')):.3f} | "
                     f"{r['qa']['vsp_safety']:.3f} | "
                     f"{r['qa']['vsp_safety_imagined']:.3f} | {g('latent', 'sec_per_plan')} | "
                     f"{g('text', 'sec_per_plan')} | {g('pixel', 'sec_per_plan')} |")
    return "\n".join(lines)
