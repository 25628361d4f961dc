"""Vision encoder: a timm ViT over the square canvas, returning one feature per patch (the "VLM" ViT).

Legend: B batch, H/W image height/width (== image_size), C RGB channels, N image tokens (grid**2, raster
order), F feature width (== EncoderConfig.width).

No class token and no pooling: MBAQ quantizes every patch feature (LatentUM §2 quantizes the ViT features
before the VLM projector), so the encoder's output is the token grid itself.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from latentum.config import EncoderConfig

MEAN = 0.5
STD = 0.5


class VisionEncoder(nn.Module):
    """timm ``VisionTransformer`` without head, class token or pooling: pixels (B,3,H,W) -> (B, N, F)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = cfg.feature_dim  # == width: the "vit" kind never pixel-shuffles
        self.num_tokens = cfg.num_tokens
        self.vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, num_classes=0, class_token=False, global_pool="",
        )
        # Start the (learnable) position embedding from fixed 2-D sin-cos, as MAE does: timm's default
        # N(0, 0.02) init is ~100x smaller than the patch content, so "which row and column" was nearly
        # invisible and a from-scratch model could not learn to read positions (questions about cells).
        with torch.no_grad():
            pos = build_sincos2d_pos_embed([cfg.grid, cfg.grid], cfg.width)  # (N, F)
            self.vit.pos_embed.copy_(pos[None])

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) normalised by :meth:`preprocess` -> last-layer features (B, N, F)."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size) or not pixels.is_floating_point():
            raise ValueError(f"pixels must be a float tensor of shape (B, 3, {size}, {size}), got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")
        return self.vit.forward_features(pixels)  # (B, N, F), final LayerNorm applied

    def preprocess(self, images: np.ndarray | Tensor) -> Tensor:
        """uint8 images (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] on the encoder's device.

        Images must already be at the canvas size: the data worlds render onto it, and silently resizing
        would blur a one-patch-per-cell layout (``data.canvas``).
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        size = self.cfg.image_size
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f"images must be uint8 of shape (B, {size}, {size}, 3), got "
                             f"{images.dtype} {tuple(images.shape)}")
        device = next(self.parameters()).device
        x = rearrange(images.to(device), "b h w c -> b c h w").float() / 255.0  # (B, 3, H, W) in [0, 1]
        return (x - MEAN) / STD
