"""Pixel decoder network (LatentUM §5): a diffusers UNet that predicts clean images from MBAQ codes z_q. It only
predicts; the sampling loop is ``generation.render``, the training loss ``losses.pixels``.

Legend: B batch, R output resolution, S grid side (image tokens per row), N = S * S tokens, Dc code_dim
(G * per-codebook dim, z_q before the up-projection), Cc cond_channels, K number of styles, Hs summary width,
Dt timestep embedding width (4 * channels[0]).

Codes: tokens are raster-ordered patches, so LayerNorm + Linear(Dc -> Cc) per token laid out as a (B, Cc, S, S)
map and nearest-upsampled to R lines each code up with the pixels it describes; the map is concatenated to the
noisy image as extra input channels (LatentUM conditions an MMDiT on z_q as context tokens; the
channel-concatenated map is the small-UNet equivalent). The decoder never sees LLM states, so it trains
separately (stage 3).

Reference: the codes of the image each one started from (e.g. the input of a chain of thoughts), laid out the same
way and concatenated, (B, 2 Cc, R, R): semantic codes may alias two things that only the starting image tells
apart (docs/architecture.md, "What the codes keep"). An image without one is its own reference.

Style and summary: the UNet's class input (diffusers ``class_embed_type="identity"``, added to the timestep
embedding) is a style embedding plus a summary of the whole code grid: a per-token MLP (LayerNorm, Dc -> Hs -> Hs),
max-pooled over the N tokens and projected to Dt. Semantic codes keep what the model needs, not the look, so a
style label (index 0: "none", the unknown style) picks the look; the summary carries what no single cell's code
says (e.g. that no cell holds some object). The projection starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from einops import rearrange
from torch import Tensor, nn

from latentum.config import DecoderConfig


def _unet(cfg: DecoderConfig) -> UNet2DModel:
    """Plain ResNet blocks with attention only at the coarsest level (cheap on CPU); norm groups are the largest
    divisor shared by every width (<= 32), so tiny widths like 8/16 stay valid."""
    n = len(cfg.channels)
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=3 + 2 * cfg.cond_channels, out_channels=3,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=math.gcd(32, *cfg.channels), attention_head_dim=min(cfg.channels[-1], 32),
        class_embed_type="identity",
    )


def scheduler_kwargs(cfg: DecoderConfig) -> dict:
    """The diffusers scheduler configuration shared by training (DDPM) and sampling (DDIM): squaredcos suits small
    images; "trailing" makes an 8-step DDIM start at pure noise (t = T-1)."""
    return dict(num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2",
                prediction_type=cfg.prediction_type, timestep_spacing="trailing")


def train_scheduler(cfg: DecoderConfig) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(cfg))


def sample_scheduler(cfg: DecoderConfig) -> DDIMScheduler:
    """A fresh DDIM scheduler (schedulers hold timestep state, so one per sampling call)."""
    return DDIMScheduler(**scheduler_kwargs(cfg))


class PixelDecoder(nn.Module):
    """Conditional diffusion network: noisy images, timesteps, codes -> the prediction of ``cfg.prediction_type``."""

    def __init__(self, cfg: DecoderConfig, code_dim: int, grid: int):
        super().__init__()
        if code_dim < 1 or grid < 1:
            raise ValueError(f"code_dim and grid must be >= 1, got code_dim={code_dim}, grid={grid}")
        if cfg.resolution % grid != 0:
            raise ValueError(f"decoder.resolution={cfg.resolution} must be a multiple of grid={grid}")
        self.cfg, self.code_dim, self.grid = cfg, code_dim, grid
        # z_q entries are small (std ~0.1 in the tiny model) next to unit-variance noise; the LayerNorm gives
        # the conditioning unit scale so the UNet cannot ignore it and regress to the mean image.
        self.cond = nn.Sequential(nn.LayerNorm(code_dim), nn.Linear(code_dim, cfg.cond_channels))
        self.unet = _unet(cfg)
        Dt = 4 * cfg.channels[0]  # UNet2DModel's timestep embedding width
        self.style_embed = nn.Embedding(len(cfg.styles), Dt)
        self.summary = nn.Sequential(nn.LayerNorm(code_dim), nn.Linear(code_dim, cfg.summary), nn.SiLU(),
                                     nn.Linear(cfg.summary, cfg.summary))
        self.summary_out = nn.Linear(cfg.summary, Dt)
        nn.init.zeros_(self.summary_out.weight)  # the summary starts silent: early training is as without it
        nn.init.zeros_(self.summary_out.bias)

    def cond_map(self, codes: Tensor, reference: Tensor | None = None) -> Tensor:
        """codes (B, N, Dc), reference (B, N, Dc) or None (= codes) -> conditioning map (B, 2 Cc, R, R):
        [codes' map, reference's map]."""
        N = self.grid**2
        if codes.dim() != 3 or codes.shape[1:] != (N, self.code_dim):
            raise ValueError(f"codes must be (B, {N}, {self.code_dim}) (grid*grid tokens of z_q), "
                             f"got {tuple(codes.shape)}")
        if reference is not None and reference.shape != codes.shape:
            raise ValueError(f"reference must be codes of the same shape as codes {tuple(codes.shape)} "
                             f"(the z_q of the image each one started from), got {tuple(reference.shape)}")
        both = torch.cat([codes, codes if reference is None else reference.to(codes)])  # (2B, N, Dc)
        c = rearrange(self.cond(both), "(two b) (h w) c -> b (two c) h w", two=2, h=self.grid)  # (B, 2 Cc, S, S)
        return F.interpolate(c, size=self.cfg.resolution, mode="nearest")  # (B, 2 Cc, R, R)

    def style_labels(self, style: str | None | Sequence[str | None], batch: int, argument: str = "style") -> Tensor:
        """Style name(s) -> labels (B,) long: one name (or None, the unknown style) for the whole batch, or one per
        image. Unknown names raise a ValueError naming ``argument``."""
        names = list(self.cfg.styles)
        if style is None or isinstance(style, str):
            per_image = [style] * batch
        elif isinstance(style, (list, tuple)):
            per_image = list(style)
        else:
            raise TypeError(f"{argument} must be a style name, None or a list of them, got {type(style).__name__}")
        if len(per_image) != batch:
            raise ValueError(f"{argument}: expected one style or {batch} (one per image), got {len(per_image)}")
        bad = [s for s in per_image if s is not None and s not in names]
        if bad:
            raise ValueError(f"{argument}: unknown style {bad[0]!r}; expected None or one of {names}")
        return torch.tensor([0 if s is None else names.index(s) for s in per_image], dtype=torch.long)

    def check_labels(self, styles: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``styles`` (B,) long in [0, K), or None (-> all 0, the unknown style), on ``device``."""
        if styles is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        K = len(self.cfg.styles)
        if styles.shape != (batch,) or styles.dtype != torch.long:
            raise ValueError(f"styles must be a ({batch},) long tensor of style indices, got "
                             f"{styles.dtype} {tuple(styles.shape)}")
        if styles.numel() and not (0 <= int(styles.min()) and int(styles.max()) < K):
            raise ValueError(f"styles must index decoder.styles={self.cfg.styles} (0..{K - 1}), "
                             f"got {styles.tolist()}")
        return styles.to(device)

    def class_input(self, labels: Tensor, codes: Tensor) -> Tensor:
        """The UNet's class input (B, Dt): the style embedding of ``labels`` (B,) + the summary of ``codes``
        (B, N, Dc)."""
        emb = self.summary_out(self.summary(codes).amax(dim=1))  # (B, N, Hs) -> max over tokens -> (B, Dt)
        return emb + self.style_embed(labels.to(emb.device))

    def forward(self, noisy: Tensor, t: Tensor, cond: Tensor, classes: Tensor) -> Tensor:
        """One network call: noisy (B, 3, R, R), t (B,), cond (B, 2 Cc, R, R) (``cond_map``), classes (B, Dt)
        (``class_input``) -> prediction (B, 3, R, R)."""
        return self.unet(torch.cat([noisy, cond.to(noisy.dtype)], dim=1), t, class_labels=classes).sample

