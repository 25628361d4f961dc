"""Infinite, seeded streams of packed batches drawn from the built-in worlds."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentum.config import TrainConfig
from latentum.data.packing import approx_length, pack
from latentum.data.sample import LatentView, Sample
from latentum.data.tokenizer import TextTokenizer
from latentum.data.worlds import TaskMixture


class SampleStream(IterableDataset):
    """Yields batches (lists of Samples) forever. Each (seed, rank, worker, restart) has its own stream, so
    ranks never see the same samples and a resumed run does not replay the data it already trained on."""

    def __init__(self, cfg: TrainConfig, canvas: int, rank: int = 0, restart: int = 0):
        self.cfg, self.canvas, self.rank, self.restart = cfg, canvas, rank, restart
        self.mixture = TaskMixture(cfg.tasks, map_sizes=cfg.map_sizes, canvas=canvas)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker, self.restart])
        B, k = self.cfg.batch_size, max(1, self.cfg.bucket)
        while True:  # draw k batches, batch them by length, yield them in random order
            pool = sorted((self.mixture(rng) for _ in range(B * k)), key=approx_length)
            for i in rng.permutation(k):
                yield pool[i * B:(i + 1) * B], int(rng.integers(2**31))


class PackCollate:
    """Batch of Samples -> Packed, with classifier-free-guidance prompt dropout on text-to-image rows."""

    def __init__(self, tok: TextTokenizer, canvas_grid: int, cfg: TrainConfig, max_gen_images: int = 4):
        self.tok, self.grid, self.cfg, self.max_gen_images = tok, canvas_grid, cfg, max_gen_images

    def __call__(self, item):
        samples, seed = item
        rng = np.random.default_rng(seed)
        drop = [s.task == "shapes_t2i" and rng.random() < self.cfg.cfg_dropout for s in samples]
        if self.cfg.latent_inputs > 0:
            samples = [as_latent_question(s) if rng.random() < self.cfg.latent_inputs else s for s in samples]
        return pack(samples, self.tok, self.grid, max_gen_images=self.max_gen_images, drop_prompt=drop,
                    rng=rng, aia_queries=self.cfg.aia_queries)


def as_latent_question(sample: Sample) -> Sample:
    """A question about an image (no assistant image) with its input images read as latents (``LatentView``);
    other samples unchanged."""
    if any(isinstance(x, np.ndarray) for x in sample.assistant):
        return sample
    user = [x.view(LatentView) if isinstance(x, np.ndarray) else x for x in sample.user]
    return Sample(user, sample.assistant, sample.task, sample.meta)


def packed_loader(cfg: TrainConfig, tok: TextTokenizer, canvas_grid: int, canvas: int, rank: int = 0,
                  restart: int = 0, num_workers: int = 0) -> DataLoader:
    ds = SampleStream(cfg, canvas, rank, restart)
    return DataLoader(ds, batch_size=None, collate_fn=PackCollate(tok, canvas_grid, cfg), num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class ImageStream(IterableDataset):
    """Canvases for the pixel decoder: the images of samples drawn from the stage's task mixture, batched as
    ``(pixels (B, H, W, 3) uint8, styles, references (B, H, W, 3) uint8)``: each image's render style
    (``Sample.meta["style"]``; None for Shapes) and the image it started from. An assistant image's reference is
    its sample's first user image (a plan's input map, the player on the start cell: the decoder tells the player
    from the start stool by it, ``DecoderConfig.reference``); a user image, or one whose sample has no input
    image (Shapes t2i), is its own reference."""

    def __init__(self, cfg: TrainConfig, canvas: int, rank: int = 0, restart: int = 0):
        self.inner = SampleStream(cfg, canvas, rank, restart)
        self.batch_size = cfg.batch_size

    def __iter__(self):
        buf = []
        for samples, _ in self.inner:
            buf += [item for s in samples for item in self.referenced(s)]
            while len(buf) >= self.batch_size:
                chunk, buf = buf[:self.batch_size], buf[self.batch_size:]
                yield (torch.from_numpy(np.stack([im for im, _, _ in chunk])), [style for _, style, _ in chunk],
                       torch.from_numpy(np.stack([ref for _, _, ref in chunk])))

    @staticmethod
    def referenced(sample: Sample) -> list[tuple[np.ndarray, str | None, np.ndarray]]:
        """(image, style, reference) for each image of ``sample``, user images first, as ``Sample.images``."""
        style = sample.meta.get("style")
        user = [x for x in sample.user if isinstance(x, np.ndarray)]
        assistant = [x for x in sample.assistant if isinstance(x, np.ndarray)]
        return [(im, style, im) for im in user] + [(im, style, user[0] if user else im) for im in assistant]
