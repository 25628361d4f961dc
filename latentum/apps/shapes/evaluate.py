"""``latentum eval shapes``: the generation half of the unified model, measured on fresh seeds (issue #28).

- **text-to-image** per GenEval category: prompts from ``shapes.sample_prompt`` (the world's phrasing), and the
  same prompts in GenEval's template ("a photo of ..."), generated as latents with classifier-free guidance,
  rendered by the pixel decoder, scored by the exact oracle. A prompt with words outside the vocabulary is
  refused by the API and counted as a failure (and reported). ``t2i_reason``: the same prompts, each image drawn
  after a plan the model writes first (R3's reason step, ``shapes_t2i_reason``), by interleaved generation.
- **reconstruction**: a real scene -> encoder -> MBAQ codes -> pixel decoder -> oracle; the real picture at the
  decoder's resolution is the control.
- **understanding**: Shapes QA (count, colour, relation, match) on real images, answered greedily; a worked-out
  reply (``shapes_qa_steps``: the description, then the answer) is scored by its final answer.
- **codebook usage** on fresh images of both worlds: codes used, perplexity and dead codes (never used) per
  codebook, counted from the codes themselves.
- **read back**: count and colour questions about the model's own generated latents (no pixels in the loop),
  answered through the understanding branch, against the oracle's parse of the same latents rendered.
- **self-judged** (models trained to reflect, ``latentum.data.refine``): at equal compute, plain sampling, best-of-k
  where the model's own reading picks, and refine (reason, reflect, refine) after each round, per category.

Prompts and scenes come from their own seed namespace, disjoint from the training streams.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from latentum.api import LatentUM
from latentum.data.refine import words as refine_words
from latentum.data.sample import final_answer
from latentum.types import Judged, LatentImage
from latentum.worlds import shapes
from latentum.worlds.registry import make_sample

EVAL_NAMESPACE = 90_210_778
GENEVAL_TEMPLATE = shapes.GENEVAL_TEMPLATE
ANSWER_TOKENS = 64
"""Room for a worked-out answer: the description of five objects, then the answer (and for a plan, which is such
a description, then ``<img>``)."""


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([EVAL_NAMESPACE, seed, *keys])


def _at(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


def _for_oracle(image) -> np.ndarray:
    """An image as the oracle reads it: below its smallest canvas, enlarged (nearest) to that size."""
    image = np.asarray(image)
    return image if image.shape[0] >= shapes.MIN_CANVAS else np.asarray(
        Image.fromarray(image).resize((shapes.MIN_CANVAS,) * 2, Image.NEAREST))


def _reasoned(api: LatentUM, texts: list[str], seed: int) -> list[LatentImage | None]:
    """Each prompt's first image after the plan the model writes for it (R3's reason step); None: it drew none.
    Interleaved sampling at its defaults, unguided (the plan, not a dropped prompt, is what the image follows)."""
    rows = api.generate([[t] for t in texts], max_images=1, max_new_tokens=ANSWER_TOKENS, seed=seed)
    return [next((x for x in row if isinstance(x, LatentImage)), None) for row in rows]


def text_to_image(api: LatentUM, per_category: int, seed: int, cfg_scale: float, template: str | None,
                  reason: bool = False) -> dict:
    """Oracle pass rate per category (and overall) of generated-then-rendered images; ``reason``: each image
    drawn after a written plan (``_reasoned``; a prompt that gets no image fails)."""
    out, refused = {}, []
    for k, category in enumerate(shapes.CATEGORIES):
        rng = _rng(seed, 1, k)
        specs = [shapes.sample_prompt(rng, category) for _ in range(per_category)]
        texts = [template.format(s.text) if template else s.text for s in specs]
        unknown = {w for t in texts for w in api.tokenizer.unknown_words(t)}
        if unknown:
            refused.extend(sorted(unknown))
            out[category] = 0.0
            continue
        latents = _reasoned(api, texts, seed) if reason else api.generate_images(texts, cfg_scale=cfg_scale, seed=seed)
        drawn = [x for x in latents if x is not None]
        images = iter(api.render(drawn, seed=seed) if drawn else [])
        passed = [x is not None and shapes.oracle(_for_oracle(next(images)), s) for x, s in zip(latents, specs)]
        out[category] = float(np.mean(passed))
    out["overall"] = float(np.mean([out[c] for c in shapes.CATEGORIES]))
    if refused:
        out["refused_words"] = sorted(set(refused))
    return out


def reconstruction(api: LatentUM, per_category: int, seed: int) -> dict:
    """Oracle pass rate of real scenes rendered back from their own codes, per category and overall
    (``decoded``), and of the real pictures."""
    side = api.decoder.cfg.resolution
    out, real = {}, []
    for k, category in enumerate(shapes.CATEGORIES):
        rng = _rng(seed, 2, k)
        specs = [shapes.sample_prompt(rng, category) for _ in range(per_category)]
        pictures = [shapes.render(shapes.scene_for(s, rng), api.canvas) for s in specs]
        latents = [api.image_latent(p) for p in pictures]
        renders = api.render(latents, seed=seed)
        out[category] = float(np.mean([shapes.oracle(_for_oracle(im), s) for im, s in zip(renders, specs)]))
        real += [shapes.oracle(_for_oracle(_at(p, side)), s) for p, s in zip(pictures, specs)]
    return {"decoded": float(np.mean([out[c] for c in shapes.CATEGORIES])), **out,
            "real_at_decoder_resolution": float(np.mean(real))}


def answers(api: LatentUM, images: list, questions: list[str]) -> list[str]:
    """The model's greedy answers, each its final answer (the words after its last comma), normalised: a direct
    answer ("two") and a worked-out one ("a red circle at row 2 column 5 , ... , two") score alike."""
    said = api.answer_batch(images, questions, max_new_tokens=ANSWER_TOKENS)
    return [final_answer(api.tokenizer.normalize(a)) for a in said]


def understanding(api: LatentUM, per_type: int, seed: int) -> dict:
    """Exact-answer accuracy per QA type on real Shapes images."""
    out = {}
    for k, qtype in enumerate(shapes.QA_TYPES):
        rng = _rng(seed, 3, k)
        samples = [shapes.qa_sample(rng, api.canvas, qtype) for _ in range(per_type)]
        said = answers(api, [s.user[0] for s in samples], [s.user[1] for s in samples])
        norm = api.tokenizer.normalize
        out[qtype] = float(np.mean([a == norm(s.meta["answer"]) for a, s in zip(said, samples)]))
    return out


@torch.inference_mode()
def codebook_usage(api: LatentUM, images: int, seed: int) -> dict:
    """Per codebook: codes used at least once, perplexity of the code frequencies, dead codes (never used), over
    the tokens of ``images`` fresh images, half Shapes scenes, half FrozenLake boards."""
    rng = _rng(seed, 4)
    pictures = [shapes.render(shapes.scene_for(shapes.sample_prompt(rng), rng), api.canvas) for _ in range(images // 2)]
    for _ in range(images - len(pictures)):
        s = make_sample("vsp_plan", rng, canvas=api.canvas)
        pictures.append(next(x for x in s.user if isinstance(x, np.ndarray)))
    ids = api.model.image_ids(np.stack(pictures))  # (I, C, G)
    K = api.config.quantizer.codebook_size
    out = {}
    for g in range(ids.size(-1)):
        counts = torch.bincount(ids[..., g].reshape(-1), minlength=K).float()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        used = int((counts > 0).sum())
        out[f"cb{g}"] = {"used": used, "of": K, "dead": K - used, "perplexity": perplexity}
    return out


def _specs(seed: int, key: int, k: int, n: int) -> list:
    rng = _rng(seed, key, k)
    return [shapes.sample_prompt(rng, shapes.CATEGORIES[k]) for _ in range(n)]


def _passes(api: LatentUM, latents: list[LatentImage], specs: list, seed: int) -> list[bool]:
    return [shapes.oracle(_for_oracle(im), s) for im, s in zip(api.render(latents, seed=seed), specs)]


def read_back(api: LatentUM, per_category: int, seed: int, cfg_scale: float) -> dict:
    """Agreement of the model's answers about its own generated latents with the oracle's parse of them rendered:
    the count of each shape, and the colour of each shape the parse finds exactly once."""
    counts, colours = [], []
    for k in range(len(shapes.CATEGORIES)):
        specs = _specs(seed, 5, k, per_category)
        latents = api.generate_images([s.text for s in specs], cfg_scale=cfg_scale, seed=seed)
        images, questions, truths = [], [], []
        for latent, im in zip(latents, api.render(latents, seed=seed)):
            found = shapes.parse(_for_oracle(im))
            for shape in shapes.SHAPES:
                n = sum(d.shape == shape for d in found)
                images.append(latent)
                questions.append(f"How many {shapes.PLURALS[shape]} are there ?")
                truths.append(("count", shapes.NUMBERS[min(n, 5)]))
                if n == 1:
                    images.append(latent)
                    questions.append(f"What colour is the {shape} ?")
                    truths.append(("color", next(d.color for d in found if d.shape == shape)))
        for a, (kind, t) in zip(answers(api, images, questions), truths):
            (counts if kind == "count" else colours).append(a == t)
    return {"count": float(np.mean(counts)), "color": float(np.mean(colours)) if colours else float("nan"),
            "questions": len(counts) + len(colours)}


def self_judged(api: LatentUM, per_category: int, seed: int, cfg_scale: float, rounds: int = 3) -> dict:
    """Oracle pass rate per category of plain sampling, of best-of-(rounds + 1) picked by the model's own reading,
    and of refine after each round (the round the model judges best so far), at most rounds + 1 images each."""
    out = {"plain": {}, "best_of": {}, **{f"refine_{r}": {} for r in range(rounds + 1)}, "refine_images": {}}
    for k, category in enumerate(shapes.CATEGORIES):
        specs = _specs(seed, 6, k, per_category)
        texts = [s.text for s in specs]
        plain = api.generate_images(texts, cfg_scale=cfg_scale, seed=seed)
        out["plain"][category] = float(np.mean(_passes(api, plain, specs, seed)))
        best = api.best_of(texts, k=rounds + 1, cfg_scale=cfg_scale, seed=seed)
        out["best_of"][category] = float(np.mean(_passes(api, [j.image for j in best], specs, seed)))
        refined = api.refine(texts, rounds=rounds, cfg_scale=cfg_scale, seed=seed)
        for r in range(rounds + 1):
            upto = [Judged(j.prompt, j.images[:r + 1], j.scores[:r + 1], j.reflections[:r + 1]) for j in refined]
            out[f"refine_{r}"][category] = float(np.mean(_passes(api, [j.image for j in upto], specs, seed)))
        out["refine_images"][category] = float(np.mean([len(j.images) for j in refined]))
    for row in out.values():
        row["overall"] = float(np.mean([row[c] for c in shapes.CATEGORIES]))
    return out


PARTS = ("t2i", "t2i_geneval", "t2i_reason", "reconstruction", "understanding", "read_back", "codebook_usage",
         "self_judged")


def evaluate_shapes(api: LatentUM, *, per_category: int = 30, per_type: int = 30, seed: int = 0,
                    cfg_scale: float = 3.0, usage_images: int = 64, progress: bool = True,
                    only: list[str] | None = None) -> dict:
    """Every part of the report (``PARTS``), or ``only`` those named; ``self_judged`` only for a model trained to
    reflect."""
    bad = sorted(set(only or ()) - set(PARTS))
    if bad:
        raise ValueError(f"only: unknown part(s) {bad}; expected some of {list(PARTS)}")
    parts = {"t2i": lambda: text_to_image(api, per_category, seed, cfg_scale, None),
             "t2i_geneval": lambda: text_to_image(api, per_category, seed, cfg_scale, GENEVAL_TEMPLATE),
             "t2i_reason": lambda: text_to_image(api, per_category, seed, cfg_scale, None, reason=True),
             "reconstruction": lambda: reconstruction(api, per_category, seed),
             "understanding": lambda: understanding(api, per_type, seed),
             "read_back": lambda: read_back(api, per_category, seed, cfg_scale),
             "codebook_usage": lambda: codebook_usage(api, usage_images, seed)}
    if not any(api.tokenizer.unknown_words(w) for w in refine_words()):  # a model trained to reflect
        parts["self_judged"] = lambda: self_judged(api, per_category, seed, cfg_scale)
    chosen = [(name, run) for name, run in parts.items() if only is None or name in only]
    report = {"per_category": per_category, "per_type": per_type, "seed": seed, "cfg_scale": cfg_scale}
    for name, run in tqdm(chosen, desc="eval shapes", disable=not progress):
        report[name] = run()
    return report


def _row(row: dict) -> str:
    return "  ".join(f"{c} {row[c]:.2f}" for c in shapes.CATEGORIES)


def print_report(report: dict) -> None:
    """The parts the report holds, one line (or a few) each."""
    for name in ("t2i", "t2i_geneval", "t2i_reason"):
        if name in report:
            r = report[name]
            extra = f"  (refused, unknown words: {', '.join(r['refused_words'])})" if "refused_words" in r else ""
            print(f"{name:12s} overall {r['overall']:.3f}  {_row(r)}{extra}")
    if "reconstruction" in report:
        rec = report["reconstruction"]
        print(f"reconstruction: decoded {rec['decoded']:.3f}  {_row(rec)}  (real pictures at the decoder's "
              f"resolution {rec['real_at_decoder_resolution']:.3f})")
    if "understanding" in report:
        print("understanding: " + "  ".join(f"{k} {v:.2f}" for k, v in report["understanding"].items()))
    if "read_back" in report:
        rb = report["read_back"]
        print(f"read back from its own latents: count {rb['count']:.2f}  colour {rb['color']:.2f}  "
              f"({rb['questions']} questions)")
    if "self_judged" in report:
        judged = report["self_judged"]
        for name, row in judged.items():
            if name != "refine_images":
                print(f"{name:12s} overall {row['overall']:.3f}  {_row(row)}")
        print("refine, images per prompt: " + "  ".join(f"{c} {v:.2f}" for c, v in judged["refine_images"].items()))
    if "codebook_usage" in report:
        print("codebook usage: " + "  ".join(f"{g}: {u['used']}/{u['of']} used, perplexity {u['perplexity']:.1f}, "
                                             f"{u['dead']} dead" for g, u in report["codebook_usage"].items()))
