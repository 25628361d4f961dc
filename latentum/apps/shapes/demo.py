"""``latentum demo shapes``: one prompt per GenEval category, generated, judged and written as a grid PNG.

Each row: the prompt; the generated image (rendered by the pixel decoder) with the oracle's verdict and what the
model itself reads in its latent (count of the prompt's first shape, through the understanding branch, no pixels);
for a model trained to reflect, the refine rounds side by side with what the model said after each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latentum.api import LatentUM
from latentum.apps.shapes.evaluate import _for_oracle, answers
from latentum.data.refine import words as refine_words
from latentum.worlds import shapes

DEMO_NAMESPACE = 27_182
CELL, TEXT = 128, 34


def _cell(image, lines: list[str]) -> Image.Image:
    out = Image.new("RGB", (CELL, CELL + TEXT), "white")
    out.paste(Image.fromarray(np.asarray(image)).resize((CELL, CELL), Image.NEAREST), (0, TEXT))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines[:3]):
        draw.text((3, 1 + 11 * i), line[:24], fill="black")
    return out


def _reading(api: LatentUM, latents, specs) -> list[str]:
    """What the model reads in each latent: the count of its prompt's first shape."""
    questions = [f"How many {shapes.PLURALS[s.requirements[0].shape]} are there ?" for s in specs]
    return [f"reads: {a} {shapes.PLURALS[s.requirements[0].shape]}"
            for a, s in zip(answers(api, latents, questions), specs)]


def run_shapes_demo(api: LatentUM, out: str | Path = "outputs/demo", seed: int = 0, rounds: int = 3) -> Path:
    """Write ``out/shapes.png`` and print one line per prompt; returns the PNG's path."""
    rng = np.random.default_rng([DEMO_NAMESPACE, seed])
    specs = [shapes.sample_prompt(rng, c) for c in shapes.CATEGORIES]
    texts = [s.text for s in specs]
    latents = api.generate_images(texts, seed=seed)
    images = api.render(latents, seed=seed)
    reads = _reading(api, latents, specs)
    reflects = not any(api.tokenizer.unknown_words(w) for w in refine_words())
    refined = api.refine(texts, rounds=rounds, seed=seed) if reflects else None
    rows = []
    for i, (spec, image, read) in enumerate(zip(specs, images, reads)):
        ok = shapes.oracle(_for_oracle(image), spec)
        cells = [_cell(image, [spec.category, f"oracle: {'pass' if ok else 'fail'}", read])]
        line = f"{spec.text:45s} oracle {'pass' if ok else 'fail'}; {read}"
        if refined is not None:
            j = refined[i]
            for r, (im, said) in enumerate(zip(api.render(j.images, seed=seed), j.reflections)):
                ok_r = shapes.oracle(_for_oracle(im), spec)
                cells.append(_cell(im, [f"refine round {r}{' (pick)' if r == j.best else ''}",
                                        f"oracle: {'pass' if ok_r else 'fail'}", f"says: {said}"]))
            line += f"; refine: {len(j.images) - 1} edits, the pick (round {j.best}) " + (
                "passes" if shapes.oracle(_for_oracle(api.render(j.image, seed=seed)), spec) else "fails")
        print(line)
        rows.append((spec.text, cells))
    width = max(len(c) for _, c in rows) * CELL
    sheet = Image.new("RGB", (width, len(rows) * (CELL + TEXT + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (text, cells) in enumerate(rows):
        y = r * (CELL + TEXT + 14)
        draw.text((3, y + 1), text, fill="black")
        for c, cell in enumerate(cells):
            sheet.paste(cell, (c * CELL, y + 14))
    path = Path(out) / "shapes.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"grid in {path}")
    return path
