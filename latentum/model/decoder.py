"""Pixel decoder (LatentUM §5): a diffusers UNet that renders images from MBAQ codes z_q, on demand only.

Legend: B batch, R output resolution, S grid side (image tokens per row), N = S * S tokens, Dc code_dim
(G * per-codebook dim, z_q before the up-projection), Cc cond_channels (the conditioning map has 2 Cc with a
reference), K number of styles, Hs summary width, Dt timestep embedding width (4 * channels[0]).

Conditioning is spatial: tokens are raster-ordered patches, so LayerNorm + Linear(Dc -> Cc) per token laid out as a
(B, Cc, S, S) map and nearest-upsampled to R lines each code up with the pixels it describes; the map is
concatenated to the noisy image as extra input channels. LatentUM conditions an MMDiT on z_q as context
tokens; the channel-concatenated map is the small-UNet equivalent. The decoder never sees LLM states, so it
trains separately (stage 3). Network and schedulers are diffusers; the scheduler is kept out of the module
state (diffusers style) and rebuilt from the config.

Style: MBAQ keeps what the planner needs, not the look, so the same board in the gymnasium and classic styles
gets (nearly) the same codes and an unconditioned decoder draws a blend that matches neither. A style label
(B,) in [0, K) picks the look through diffusers' class conditioning (``num_class_embeds``: an embedding added
to the timestep embedding); label 0 is "none", the unknown style. A config with no ``styles`` (every decoder
saved before this existed) builds the UNet without a class embedding and renders exactly as it did.

Reference: MBAQ codes alias the player and the start stool (a board with the two swapped has the same code grid;
code (8,33) in the tiny model marks "player or stool"). An input map has one such cell, a thought after a move
two, and from the thought's codes alone nothing tells which is the player. With ``reference`` the decoder also
sees the codes of the image the thought started from (the plan's input map, player on the start cell): the
(8,33) cell also present there is the stool. Both code grids go through the same LayerNorm + Linear and the two
maps are concatenated, (B, 2 Cc, R, R): a code means the same thing in either, so equal codes give equal
channels, which is what the UNet compares, and its first conv already weighs each copy on its own (a second
projection would only give the reference its own Cc-dim view, and new parameter names). None as a
reference means the image itself (an input map, a Shapes image). A config without ``reference`` (every decoder
saved before it) builds the UNet with 3 + Cc input channels and renders exactly as it did.

Summary: each conditioning map shows one cell's code where that cell is drawn, and the UNet's receptive field
ties a pixel to codes nearby; what no single code says stays hard to learn. In the classic look MBAQ codes the
player standing on the goal as the goal alone, so that board differs from every other in one global fact: no
cell holds a player code. With ``summary`` = Hs > 0 an MLP per token (LayerNorm, Dc -> Hs -> Hs) is max-pooled
over the N tokens and projected to the timestep embedding (Dt = 4 * channels[0]), where it is added with the
style's embedding (diffusers' ``class_embed_type="identity"``: the class input is that sum). The projection
starts at zero, so ``with_summary`` grows a decoder without one into one that renders the same pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latentum.config import DecoderConfig
from latentum.losses.breakdown import LossBreakdown

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KNOWN_STYLES = tuple(DecoderConfig().styles)
"""Style names an unconditioned decoder still checks ``style`` against (it ignores them), so typos fail."""


def _unet(cfg: DecoderConfig) -> UNet2DModel:
    """Plain ResNet blocks with attention only at the coarsest level (cheap on CPU); norm groups are the
    largest divisor shared by every width (<= 32), so tiny widths like 8/16 stay valid. A ``summary`` decoder
    takes its class input as an embedding (style + summary, made by ``PixelDecoder``), not a style index."""
    n = len(cfg.channels)
    cond = cfg.cond_channels * (2 if cfg.reference else 1)  # the codes' map (+ the reference's)
    if cfg.summary:
        classes = dict(class_embed_type="identity")
    else:  # None: no class embedding, as before styles existed
        classes = dict(num_class_embeds=len(cfg.styles) or None)
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=3 + cond, out_channels=3,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=math.gcd(32, *cfg.channels), attention_head_dim=min(cfg.channels[-1], 32), **classes,
    )


class PixelDecoder(nn.Module):
    """Conditional diffusion decoder: codes (B, N, Dc) -> images (B, R, R, 3) uint8."""

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
        if cfg.summary:
            Dt = 4 * cfg.channels[0]  # UNet2DModel's timestep embedding width
            self.style_embed = nn.Embedding(len(cfg.styles), Dt) if cfg.styles else None
            self.summary = nn.Sequential(nn.LayerNorm(code_dim), nn.Linear(code_dim, cfg.summary), nn.SiLU(),
                                         nn.Linear(cfg.summary, cfg.summary))
            self.summary_out = nn.Linear(cfg.summary, Dt)
            nn.init.zeros_(self.summary_out.weight)  # starts as no summary: renders as the decoder it grew from
            nn.init.zeros_(self.summary_out.bias)
        # squaredcos suits small images; "trailing" makes an 8-step DDIM start at pure noise (t = T-1).
        self._sched_kwargs = dict(num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2",
                                  prediction_type=cfg.prediction_type, timestep_spacing="trailing")
        self.train_scheduler = DDPMScheduler(**self._sched_kwargs)

    def cond_map(self, codes: Tensor, reference: Tensor | None = None) -> Tensor:
        """codes (B, N, Dc), reference (B, N, Dc) or None (= codes) -> conditioning map (B, Cc, R, R), or
        (B, 2 Cc, R, R) [codes' map, reference's map] for a ``reference`` decoder."""
        N = self.grid**2
        if codes.dim() != 3 or codes.shape[1:] != (N, self.code_dim):
            raise ValueError(f"codes must be (B, {N}, {self.code_dim}) (grid*grid tokens of z_q), "
                             f"got {tuple(codes.shape)}")
        if reference is not None:
            if not self.cfg.reference:
                raise ValueError("reference: this decoder has no reference conditioning (its config has "
                                 "reference=false); pass reference=None")
            if reference.shape != codes.shape:
                raise ValueError(f"reference must be codes of the same shape as codes {tuple(codes.shape)} "
                                 f"(the z_q of the image each one started from), got {tuple(reference.shape)}")
        if self.cfg.reference:
            codes = torch.cat([codes, codes if reference is None else reference.to(codes)])  # (2B, N, Dc)
        c = rearrange(self.cond(codes), "b (h w) c -> b c h w", h=self.grid)  # (B or 2B, Cc, S, S)
        if self.cfg.reference:
            c = rearrange(c, "(two b) c h w -> b (two c) h w", two=2)  # (B, 2 Cc, S, S): codes, then reference
        return F.interpolate(c, size=self.cfg.resolution, mode="nearest")  # (B, Cc or 2 Cc, R, R)

    @property
    def conditioned(self) -> bool:
        """Whether the UNet takes a style label (False for decoders saved before style conditioning)."""
        return bool(self.cfg.styles)

    def style_labels(self, style: str | None | Sequence[str | None], batch: int,
                     argument: str = "style") -> Tensor | None:
        """Style name(s) -> labels (B,) long for ``loss``/``render``: one name (or None, the unknown style) for
        the whole batch, or one per image. An unconditioned decoder checks the names and returns None: it
        draws as it always did. Unknown names raise a ValueError naming ``argument``."""
        names = list(self.cfg.styles or KNOWN_STYLES)
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
        if not self.conditioned:
            return None
        return torch.tensor([0 if s is None else names.index(s) for s in per_image], dtype=torch.long)

    def _labels(self, styles: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """Check ``styles`` (B,) long in [0, K) or None (-> all 0, the unknown style); None if unconditioned."""
        if not self.conditioned:
            if styles is not None:
                raise ValueError("styles: this decoder has no style conditioning (its config has no styles; "
                                 "saved before styles existed); pass styles=None")
            return None
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

    def class_input(self, labels: Tensor | None, codes: Tensor) -> Tensor | None:
        """The UNet's class input: style labels (B,) (``_labels``; None for an unconditioned decoder) as they
        are, or for a ``summary`` decoder the embedding (B, Dt): the codes' (B, N, Dc) summary + the style's."""
        if not self.cfg.summary:
            return labels
        emb = self.summary_out(self.summary(codes).amax(dim=1))  # (B, N, Hs) -> max over tokens -> (B, Dt)
        return emb if labels is None else emb + self.style_embed(labels)

    def predict(self, noisy: Tensor, t: Tensor, cond: Tensor, classes: Tensor | None = None) -> Tensor:
        """One network call: noisy (B, 3, R, R), t (B,), cond (B, Cc or 2 Cc, R, R) (``cond_map``), classes
        (``class_input``: labels (B,), an embedding (B, Dt), or None) -> prediction (B, 3, R, R)."""
        return self.unet(torch.cat([noisy, cond.to(noisy.dtype)], dim=1), t, class_labels=classes).sample

    def with_summary(self, width: int) -> PixelDecoder:
        """This decoder grown a code summary of ``width`` (``DecoderConfig.summary``), its weights copied (the
        style embedding moves out of the UNet): it renders the same pixels until the summary is trained."""
        if self.cfg.summary:
            raise ValueError(f"this decoder already has a summary (decoder.summary={self.cfg.summary})")
        grown = PixelDecoder(replace(self.cfg, summary=width), self.code_dim, self.grid)
        state = dict(self.state_dict())
        if self.cfg.styles:
            state["style_embed.weight"] = state.pop("unet.class_embedding.weight")
        missing, unexpected = grown.load_state_dict(state, strict=False)
        if unexpected or not all(k.startswith("summary") for k in missing):
            raise RuntimeError(f"with_summary: weights left over {unexpected}, missing {missing}")
        return grown.to(next(self.parameters()).device)

    def loss(self, images: Tensor, codes: Tensor, styles: Tensor | None = None, reference: Tensor | None = None,
             generator: torch.Generator | None = None, weight: Tensor | None = None) -> LossBreakdown:
        """images (B, 3, R, R) in [-1, 1], codes (B, N, Dc), styles (B,) long (``style_labels``; None = unknown),
        reference (B, N, Dc) codes of the image each started from (None = its own codes; ``reference`` decoders
        only), weight (B, 1, R, R) >= 0 per pixel (None = uniform) -> the weighted MSE on the scheduler's
        prediction target at uniformly random timesteps (all ones: the plain MSE)."""
        R = self.cfg.resolution
        if images.dim() != 4 or images.shape[1:] != (3, R, R):
            raise ValueError(f"images must be (B, 3, {R}, {R}) in [-1, 1], got {tuple(images.shape)}")
        if codes.size(0) != images.size(0):
            raise ValueError(f"codes batch {codes.size(0)} must match images batch {images.size(0)}")
        if weight is not None and (weight.shape != (images.size(0), 1, R, R) or bool((weight < 0).any())):
            raise ValueError(f"weight must be ({images.size(0)}, 1, {R}, {R}) and >= 0, got {tuple(weight.shape)}")
        B = images.size(0)
        labels = self._labels(styles, B, images.device)
        noise = _randn(images.shape, generator, images.device)
        t = _randint(self.cfg.train_timesteps, B, generator, images.device)  # (B,)
        noisy = self.train_scheduler.add_noise(images, noise, t)
        pred = self.predict(noisy, t, self.cond_map(codes, reference), self.class_input(labels, codes))
        kind = self.cfg.prediction_type
        target = {"epsilon": noise, "sample": images}.get(kind)
        if target is None:  # v_prediction
            target = self.train_scheduler.get_velocity(images, noise, t)
        err = (pred.float() - target.float()).pow(2)  # (B, 3, R, R)
        mse = err.mean()
        if weight is None:
            return LossBreakdown(mse, {"mse": mse.detach()})
        weight = weight.to(err)
        loss = (err * weight).sum() / (weight.sum() * err.size(1)).clamp_min(1e-8)
        return LossBreakdown(loss, {"mse": mse.detach(), "weighted_mse": loss.detach()})

    @torch.no_grad()
    def render(self, codes: Tensor, styles: Tensor | None = None, reference: Tensor | None = None,
               steps: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
        """codes (B, N, Dc), styles (B,) long (``style_labels``; None = unknown), reference (B, N, Dc) (as in
        ``loss``; None = the codes themselves) -> uint8 (B, R, R, 3), deterministic DDIM (eta = 0); same seed,
        same pixels."""
        steps = self.cfg.inference_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond = self.cond_map(codes, reference)
        classes = self.class_input(self._labels(styles, codes.size(0), codes.device), codes)
        scheduler = DDIMScheduler(**self._sched_kwargs)  # fresh per call: schedulers hold timestep state
        scheduler.set_timesteps(steps, device=codes.device)
        R = self.cfg.resolution
        x = _randn((codes.size(0), 3, R, R), generator, codes.device)
        for t in scheduler.timesteps:
            tt = t.expand(x.size(0))  # (B,)
            x = scheduler.step(self.predict(x, tt, cond, classes), t, x).prev_sample
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, R, R)
        return rearrange(pixels, "b c h w -> b h w c").cpu().numpy()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` (DecoderConfig + code_dim + grid) and ``model.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"decoder": asdict(self.cfg), "code_dim": self.code_dim, "grid": self.grid}
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> PixelDecoder:
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"folder {str(folder)!r} has no {name}; "
                                        "expected a PixelDecoder.save_pretrained output")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        # A config.json without "styles" predates style conditioning: build it unconditioned, as it was trained.
        # One without "reference" predates reference conditioning: the default (False) builds it as trained.
        cfg = DecoderConfig(**{"styles": [], **meta["decoder"]})
        model = cls(cfg, code_dim=meta["code_dim"], grid=meta["grid"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.to(device)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Noise drawn on the generator's device, then moved: a seed gives the same noise on any device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)
