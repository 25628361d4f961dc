"""The render pipeline: latent image ids -> the pixel decoder's codes -> pixels (LatentUM §5, on demand only).

As diffusers keeps pipelines apart from networks, the decoder network (``model.decoder.PixelDecoder``) only
predicts; this module lays ids out on the canvas, looks their codes up and runs the sampling.

Legend: B images, g active grid side, C canvas tokens, G codebooks, R output resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from latentum.model.decoder import sample_scheduler


def render_ids(model, decoder, ids: torch.Tensor, *, style=None, reference=None, steps: int | None = None,
               generator: torch.Generator | None = None) -> np.ndarray:
    """Active-grid ids (B, g*g, G) -> uint8 pixels (B, R, R, 3); tokens outside the grid are background.
    ``model`` is the ``LatentUMModel`` whose codes they are, ``decoder`` a ``PixelDecoder``. ``style``: one name
    from ``decoder.cfg.styles`` (or None, the unknown style) for all images, or one per image. ``reference``: ids
    of the image each started from, (g*g, G) for all, (B, g*g, G), or a list of B (g*g, G) / None; None = the
    image itself."""
    labels = decoder.style_labels(style, ids.size(0))  # (B,); checked before any work
    refs = reference_ids(reference, ids)  # (B, g*g, G) or None
    ids = model.full_canvas_ids(ids.to(model.device))
    codes = model.quantizer.codes_from_ids(ids)
    ref_codes = None if refs is None else model.quantizer.codes_from_ids(model.full_canvas_ids(refs.to(model.device)))
    return sample_pixels(decoder, codes, labels, ref_codes, steps=steps, generator=generator)


@torch.no_grad()
def sample_pixels(decoder, codes: torch.Tensor, styles: torch.Tensor | None = None,
                  reference: torch.Tensor | None = None, steps: int | None = None,
                  generator: torch.Generator | None = None) -> np.ndarray:
    """codes (B, N, Dc), styles (B,) long (``PixelDecoder.style_labels``; None = unknown), reference (B, N, Dc)
    (None = the codes themselves) -> uint8 (B, R, R, 3) by deterministic DDIM (eta = 0): same seed, same pixels.
    ``steps`` defaults to the decoder's ``inference_steps``."""
    steps = decoder.cfg.inference_steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cond = decoder.cond_map(codes, reference)
    classes = decoder.class_input(decoder.check_labels(styles, codes.size(0), codes.device), codes)
    scheduler = sample_scheduler(decoder.cfg)
    scheduler.set_timesteps(steps, device=codes.device)
    R = decoder.cfg.resolution
    gen_device = generator.device if generator is not None else codes.device  # a seed: the same noise anywhere
    x = torch.randn((codes.size(0), 3, R, R), generator=generator, device=gen_device).to(codes.device)
    for t in scheduler.timesteps:
        x = scheduler.step(decoder(x, t.expand(x.size(0)), cond, classes), t, x).prev_sample
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, R, R)
    return rearrange(pixels, "b c h w -> b h w c").cpu().numpy()


def reference_ids(reference, ids: torch.Tensor) -> torch.Tensor | None:
    """``render_ids``' reference -> ids (B, g*g, G) like ``ids`` (a None entry: that image's own), or None."""
    if reference is None:
        return None
    B, shape = ids.size(0), tuple(ids.shape[1:])
    if isinstance(reference, torch.Tensor):
        reference = [reference] * B if reference.dim() == 2 else list(reference)
    if not isinstance(reference, (list, tuple)):
        raise TypeError(f"reference must be a tensor of ids, a list of them or None, got "
                        f"{type(reference).__name__}")
    if len(reference) != B:
        raise ValueError(f"reference: expected one reference or {B} (one per image), got {len(reference)}")
    out = []
    for i, r in enumerate(reference):
        if r is None:
            r = ids[i]
        elif not isinstance(r, torch.Tensor):
            raise TypeError(f"reference[{i}] must be a tensor of ids or None, got {type(r).__name__}")
        elif tuple(r.shape) != shape or r.dtype != ids.dtype:
            raise ValueError(f"reference[{i}] must be ids of the same grid as the image, {ids.dtype} {shape}, "
                             f"got {r.dtype} {tuple(r.shape)}")
        out.append(r.to(ids.device))
    return torch.stack(out)
