"""What do a model's codes keep of a Shapes scene, and did another model's quantizer keep FrozenLake's codes?

- ``colour``: a per-patch probe over 1500 fresh scenes (1200 to fit, 300 held out). It predicts each 16 px patch's
  majority colour (background or one of the six) from the patch's G code ids (a lookup of the most common colour
  per id tuple), and linearly from the encoder's features and from MBAQ's latent before quantization. It prints
  the accuracy on all patches and on the patches an object covers.
- ``shape``: each object's shape (circle, square, triangle) read linearly from the 3 x 3 patches around its centre
  patch, from the encoder's features, from MBAQ's latent before quantization and from the codes (one-hot ids):
  where the shape is lost, in the quantizer or after it (the decoder).
- ``--kept OLD``: the share of FrozenLake tokens (1500 images of planning, walks and hole questions) whose ids
  equal those OLD's quantizer gives, and the share moved to a codebook row OLD's FrozenLake images never use; for
  a model grown from OLD by codebooks (``model.grow``), the share whose grown codebooks' ids are all 0.

    python tools/shapes_codes.py checkpoints/tiny
    python tools/shapes_codes.py runs/shapes_teach/shapes_mbaq/export --kept checkpoints/tiny
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from latentum.api import LatentUM
from latentum.worlds import shapes
from latentum.worlds.registry import make_sample

PALETTE = np.array([(255, 255, 255), *shapes.COLORS.values()])


def patch_colours(image: np.ndarray, grid: int) -> np.ndarray:
    """(grid * grid,) majority palette index per patch (0: background)."""
    side = image.shape[0] // grid
    nearest = ((image[:, :, None, :].astype(int) - PALETTE) ** 2).sum(-1).argmin(-1)
    patches = nearest.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    out = []
    for p in patches:
        counts = np.bincount(p, minlength=len(PALETTE))
        out.append(int(counts[1:].argmax() + 1) if counts[1:].sum() else 0)
    return np.array(out)


def lookup_accuracy(keys_fit, y_fit, keys_test, y_test) -> tuple[float, float]:
    table = collections.defaultdict(collections.Counter)
    for k, y in zip(keys_fit, y_fit):
        table[k][y] += 1
    pred = np.array([table[k].most_common(1)[0][0] if k in table else 0 for k in keys_test])
    obj = y_test > 0
    return float((pred == y_test).mean()), float((pred[obj] == y_test[obj]).mean())


@torch.enable_grad()
def linear_accuracy(x_fit, y_fit, x_test, y_test, steps: int = 300, classes: int = len(PALETTE)
                    ) -> tuple[float, float]:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    lin = torch.nn.Linear(x_fit.size(1), classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin((x_fit - mu) / sd), y_fit).backward()
        opt.step()
    pred = lin((x_test - mu) / sd).argmax(-1)
    obj = y_test > 0
    return float((pred == y_test).float().mean()), float((pred[obj] == y_test[obj]).float().mean())


@torch.no_grad()
def colour_probe(api: LatentUM, n: int = 1500, fit: int = 1200, seed: int = 123) -> None:
    rng = np.random.default_rng(seed)
    grid = api.config.encoder.grid
    pics = np.stack([shapes.render(shapes.scene_for(shapes.sample_prompt(rng), rng), api.canvas) for _ in range(n)])
    y = np.stack([patch_colours(p, grid) for p in pics])  # (n, C)
    m = api.model
    feats = torch.cat([m.image_features(pics[i:i + 100]) for i in range(0, n, 100)])  # (n, C, F)
    q = m.quantizer
    z = q.latents(feats)
    ids = q.encode(feats).ids.numpy()  # (n, C, G)
    keys = [tuple(t) for t in ids.reshape(-1, ids.shape[-1])]
    yf = y.reshape(-1)
    cut = fit * y.shape[1]
    acc = lookup_accuracy(keys[:cut], yf[:cut], keys[cut:], yf[cut:])
    print(f"codes    colour: all patches {acc[0]:.3f}, object patches {acc[1]:.3f}")
    yt = torch.tensor(yf)
    for name, x in (("features", feats), ("latent", z)):
        x = x.reshape(-1, x.size(-1)).float()
        acc = linear_accuracy(x[:cut], yt[:cut], x[cut:], yt[cut:])
        print(f"{name:8s} colour: all patches {acc[0]:.3f}, object patches {acc[1]:.3f} (linear)")
    print("codes used: " + ", ".join(f"cb{g} {len(np.unique(ids[..., g]))}" for g in range(ids.shape[-1])))


def around(x: torch.Tensor, cells: list[tuple[int, int, int]], grid: int) -> torch.Tensor:
    """x (n, C, F) per-patch vectors -> (objects, 9 * F): the 3 x 3 patches around each (image, row, col) cell,
    zeros outside the grid."""
    padded = torch.nn.functional.pad(x.view(x.size(0), grid, grid, -1), (0, 0, 1, 1, 1, 1))  # (n, g+2, g+2, F)
    return torch.stack([padded[i, r:r + 3, c:c + 3].reshape(-1) for i, r, c in cells])


@torch.no_grad()
def shape_probe(api: LatentUM, n: int = 1500, fit: int = 1200, seed: int = 321) -> None:
    rng = np.random.default_rng(seed)
    grid = api.config.encoder.grid
    scenes = [shapes.scene_for(shapes.sample_prompt(rng), rng) for _ in range(n)]
    pics = np.stack([shapes.render(s, api.canvas) for s in scenes])
    split = sum(len(s.objects) for s in scenes[:fit])  # objects of the first ``fit`` scenes fit the probe
    cells, labels = [], []
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            cells.append((i, min(int(o.y * grid), grid - 1), min(int(o.x * grid), grid - 1)))
            labels.append(shapes.SHAPES.index(o.shape))
    y = torch.tensor(labels)
    m, q = api.model, api.model.quantizer
    feats = torch.cat([m.image_features(pics[i:i + 100]) for i in range(0, n, 100)])  # (n, C, F)
    ids = q.encode(feats).ids  # (n, C, G)
    onehot = torch.nn.functional.one_hot(ids, q.cfg.codebook_size).flatten(2).float()  # (n, C, G * K)
    for name, x in (("features", feats), ("latent", q.latents(feats)), ("codes", onehot)):
        x = around(x.float(), cells, grid)
        acc = linear_accuracy(x[:split], y[:split], x[split:], y[split:], classes=len(shapes.SHAPES))[0]
        print(f"{name:8s} shape of an object from its 3 x 3 patches: {acc:.3f} (linear, {len(y) - split} held out)")


@torch.no_grad()
def kept(api: LatentUM, old: LatentUM, n: int = 1500, seed: int = 12345) -> None:
    rng = np.random.default_rng(seed)
    images = []
    for task in ("vsp_plan", "vsp_walk_look", "vsp_hole"):
        for _ in range(100):
            images += make_sample(task, rng, canvas=api.canvas).images
    images = np.stack(images[:n])
    a = torch.cat([old.model.image_ids(images[i:i + 100]) for i in range(0, len(images), 100)])
    b = torch.cat([api.model.image_ids(images[i:i + 100]) for i in range(0, len(images), 100)])
    G, K = a.size(-1), old.config.quantizer.codebook_size
    b, extra = b[..., :G], b[..., G:]  # codebooks grown since OLD: their ids should be 0 (the zero code)
    used = torch.zeros(G, K, dtype=torch.bool)
    for g in range(G):
        used[g, a[..., g].unique()] = True
    moved = torch.stack([~used[g][b[..., g]] for g in range(G)], -1).any(-1).float().mean()
    print(f"FrozenLake tokens with the same ids: {(a == b).all(-1).float().mean():.4f}; on a row FrozenLake did not "
          f"use: {moved:.4f} ({len(images)} images)")
    if extra.size(-1):
        zero = (extra == 0).all(-1).float().mean()
        print(f"  and their ids in the {extra.size(-1)} grown codebook(s) all 0: {zero:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--kept", metavar="OLD", help="compare FrozenLake's codes with this model's quantizer")
    args = p.parse_args()
    torch.set_num_threads(2)
    api = LatentUM.from_pretrained(args.model)
    colour_probe(api)
    shape_probe(api)
    if args.kept:
        kept(api, LatentUM.from_pretrained(args.kept))


if __name__ == "__main__":
    main()
