"""LatentUMModel: the four parts wired together (encoder + MBAQ + MoME backbone + AR head).

Only wiring lives here: each part is its own module. The pixel decoder is deliberately not a member; it is
trained and loaded separately (DESIGN.md, "Pixel decoder").

Legend: B rows, T sequence, I images, N tokens per image, C canvas tokens, G codebooks, D width, F encoder width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from latentum.config import ModelConfig
from latentum.data.canvas import active_index
from latentum.data.packing import Packed, same_image
from latentum.model.backbone import AttentionSpans, MoMEBackbone
from latentum.model.heads import CellPositions, DepthHead, VisualProjector
from latentum.model.quantizer import MBAQ
from latentum.model.towers import build_encoder


class PackedForward(NamedTuple):
    hidden: torch.Tensor  # (B, T, D) after the final norm
    attn_mass: torch.Tensor | None  # (L, B) AIA intensities, when spans were requested
    latent_ids: torch.Tensor  # (I, C, G) clean canvas codes of the batch's assistant images


class LatentUMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, F = cfg.backbone.dim, cfg.encoder.feature_dim
        self.encoder = build_encoder(cfg.encoder)
        # The VLM's own projector for continuous input images (InternVL's mlp1).
        self.feature_projector = nn.Sequential(nn.LayerNorm(F), nn.Linear(F, D), nn.GELU(), nn.Linear(D, D))
        self.quantizer = MBAQ(cfg.quantizer, feature_dim=F, out_dim=D)
        self.backbone = MoMEBackbone(cfg.backbone)
        q = cfg.quantizer
        self.visual_projector = VisualProjector(q.dim, D, q.projector_hidden_dim or q.hidden_dim)
        self.head = DepthHead(cfg.head, D, cfg.quantizer.codebooks, cfg.quantizer.codebook_size)
        self.cell_pos = CellPositions(cfg.encoder.grid, D, enabled=cfg.cell_positions)

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    # --- images -----------------------------------------------------------------------------------------
    def image_features(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (I, H, W, 3) canvases -> encoder features (I, N, F)."""
        dtype = next(self.encoder.parameters()).dtype  # a model loaded in bf16 reads its pixels in bf16
        return self.encoder(self.encoder.preprocess(pixels).to(self.device, dtype))

    def canvas_positions(self) -> torch.Tensor:
        """(C, D): every canvas cell's own 2-D position embedding, in raster order."""
        return self.cell_pos(torch.arange(self.cfg.encoder.num_tokens, device=self.device))

    def input_embeddings(self, pixels) -> torch.Tensor:
        """Continuous embeddings of observed images (I, C, D): how the VLM sees a user's image."""
        return self.feature_projector(self.image_features(pixels)) + self.canvas_positions()

    @torch.no_grad()
    def image_ids(self, pixels) -> torch.Tensor:
        """Discrete semantic tokens (I, N, G) of images: encoder -> MBAQ."""
        if len(pixels) == 0:
            G = self.cfg.quantizer.codebooks
            return torch.zeros(0, self.cfg.encoder.num_tokens, G, dtype=torch.long, device=self.device)
        return self.quantizer.encode(self.image_features(pixels)).ids

    @torch.no_grad()
    def init_visual_projector(self) -> None:
        """Start the visual projector as a copy of MBAQ's up-projection (stage 2 initialisation): latents are
        then read like the quantized features the frozen VLM was aligned on (reference §1, ``up_proj``)."""
        q = self.cfg.quantizer
        if (q.projector_hidden_dim or q.hidden_dim) != (q.up_hidden_dim or q.hidden_dim):
            raise ValueError(f"init_visual_projector: quantizer.projector_hidden_dim={q.projector_hidden_dim} and "
                             f"up_hidden_dim={q.up_hidden_dim} must give one width to copy the up-projection")
        self.visual_projector.net.load_state_dict(self.quantizer.up.state_dict())

    def latent_embeddings(self, ids: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """(I, N, G) ids -> (I, N, D) embeddings, each plus the position of its canvas cell in ``cells`` (N,)
        (-1: none). By default the tokens are a top-left g x g active grid read in raster order (N = g * g)
        and carry their own cells; generation inputs pass the cells they predict instead."""
        if cells is None:
            g = math.isqrt(ids.size(1))
            if g * g != ids.size(1):
                raise ValueError(f"ids must hold a square grid of tokens, got {ids.size(1)}; pass cells")
            cells = torch.tensor(active_index(g, self.cfg.encoder.grid), device=ids.device)
        return self.visual_projector(self.quantizer.codes_from_ids(ids)) + self.cell_pos(cells.to(ids.device))

    def rope_positions(self, positions: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """1-D positions (B, T) -> what the backbone's RoPE takes: themselves, or with ``image_rope="2d"``
        (B, T, 2) row/col positions, ``offsets`` (B, T, 2) or (T, 2) from ``canvas.rope_offsets`` (None: text)."""
        if self.cfg.backbone.image_rope == "1d":
            return positions
        pos = positions[..., None].expand(*positions.shape, 2)
        return pos if offsets is None else pos + offsets.to(pos.device)

    def attention_mask(self, causal: torch.Tensor, span: torch.Tensor, key_span: torch.Tensor | None = None):
        """The mask the backbone runs under: ``causal`` (B, T, S), plus every pair of tokens of one U-read
        image with ``image_attention="bidirectional"`` (``span`` (B, T) / ``key_span`` (B, S) image ids)."""
        if self.cfg.backbone.image_attention == "causal":
            return causal
        return causal | same_image(span, key_span)

    # --- packed training forward ----------------------------------------------------------------------
    def embed_packed(self, p: Packed, latent_ids: torch.Tensor, read_ids: torch.Tensor | None = None,
                     input_embeddings: torch.Tensor | None = None):
        """Token embeddings with the image rows filled in. ``latent_ids`` (I, C, G) are the latents' canvas
        codes; ``read_ids`` (default ``latent_ids``) are what the und branch reads back (noised in training,
        LatentUM §8) while G blocks always get the clean codes. ``input_embeddings`` (I, C, D) replaces the
        input images' continuous embeddings (default ``input_embeddings(pixels)``), e.g. by their quantized
        features in stage 1."""
        x = self.backbone.embed(p.ids)
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        read_ids = latent_ids if read_ids is None else read_ids
        fills = []
        if len(p.inputs.rows):
            fills.append((p.inputs, self.input_embeddings(p.inputs.pixels) if input_embeddings is None
                          else input_embeddings))
        if len(p.latents.rows):
            fills.append((p.latents, self.latent_embeddings(read_ids)))
        if len(p.gen_blocks.rows):  # no own position: p.gen_cells adds the cell each G token predicts
            no_cell = torch.full((latent_ids.size(1),), -1, device=latent_ids.device)
            fills.append((p.gen_blocks, self.latent_embeddings(latent_ids, no_cell)))
        for slots, emb in fills:  # emb (I, C, D) over the whole canvas; take the active tokens
            x = x.index_copy(0, slots.rows, emb.reshape(-1, D)[slots.src].to(x.dtype))
        return self.ground(x.view(B, T, D) + self.cell_pos(p.gen_cells).to(x.dtype), p.text_cells)

    def ground(self, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Token embeddings x (B, T, D) plus the position embeddings of the cells their prompt text names
        (``canvas.named_cells``, (B, T), -1: none) with ``ground_coordinates``; x itself without (models trained
        without it read coordinates as plain words)."""
        if not self.cfg.ground_coordinates:
            return x
        return x + self.cell_pos(cells.to(x.device)).to(x.dtype)

    def forward_packed(self, p: Packed, *, code_noise: float = 0.0, with_aia: bool = False,
                       generator: torch.Generator | None = None,
                       input_embeddings: torch.Tensor | None = None) -> PackedForward:
        """The one packed forward every stage trains through (``embed_packed``, then the backbone)."""
        latent_ids = self.image_ids(p.latents.pixels)
        read_ids = corrupt_codes(latent_ids, code_noise, self.cfg.quantizer.codebook_size, generator)
        x = self.embed_packed(p, latent_ids, read_ids, input_embeddings)
        spans = AttentionSpans(query=p.aia_query, key=p.aia_key) if with_aia else None
        positions = self.rope_positions(p.positions, p.rope_offsets)
        out = self.backbone(x, p.gen_mask, positions, attn_mask=self.attention_mask(p.attn_mask, p.image_span),
                            key_valid=p.valid, spans=spans)
        return PackedForward(out.hidden, out.attn_mass, latent_ids)

    # --- canvas layout ----------------------------------------------------------------------------------
    @torch.no_grad()
    def background_ids(self) -> torch.Tensor:
        """Codes (C, G) of an all-black canvas: what the tokens outside an image's active grid hold."""
        if not hasattr(self, "_background"):
            S = self.cfg.encoder.image_size
            self._background = self.image_ids(np.zeros((1, S, S, 3), np.uint8))[0]
        return self._background.to(self.device)

    def full_canvas_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Active-grid ids (B, g*g, G) -> canvas ids (B, C, G), background outside the top-left g x g."""
        g = int(round(ids.size(1) ** 0.5))
        full = self.background_ids()[None].repeat(ids.size(0), 1, 1)
        index = torch.tensor(active_index(g, self.cfg.encoder.grid), device=full.device)
        full[:, index] = ids.to(full.device)
        return full


def corrupt_codes(ids: torch.Tensor, prob: float, codebook_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each code by a uniform random one with probability ``prob`` (LatentUM's noise_ratio 0.15),
    so the understanding branch learns to read the model's own imperfect thoughts."""
    if prob <= 0 or ids.numel() == 0:
        return ids
    flip = torch.rand(ids.shape, generator=generator).to(ids.device) < prob
    rand = torch.randint(0, codebook_size, ids.shape, generator=generator).to(ids.device)
    return torch.where(flip, rand, ids)
