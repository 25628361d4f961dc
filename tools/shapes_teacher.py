"""How well does a model read Shapes: QA per type, and its descriptions of fresh scenes object by object?

- ``qa``: ``latentum eval shapes``' understanding (exact answers per QA type on real images).
- ``describe``: the model answers ``shapes.DESCRIBE_QUESTION`` about fresh scenes. Each true object is matched to
  the described object in its cell; the script prints the share of scenes described exactly, with the right
  number of objects, the share of true objects found at their cell, colour and shape accuracy of those found,
  and the shape confusions.

    python tools/shapes_teacher.py runs/shapes_teach/teacher_describe_sample/export
"""

from __future__ import annotations

import argparse
import collections
import re

import numpy as np

from latentum.api import LatentUM
from latentum.apps.shapes.evaluate import EVAL_NAMESPACE, understanding
from latentum.worlds import shapes

OBJECT = re.compile(r"(\w+) (\w+) at row (\d+) column (\d+)")


def described(text: str) -> dict[tuple[int, int], tuple[str, str]]:
    """"a red circle at row 2 column 5 , ..." -> {(2, 5): ("red", "circle"), ...}."""
    return {(int(r), int(c)): (colour, shape) for colour, shape, r, c in OBJECT.findall(text)}


def describe(api: LatentUM, scenes: int, seed: int, batch: int = 50) -> None:
    rng = np.random.default_rng([EVAL_NAMESPACE, seed, 6])
    samples = [shapes.describe_sample(rng, api.canvas) for _ in range(scenes)]
    said = []
    for i in range(0, scenes, batch):
        part = samples[i:i + batch]
        said += api.answer_batch([s.user[0] for s in part], [s.user[1] for s in part], max_new_tokens=64)
    norm = api.tokenizer.normalize
    exact = np.mean([norm(a) == norm(s.assistant[0]) for a, s in zip(said, samples)])
    truths = [described(s.assistant[0]) for s in samples]
    guesses = [described(norm(a)) for a in said]
    count = np.mean([len(t) == len(g) for t, g in zip(truths, guesses)])
    found = colour = shape = total = 0
    confusion = collections.Counter()
    for t, g in zip(truths, guesses):
        for cell, (c, s) in t.items():
            total += 1
            if cell in g:
                found += 1
                colour += g[cell][0] == c
                shape += g[cell][1] == s
                if g[cell][1] != s:
                    confusion[f"{s}->{g[cell][1]}"] += 1
    hit = max(found, 1)
    print(f"describe ({scenes} scenes): exact {exact:.3f}, object count {count:.3f}; objects at their cell "
          f"{found / total:.3f} ({total}), of those colour {colour / hit:.3f}, shape {shape / hit:.3f}")
    print("shape confusions: " + ", ".join(f"{k} {v}" for k, v in confusion.most_common()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--per-type", type=int, default=100, help="QA samples per type")
    p.add_argument("--scenes", type=int, default=200, help="description scenes")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    api = LatentUM.from_pretrained(args.model)
    qa = understanding(api, args.per_type, args.seed)
    print("qa: " + ", ".join(f"{k} {v:.2f}" for k, v in qa.items()))
    describe(api, args.scenes, args.seed)


if __name__ == "__main__":
    main()
