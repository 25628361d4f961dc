"""Infinite, seeded streams of training batches drawn from the built-in worlds.

Every batch is a pure function of (seed, rank, worker, its index), so a leg resumed at step s draws exactly the
batches an uninterrupted run would have drawn from step s on (``start``), and ranks never share samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentum.data.hf_tokenizer import AnyTokenizer
from latentum.data.packing import approx_length, pack
from latentum.data.sample import LatentView, Sample
from latentum.train.config import PackedStageConfig, StageConfig
from latentum.worlds.registry import TaskMixture


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _local_start(start: int, worker: int, workers: int) -> int:
    """The first of a worker's own batches at or after global batch ``start`` (the DataLoader takes batches
    from its workers in turn: worker w's j-th batch is global batch j * workers + w)."""
    return max(0, math.ceil((start - worker) / workers))


class SampleStream(IterableDataset):
    """Yields ``(samples, seed)`` batches forever, from global batch ``start`` on. ``bucket`` batches are drawn
    at once and batched by length (rows pad less); bucket b's draws come from its own generator."""

    def __init__(self, cfg: StageConfig, canvas: int, rank: int = 0, start: int = 0):
        self.cfg, self.canvas, self.rank, self.start = cfg, canvas, rank, start
        self.mixture = TaskMixture(cfg.tasks, canvas=canvas, worlds=cfg.worlds)

    def __iter__(self):
        worker, workers = _worker()
        B, k = self.cfg.batch_size, self.cfg.bucket
        first = _local_start(self.start, worker, workers)
        bucket = first // k
        while True:
            rng = np.random.default_rng([self.cfg.seed, self.rank, worker, bucket])
            pool = sorted((self.mixture(rng) for _ in range(B * k)), key=approx_length)
            order, seeds = rng.permutation(k), rng.integers(2**31, size=k)
            for j in range(k):
                if bucket * k + j >= first:
                    yield pool[order[j] * B:(order[j] + 1) * B], int(seeds[j])
            bucket += 1


class PackCollate:
    """Batch of Samples -> Packed, with classifier-free-guidance prompt dropout on text-to-image rows."""

    def __init__(self, tok: AnyTokenizer, canvas_grid: int, cfg: PackedStageConfig, max_gen_images: int = 4):
        self.tok, self.grid, self.cfg, self.max_gen_images = tok, canvas_grid, cfg, max_gen_images

    def __call__(self, item):
        samples, seed = item
        rng = np.random.default_rng(seed)
        drop = [s.is_text_to_image and rng.random() < self.cfg.cfg_dropout for s in samples]
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


def packed_loader(cfg: PackedStageConfig, tok: AnyTokenizer, canvas_grid: int, canvas: int, rank: int = 0,
                  start: int = 0, num_workers: int = 0) -> DataLoader:
    """Packed batches from global batch ``start`` on. The loader has its own generator, so iterating it does not
    draw from the global RNG (a resumed leg's RNG state stays the one it saved)."""
    ds = SampleStream(cfg, canvas, rank, start)
    return DataLoader(ds, batch_size=None, collate_fn=PackCollate(tok, canvas_grid, cfg), num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator())


class ImageStream(IterableDataset):
    """Canvases for the pixel decoder: the images of samples drawn from the leg's task mixture, batched as
    ``(pixels (B, H, W, 3) uint8, styles, references (B, H, W, 3) uint8)``: each image's render style
    (``Sample.meta["style"]``; None: unknown) and the image it started from. An assistant image's reference is
    its sample's first user image (the input of a chain of generated images: the decoder tells apart what the
    codes alias by it, ``PixelDecoder.cond_map``); a user image, or one whose sample has no input image, is its
    own reference. Batch i is drawn from its own generator, from global batch ``start`` on."""

    def __init__(self, cfg: StageConfig, canvas: int, rank: int = 0, start: int = 0):
        self.cfg, self.rank, self.start = cfg, rank, start
        self.mixture = TaskMixture(cfg.tasks, canvas=canvas, worlds=cfg.worlds)

    def __iter__(self):
        worker, workers = _worker()
        index = _local_start(self.start, worker, workers)
        while True:
            rng = np.random.default_rng([self.cfg.seed, self.rank, worker, index])
            chunk = []
            while len(chunk) < self.cfg.batch_size:
                chunk += self.referenced(self.mixture(rng))
            chunk = chunk[:self.cfg.batch_size]
            yield (torch.from_numpy(np.stack([im for im, _, _ in chunk])), [style for _, style, _ in chunk],
                   torch.from_numpy(np.stack([ref for _, _, ref in chunk])))
            index += 1

    @staticmethod
    def referenced(sample: Sample) -> list[tuple[np.ndarray, str | None, np.ndarray]]:
        """(image, style, reference) for each image of ``sample``, user images first, as ``Sample.images``."""
        style = sample.meta.get("style")
        user = [x for x in sample.user if isinstance(x, np.ndarray)]
        assistant = [x for x in sample.assistant if isinstance(x, np.ndarray)]
        return [(im, style, im) for im in user] + [(im, style, user[0] if user else im) for im in assistant]
