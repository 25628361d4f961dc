"""One LightningModule per stage. They own the loop; the models they wrap never import Lightning.

| stage   | trains                                             | frozen                        |
|---------|----------------------------------------------------|-------------------------------|
| vlm     | encoder, feature projector, backbone und + shared  | quantizer, gen branch, heads  |
| mbaq    | quantizer                                          | everything else (the teacher) |
| mome    | gen branch, AR head, visual projector (+ und/shared)| encoder, projector, quantizer |
| decoder | pixel decoder                                      | the whole LatentUMModel       |
"""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import torch
import torch.nn.functional as F

from latentum.config import DecoderConfig, TrainConfig
from latentum.data.packing import IGNORE, Packed
from latentum.losses.aia import aia_loss
from latentum.losses.behaviour import mbaq_loss
from latentum.losses.breakdown import LossBreakdown
from latentum.model.decoder import PixelDecoder
from latentum.model.latentum import LatentUMModel


def set_trainable(model: torch.nn.Module, trainable: list[torch.nn.Module | torch.nn.Parameter]) -> None:
    """Freeze everything in ``model`` except the given modules/parameters."""
    model.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)


class StageSystem(L.LightningModule):
    """Shared optimiser, schedule and logging; subclasses define ``losses(batch) -> LossBreakdown``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    def on_train_epoch_start(self):
        # Trained parts in train mode, frozen parts in eval mode: a loaded model (``from_pretrained``) comes in
        # eval mode, and the quantizer must revive dead codes and keep usage while it trains, not while frozen.
        # modules() is pre-order, so a frozen child visited after its parent ends up in eval mode.
        for module in self.modules():
            params = list(module.parameters())
            if module is not self and params:
                module.train(any(p.requires_grad for p in params))

    def training_step(self, batch, batch_idx):
        out = self.losses(batch)
        self.log("loss", out.total, prog_bar=True)
        if self.global_step % self.cfg.log_every == 0:
            for k, v in out.parts.items():
                self.log(f"train/{k}", v.detach().float())
        return out.total

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95))
        warm, total = self.cfg.warmup_steps, self.cfg.steps

        def schedule(step: int) -> float:  # linear warmup, cosine to 10%
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def text_loss(model: LatentUMModel, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over supervised text positions; also returns token accuracy."""
    sel = targets != IGNORE
    logits = model.backbone.logits(hidden[sel]).float()
    tgt = targets[sel]
    return F.cross_entropy(logits, tgt), (logits.argmax(-1) == tgt).float().mean()


class VLMSystem(StageSystem):
    """Stage 0: the base VLM learns understanding QA with continuous image features."""

    def __init__(self, model: LatentUMModel, cfg: TrainConfig):
        super().__init__(cfg)
        self.model = model
        bb = model.backbone
        set_trainable(model, [model.encoder, model.feature_projector, model.cell_pos,
                              *bb.branch_parameters("und"), *bb.shared_parameters()])

    def losses(self, p: Packed) -> LossBreakdown:
        fwd = self.model.forward_packed(p)
        ce, acc = text_loss(self.model, fwd.hidden, p.text_targets)
        return LossBreakdown(ce, {"text_ce": ce, "text_acc": acc})


class MBAQSystem(StageSystem):
    """Stage 1: the quantizer learns to make the frozen VLM behave the same on quantized features."""

    def __init__(self, model: LatentUMModel, cfg: TrainConfig):
        super().__init__(cfg)
        self.model = model
        set_trainable(model, [model.quantizer])

    def losses(self, p: Packed) -> LossBreakdown:
        m = self.model
        feats = m.image_features(p.inputs.pixels).detach()
        pos = m.canvas_positions().detach()  # (C, D), added to both views as input_embeddings does
        with torch.no_grad():
            teacher = m.backbone.logits(self._hidden(p, m.feature_projector(feats) + pos))
        q = m.quantizer.encode(feats)
        student = m.backbone.logits(self._hidden(p, m.quantizer.project(q.codes) + pos))
        out = mbaq_loss(teacher, student, p.text_targets != IGNORE, q.loss)
        usage = m.quantizer.usage()
        extra = {f"usage/{k}": torch.as_tensor(v, dtype=torch.float32).mean() for k, v in usage.items()}
        return LossBreakdown(out.total, {**out.parts, **extra})

    def _hidden(self, p: Packed, image_emb: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.ground(m.backbone.embed(p.ids), p.text_cells)
        B, T, D = x.shape
        emb = image_emb.reshape(-1, D)[p.inputs.src].to(x.dtype)
        x = x.reshape(B * T, D).index_copy(0, p.inputs.rows, emb).view(B, T, D)
        positions = m.rope_positions(p.positions, p.rope_offsets)
        return m.backbone(x, p.gen_mask, positions, attn_mask=m.attention_mask(p.attn_mask, p.image_span),
                           key_valid=p.valid).hidden


class MoMESystem(StageSystem):
    """Stage 2: the generation branch, AR head and visual projector learn to generate latent images (and,
    optionally, the und branch learns the interleaved tasks); AIA regularises the shared attention."""

    def __init__(self, model: LatentUMModel, cfg: TrainConfig):
        super().__init__(cfg)
        self.model = model
        bb = model.backbone
        trainable = [*bb.branch_parameters("gen"), model.head, model.visual_projector]
        if cfg.train_understanding:  # cell positions feed both branches, so they move only with und
            trainable += [*bb.branch_parameters("und"), *bb.shared_parameters(), model.cell_pos]
        set_trainable(model, trainable)

    def losses(self, p: Packed) -> LossBreakdown:
        m, cfg = self.model, self.cfg
        with_aia = cfg.aia.und_weight > 0 or cfg.aia.gen_weight > 0
        fwd = m.forward_packed(p, code_noise=cfg.code_noise, with_aia=with_aia)
        parts, total = {}, 0.0
        if len(p.code_query):
            h = fwd.hidden.reshape(-1, fwd.hidden.size(-1))[p.code_query]
            ids = fwd.latent_ids.reshape(-1, fwd.latent_ids.size(-1))[p.code_src]
            weight = 1.0 + (cfg.changed_weight - 1.0) * p.code_changed.float()
            code = m.head.loss(h, ids, weight)
            total = total + code.total
            parts.update({"code_ce": code.total, **{f"code/{k}": v for k, v in code.parts.items()}})
            logging = self.global_step % cfg.log_every == 0
            if logging and (~p.code_changed).any() and p.code_changed.any():
                with torch.no_grad():  # teacher-forced exactness of the tokens a move changes
                    hit = (m.head(h, ids).argmax(-1) == ids).all(-1)
                parts["code/acc_changed"] = hit[p.code_changed].float().mean()
        if cfg.train_understanding and (p.text_targets != IGNORE).any():
            ce, acc = text_loss(m, fwd.hidden, p.text_targets)
            total = total + ce
            parts.update(text_ce=ce, text_acc=acc)
        if with_aia:
            aia = aia_loss(fwd.attn_mass, p.task, p.aia_valid, cfg.aia)
            total = total + aia.total
            parts.update({"aia": aia.total, **{f"aia/{k}": v for k, v in aia.parts.items()}})
            self._log_intensity(fwd.attn_mass.detach(), p)
        return LossBreakdown(total, parts)

    def _log_intensity(self, mass: torch.Tensor, p: Packed) -> None:
        if self.global_step % self.cfg.log_every:
            return
        for task, name in ((0, "und"), (1, "gen")):
            sel = (p.task == task) & p.aia_valid
            if sel.any():
                for layer, v in enumerate(mass[:, sel].float().mean(1)):
                    self.log(f"intensity/{name}_L{layer}", v)


class DecoderSystem(StageSystem):
    """Stage 3: the pixel decoder learns codes -> pixels; it never sees the backbone.

    A batch is ``(pixels, styles, references)`` (``ImageStream``): uint8 canvases (B, H, W, 3), each image's
    render style (``Sample.meta["style"]``; None for Shapes images, the decoder's "none") and the uint8 canvas it
    started from (B, H, W, 3), encoded like the images (a ``reference`` decoder is conditioned on its codes). Older
    forms still train: ``(pixels, styles)`` makes every image its own reference, and a bare pixel tensor also
    trains the unknown style only; each warns once when the decoder would need what is missing."""

    def __init__(self, model: LatentUMModel, decoder_cfg: DecoderConfig, cfg: TrainConfig):
        super().__init__(cfg)
        self.model = model
        q = model.cfg.quantizer
        grid = model.cfg.encoder.grid
        self.decoder = (_trained_decoder(cfg.init_decoder, decoder_cfg, q.dim, grid) if cfg.init_decoder else
                        PixelDecoder(decoder_cfg, code_dim=q.dim, grid=grid))
        set_trainable(model, [])
        self._warned_styles = False
        self._warned_references = False

    def losses(self, batch) -> LossBreakdown:
        pixels, styles, references = self._unpack(batch)
        R = self.decoder.cfg.resolution
        codes, ref_codes = self._codes(pixels, references)
        x = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        if x.size(-1) != R:
            x = F.interpolate(x, size=(R, R), mode="area")
        weight = None
        if self.cfg.changed_weight != 1 and references is not None:
            changed = changed_cells(pixels, references, self.decoder.grid, R)  # (B, 1, R, R)
            weight = (1 + (self.cfg.changed_weight - 1) * changed).to(self.device)
        return self.decoder.loss(x.to(self.device), codes, self._style_labels(styles, x.size(0)), ref_codes,
                                 weight=weight)

    @staticmethod
    def _unpack(batch) -> tuple[torch.Tensor, list | None, torch.Tensor | None]:
        """A batch in any form this system takes -> (pixels, styles or None, references or None)."""
        if not isinstance(batch, (tuple, list)):
            return batch, None, None
        if len(batch) not in (2, 3):
            raise ValueError(f"a decoder batch must be pixels, (pixels, styles) or (pixels, styles, references), "
                             f"got a {type(batch).__name__} of {len(batch)}")
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None

    @torch.no_grad()
    def _codes(self, pixels: torch.Tensor, references: torch.Tensor | None):
        """Frozen encoder + MBAQ: codes (B, N, Dc) of the images and of their references (None when the decoder
        takes none, or the batch carries none: each image is then its own reference)."""
        m = self.model
        if not self.decoder.cfg.reference:
            return m.quantizer.codes_from_ids(m.image_ids(pixels)).float(), None
        if references is None:
            if not self._warned_references:
                from lightning.pytorch.utilities import rank_zero_warn

                self._warned_references = True
                rank_zero_warn("decoder batches carry no references: every image is its own; the image stream "
                               "should yield (pixels, styles, references)")
            return m.quantizer.codes_from_ids(m.image_ids(pixels)).float(), None
        if references.shape != pixels.shape:
            raise ValueError(f"batch references must be canvases like the pixels {tuple(pixels.shape)}, "
                             f"got {tuple(references.shape)}")
        both = m.quantizer.codes_from_ids(m.image_ids(torch.cat([pixels, references]))).float()  # (2B, N, Dc)
        return both.chunk(2)

    def _style_labels(self, styles: list[str | None] | None, batch: int) -> torch.Tensor | None:
        """Per-image style names -> labels (B,), each replaced by 0 ("none") with probability
        ``decoder.style_dropout`` so the unknown style keeps rendering boards; None for an unconditioned decoder."""
        if styles is None and self.decoder.conditioned and not self._warned_styles:
            from lightning.pytorch.utilities import rank_zero_warn

            self._warned_styles = True
            rank_zero_warn("decoder batches carry no styles: training the unknown style only; the image stream "
                           "should yield (pixels, styles)")
        labels = self.decoder.style_labels(styles, batch, argument="batch styles")
        if labels is None:
            return None
        drop = torch.rand(batch) < self.decoder.cfg.style_dropout  # torch's RNG, seeded by Lightning
        return labels.masked_fill(drop, 0).to(self.device)


def changed_cells(pixels: torch.Tensor, references: torch.Tensor, grid: int, resolution: int) -> torch.Tensor:
    """uint8 canvases (B, H, W, 3) and their references -> (B, 1, R, R) float, 1 on the pixels of the grid cells
    (``grid`` x ``grid`` over the canvas) where the two differ, 0 elsewhere."""
    diff = (pixels != references).any(-1).float()[:, None]  # (B, 1, H, W)
    cells = F.adaptive_max_pool2d(diff, grid)  # (B, 1, grid, grid)
    return F.interpolate(cells, size=resolution, mode="nearest")


def _trained_decoder(folder: str, cfg: DecoderConfig, code_dim: int, grid: int) -> PixelDecoder:
    """``TrainConfig.init_decoder``: the decoder saved in ``folder``, checked to be the recipe's; one saved
    without the recipe's ``summary`` grows it (``PixelDecoder.with_summary``)."""
    trained = PixelDecoder.from_pretrained(folder)
    if cfg.summary and trained.cfg == replace(cfg, summary=0):  # saved without the recipe's summary
        trained = trained.with_summary(cfg.summary)
    if (trained.cfg, trained.code_dim, trained.grid) != (cfg, code_dim, grid):
        raise ValueError(f"init_decoder {folder!r}: its config {trained.cfg} (code_dim {trained.code_dim}, grid "
                         f"{trained.grid}) differs from the recipe's decoder {cfg} (code_dim {code_dim}, grid {grid})")
    return trained
