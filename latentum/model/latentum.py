"""LatentUMModel: the four parts wired together (encoder + MBAQ + MoME backbone + AR head).

Only wiring lives here: each part is its own module. The pixel decoder is deliberately not a member; it is
trained and loaded separately (DESIGN.md, "Pixel decoder").

Legend: B rows, T sequence, I images, N tokens per image, G codebooks, D backbone width, F encoder width.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from latentum.config import ModelConfig
from latentum.data.packing import Packed
from latentum.model.backbone import AttentionSpans, MoMEBackbone
from latentum.model.encoder import VisionEncoder
from latentum.model.heads import DepthHead, VisualProjector
from latentum.model.quantizer import MBAQ


class PackedForward(NamedTuple):
    hidden: torch.Tensor  # (B, T, D) after the final norm
    attn_mass: torch.Tensor | None  # (L, B) AIA intensities, when spans were requested
    latent_ids: torch.Tensor  # (I, N, G) clean codes of the batch's assistant images


class LatentUMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, F = cfg.backbone.dim, cfg.encoder.width
        self.encoder = VisionEncoder(cfg.encoder)
        # The VLM's own projector for continuous input images (InternVL's mlp1).
        self.feature_projector = nn.Sequential(nn.LayerNorm(F), nn.Linear(F, D), nn.GELU(), nn.Linear(D, D))
        self.quantizer = MBAQ(cfg.quantizer, feature_dim=F, out_dim=D)
        self.backbone = MoMEBackbone(cfg.backbone)
        self.visual_projector = VisualProjector(cfg.quantizer.dim, D)
        self.head = DepthHead(cfg.head, D, cfg.quantizer.codebooks, cfg.quantizer.codebook_size)

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.encoder.num_tokens

    # --- images -----------------------------------------------------------------------------------------
    def image_features(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (I, H, W, 3) canvases -> encoder features (I, N, F)."""
        return self.encoder(self.encoder.preprocess(pixels).to(self.device))

    def input_embeddings(self, pixels) -> torch.Tensor:
        """Continuous embeddings of observed images (I, N, D): how the VLM sees a user's image."""
        return self.feature_projector(self.image_features(pixels))

    @torch.no_grad()
    def image_ids(self, pixels) -> torch.Tensor:
        """Discrete semantic tokens (I, N, G) of images: encoder -> MBAQ."""
        if len(pixels) == 0:
            G = self.cfg.quantizer.codebooks
            return torch.zeros(0, self.tokens_per_image, G, dtype=torch.long, device=self.device)
        return self.quantizer.encode(self.image_features(pixels)).ids

    def latent_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(I, N, G) ids -> (I, N, D) embeddings; the same vectors feed both branches (LatentUM §1)."""
        return self.visual_projector(self.quantizer.codes_from_ids(ids))

    # --- packed training forward ----------------------------------------------------------------------
    def embed_packed(self, p: Packed, latent_ids: torch.Tensor, read_ids: torch.Tensor | None = None):
        """Token embeddings with the image rows filled in. ``read_ids`` (default ``latent_ids``) are the
        codes the understanding branch reads back (noised in training, LatentUM §8)."""
        x = self.backbone.embed(p.ids)
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        read_ids = latent_ids if read_ids is None else read_ids
        fills = []
        if len(p.inputs.start):
            fills.append((p.inputs.start, self.input_embeddings(p.inputs.pixels)))
        if len(p.latents.start):
            fills.append((p.latents.start, self.latent_embeddings(read_ids)))
        if len(p.gen_blocks.start):
            fills.append((p.gen_blocks.start, self.latent_embeddings(latent_ids[p.gen_blocks.owner])))
        for start, emb in fills:
            N = emb.size(1)
            rows = (start[:, None] + torch.arange(N, device=x.device)).reshape(-1)  # (I*N,)
            x = x.index_copy(0, rows, emb.reshape(-1, D).to(x.dtype))
        return x.view(B, T, D)

    def forward_packed(self, p: Packed, *, code_noise: float = 0.0, with_aia: bool = False,
                       generator: torch.Generator | None = None) -> PackedForward:
        latent_ids = self.image_ids(p.latents.pixels)
        read_ids = corrupt_codes(latent_ids, code_noise, self.cfg.quantizer.codebook_size, generator)
        x = self.embed_packed(p, latent_ids, read_ids)
        spans = AttentionSpans(query=p.aia_query, key=p.aia_key) if with_aia else None
        out = self.backbone(x, p.gen_mask, p.positions, attn_mask=p.attn_mask, key_valid=p.valid, spans=spans)
        return PackedForward(out.hidden, out.attn_mass, latent_ids)


def corrupt_codes(ids: torch.Tensor, prob: float, codebook_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each code by a uniform random one with probability ``prob`` (LatentUM's noise_ratio 0.15),
    so the understanding branch learns to read the model's own imperfect thoughts."""
    if prob <= 0 or ids.numel() == 0:
        return ids
    flip = torch.rand(ids.shape, generator=generator).to(ids.device) < prob
    rand = torch.randint(0, codebook_size, ids.shape, generator=generator).to(ids.device)
    return torch.where(flip, rand, ids)
