"""The pixel decoder's diffusion loss (pure function of the network, a batch and a generator).

Legend: B batch, R resolution, N tokens, Dc code dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentum.types import LossBreakdown


def diffusion_loss(decoder, scheduler, images: Tensor, codes: Tensor, styles: Tensor | None = None,
                   reference: Tensor | None = None, generator: torch.Generator | None = None,
                   weight: Tensor | None = None) -> LossBreakdown:
    """MSE on the scheduler's prediction target at uniformly random timesteps, weighted per pixel.

    ``decoder`` is a ``model.decoder.PixelDecoder`` and ``scheduler`` its training scheduler
    (``model.decoder.train_scheduler``); images (B, 3, R, R) in [-1, 1], codes (B, N, Dc), styles (B,) long
    (None = the unknown style), reference (B, N, Dc) codes of the image each started from (None = its own), weight
    (B, 1, R, R) >= 0 (None = uniform; all ones give the plain MSE)."""
    R = decoder.cfg.resolution
    if images.dim() != 4 or images.shape[1:] != (3, R, R):
        raise ValueError(f"images must be (B, 3, {R}, {R}) in [-1, 1], got {tuple(images.shape)}")
    if codes.size(0) != images.size(0):
        raise ValueError(f"codes batch {codes.size(0)} must match images batch {images.size(0)}")
    if weight is not None and (weight.shape != (images.size(0), 1, R, R) or bool((weight < 0).any())):
        raise ValueError(f"weight must be ({images.size(0)}, 1, {R}, {R}) and >= 0, got {tuple(weight.shape)}")
    B = images.size(0)
    labels = decoder.check_labels(styles, B, images.device)
    gen_device = generator.device if generator is not None else images.device  # a seed: the same draws anywhere
    noise = torch.randn(images.shape, generator=generator, device=gen_device).to(images.device)
    t = torch.randint(0, decoder.cfg.train_timesteps, (B,), generator=generator, device=gen_device)  # (B,)
    t = t.to(images.device)
    noisy = scheduler.add_noise(images, noise, t)
    pred = decoder(noisy, t, decoder.cond_map(codes, reference), decoder.class_input(labels, codes))
    kind = decoder.cfg.prediction_type
    target = {"epsilon": noise, "sample": images}.get(kind)
    if target is None:  # v_prediction
        target = scheduler.get_velocity(images, noise, t)
    err = (pred.float() - target.float()).pow(2)  # (B, 3, R, R)
    mse = err.mean()
    if weight is None:
        return LossBreakdown(mse, {"mse": mse.detach()})
    weight = weight.to(err)
    loss = (err * weight).sum() / (weight.sum() * err.size(1)).clamp_min(1e-8)
    return LossBreakdown(loss, {"mse": mse.detach(), "weighted_mse": loss.detach()})
