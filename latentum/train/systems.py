"""One LightningModule per stage. They own the loop; the models they wrap never import Lightning.

| stage   | trains                                             | frozen                        |
|---------|----------------------------------------------------|-------------------------------|
| vlm     | encoder, feature projector, backbone und + shared  | quantizer, gen branch, heads  |
| mbaq    | quantizer                                          | everything else (the teacher) |
| mome    | gen branch, AR head, visual projector (+ und/shared)| encoder, projector, quantizer |
| decoder | pixel decoder                                      | the whole LatentUMModel       |
"""

from __future__ import annotations

import copy
import dataclasses
import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from latentum.checkpoint import load_decoder_folder
from latentum.config import DecoderConfig, QuantizerConfig
from latentum.data.packing import IGNORE, Packed
from latentum.losses.aia import aia_loss
from latentum.losses.behaviour import mbaq_loss
from latentum.losses.pixels import diffusion_loss
from latentum.losses.tokens import code_loss, sample_weights
from latentum.losses.tokens import text_loss as token_text_loss
from latentum.model.decoder import PixelDecoder, train_scheduler
from latentum.model.grow import grow_decoder
from latentum.model.latentum import LatentUMModel
from latentum.model.quantizer import code_distances
from latentum.train.config import DecoderStageConfig, MBAQConfig, MoMEConfig, StageConfig, VLMConfig
from latentum.train.lora import train_adapters_only
from latentum.types import LossBreakdown
from latentum.worlds.registry import make_sample


def set_trainable(model: torch.nn.Module, trainable: list[torch.nn.Module | torch.nn.Parameter]) -> None:
    """Freeze everything in ``model`` except the given modules/parameters."""
    model.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)


class StageSystem(L.LightningModule):
    """Shared optimiser, schedule and logging; subclasses define ``losses(batch) -> LossBreakdown``."""

    def __init__(self, cfg: StageConfig):
        super().__init__()
        self.cfg = cfg

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The global RNG (code noise, style dropout, diffusion noise, dead-code revival) resumes where it was, so
        # a killed leg resumed from its checkpoint ends bit-identical to an uninterrupted one.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

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
        return out.total + self._every_parameter()

    def _every_parameter(self) -> torch.Tensor:
        """0, as a sum over one element of every trained parameter: each then takes part in the backward pass
        (a zero gradient where the batch did not use it). Under DDP every rank must produce a gradient for every
        trained parameter; a rank whose batch holds no generation tokens (or no image to predict) would leave
        the gen branch or the AR head out and wait for the others forever (issue #31)."""
        if not hasattr(self, "_trained"):  # fixed once training runs (after any strategy wrapped the model)
            self._trained = [p for p in self.parameters() if p.requires_grad]
        if not self._trained:
            return torch.zeros((), device=self.device)
        return 0.0 * torch.stack([p.reshape(-1)[0].float() for p in self._trained]).sum()

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


def text_loss(model: LatentUMModel, hidden: torch.Tensor, targets: torch.Tensor, weighting: str = "token"
              ) -> LossBreakdown:
    """``losses.tokens.text_loss`` on the supervised text positions of a packed batch, each position weighing the
    same (``weighting="token"``) or each sample (``"sample"``, see ``PackedStageConfig.text_weighting``)."""
    sel = targets != IGNORE
    weight = sample_weights(sel) if weighting == "sample" else None
    return token_text_loss(model.backbone.logits(hidden[sel]), targets[sel], weight)


class VLMSystem(StageSystem):
    """Stage 0: the base VLM learns understanding QA with continuous image features."""

    def __init__(self, model: LatentUMModel, cfg: VLMConfig):
        super().__init__(cfg)
        self.model = model
        bb = model.backbone
        set_trainable(model, [*([model.encoder] if cfg.train_encoder else []), model.feature_projector,
                              model.cell_pos, *bb.branch_parameters("und"), *bb.shared_parameters()])
        # The encoder as loaded (keep_features), out of the module tree, taken here: a resumed leg's checkpoint is
        # restored before on_fit_start, and the reference must stay the weights the leg started from.
        self._reference = ([copy.deepcopy(model.encoder).eval().requires_grad_(False)]
                           if cfg.keep_features is not None else [])

    def on_fit_start(self):
        for r in self._reference:
            r.to(self.device)

    def losses(self, p: Packed) -> LossBreakdown:
        fwd = self.model.forward_packed(p)
        out = text_loss(self.model, fwd.hidden, p.text_targets, self.cfg.text_weighting)
        if not self._reference:
            return out
        kf, m = self.cfg.keep_features, self.model
        rng = np.random.default_rng([self.cfg.seed, 9, self.global_step, self.global_rank])
        pixels = kept_images(self.cfg, kf.tasks, m.cfg.encoder.image_size, rng, kf.images)
        feats = m.image_features(pixels)
        with torch.no_grad():
            enc = self._reference[0]
            ref = enc(enc.preprocess(pixels).to(m.device))
        mse = F.mse_loss(feats.float(), ref.float())
        return LossBreakdown(out.total + kf.weight * mse, {**out.parts, "keep/feature_mse": mse.detach()})


class MBAQSystem(StageSystem):
    """Stage 1: the quantizer learns to make the frozen VLM behave the same on quantized features. The VLM is the
    model itself, or a ``teacher`` (``MBAQConfig.teacher``) that sees the images through its own encoder; with
    ``keep_codes`` the images of some tasks keep the codes they had (``KeepCodesConfig``). A quantizer with grown
    codebooks (``QuantizerConfig.grown_codebooks``) trains only them: their head, their codebooks but code 0 and
    the up-projection's columns for them; everything else stays as loaded."""

    def __init__(self, model: LatentUMModel, cfg: MBAQConfig, teacher: LatentUMModel | None = None):
        super().__init__(cfg)
        self.model = model
        q = model.quantizer
        if q.grown is not None and cfg.teacher_encoder:
            raise ValueError("teacher_encoder: a quantizer with grown codebooks keeps the encoder its old codes come "
                             "from")
        if q.grown is not None and cfg.strategy == "fsdp":
            raise ValueError("strategy: fsdp shards the quantizer; one with grown codebooks keeps parts of its weights "
                             "in place, train it with ddp or auto")
        if teacher is not None and teacher.cfg.encoder != model.cfg.encoder:
            raise ValueError(f"teacher: its encoder config {teacher.cfg.encoder} differs from the trained model's "
                             f"{model.cfg.encoder}; only its weights may differ")
        # Held in lists, out of the module tree: none is trained, checkpointed nor exported. The encoder as loaded is
        # keep_codes' reference (a teacher's may replace it).
        self._old_encoder = ([copy.deepcopy(model.encoder).eval().requires_grad_(False)]
                             if cfg.keep_codes is not None else [])
        if teacher is not None and cfg.teacher_encoder:
            model.encoder.load_state_dict(teacher.encoder.state_dict())
        # a teacher with another encoder sees through it; with the same one, the student's features serve both
        self._teacher_view = teacher is not None and not _same_encoder(model, teacher)
        set_trainable(model, [q] if q.grown is None else [q.grown, q.vq, q.up[0].weight])
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        # [reference quantizer], taken from the weights the leg starts from (a resumed leg's checkpoint is restored
        # later, before on_fit_start), and the (G, K) bool codebook rows that stay as they are
        self._keep: list = [copy.deepcopy(q).eval().requires_grad_(False)] if self._frozen_rows_needed() else []
        self._frozen = self._start_freezing() if self._keep else None

    @property
    def vlm(self) -> LatentUMModel:
        return self._teacher[0] if self._teacher else self.model

    def on_fit_start(self):
        if self.trainer.world_size > 1:  # every process keeps the same codebook
            self.model.quantizer.sync_across_processes()
        for module in [*self._teacher, *self._old_encoder, *self._keep]:
            module.to(self.device)
        if self._frozen is not None:
            self._frozen = self._frozen.to(self.device)

    def losses(self, p: Packed) -> LossBreakdown:
        m, vlm = self.model, self.vlm
        feats = m.image_features(p.inputs.pixels).detach()
        pos = vlm.canvas_positions().detach()  # (C, D), added to both views as input_embeddings does
        with torch.no_grad():
            seen = vlm.image_features(p.inputs.pixels) if self._teacher_view else feats
            seen = vlm.forward_packed(p, input_embeddings=vlm.feature_projector(seen) + pos).hidden
            teacher = vlm.backbone.logits(seen)
        q = m.quantizer.encode(feats)
        student = vlm.backbone.logits(vlm.forward_packed(p, input_embeddings=m.quantizer.project(q.codes) + pos).hidden)
        out = mbaq_loss(teacher, student, p.text_targets != IGNORE, q.loss)
        usage = {f"usage/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in m.quantizer.usage().items()}
        parts = {**out.parts, **usage}
        total = out.total
        if self.cfg.keep_codes is not None:
            keep = self._keep_loss()
            total = total + self.cfg.keep_codes.weight * keep.total
            parts.update(keep.parts)
        return LossBreakdown(total, parts)

    # -- frozen codebook rows and keep_codes -----------------------------------------------------------------

    def _frozen_rows_needed(self) -> bool:
        """Whether some codebook rows stay as loaded (``keep_codes``, or grown codebooks beside old ones)."""
        return self.cfg.keep_codes is not None or self.model.quantizer.grown is not None

    def _keep_images(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return kept_images(self.cfg, self.cfg.keep_codes.tasks, self.model.cfg.encoder.image_size, rng, n)

    @torch.no_grad()
    def _start_freezing(self) -> torch.Tensor:
        """The (G, K) codebook rows that stay as loaded: the rows the kept tasks' images use (``keep_codes``), every
        row of a codebook that was not grown and code 0 of a grown one (a quantizer with grown codebooks)."""
        ref, kc = self._keep[0], self.cfg.keep_codes
        G, G0, K = ref.cfg.codebooks, ref.cfg.base_codebooks, ref.cfg.codebook_size
        frozen = torch.zeros(G, K, dtype=torch.bool, device=ref.usage_ema.device)
        if ref.grown is not None:  # every row a kept image can use: the old ones and code 0 of the grown ones
            frozen[:G0], frozen[G0:, 0] = True, True
        elif kc is not None:
            images = self._keep_images(np.random.default_rng([self.cfg.seed, 7]), kc.probe_images)
            ids = torch.cat([self._kept_ids(ref.latents(self._old_features(images[i:i + 64])))[1]
                             for i in range(0, len(images), 64)])
            for g in range(G):
                frozen[g, ids[..., g].unique()] = True
        return frozen

    def _kept_ids(self, z_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference latents z_ref (I, N, D) of kept images -> (the latents to keep (I, N, D), their ids (I, N,
        G)): as they were, except that a grown codebook's chunk is its code 0, the zero vector."""
        ref = self._keep[0]
        if ref.grown is not None:
            z_ref = z_ref.clone()
            z_ref[..., ref.cfg.base_codebooks * ref.cfg.code_dim:] = 0
        return z_ref, code_distances(ref.vq.codebook, z_ref).argmin(-1)

    def _keep_loss(self) -> LossBreakdown:
        """The kept tasks' latents: MSE to where they were, plus a margin that keeps every code they did not use
        (the rows free to train) at least ``keep_codes.margin`` (squared distance) farther than the code they had,
        so no new code takes them over. Logs the share of their ids unchanged."""
        m, (ref,), kc = self.model, self._keep, self.cfg.keep_codes
        rng = np.random.default_rng([self.cfg.seed, 8, self.global_step, self.global_rank])
        images = self._keep_images(rng, kc.images)
        q = m.quantizer
        z = q.latents(m.image_features(images).detach()).float()  # (I, N, D)
        with torch.no_grad():
            z_ref, ids = self._kept_ids(ref.latents(self._old_features(images)).float())  # the codes to keep
        d2 = code_distances(q.vq.codebook, z)  # (I, N, G, K)
        G0 = q.cfg.base_codebooks if q.grown is not None else 0  # the codebooks that can move: the grown ones, or all
        same = (d2.detach().argmin(-1) == ids)[..., G0:].float().mean()
        own = d2.gather(-1, ids[..., None])  # (I, N, G, 1)
        new = (~self._frozen).expand_as(d2)  # the rows free to move: the kept latents' neighbours among the frozen stay
        margin = F.relu(own + kc.margin - d2)[new].mean() if new.any() else d2.new_zeros(())
        mse = F.mse_loss(z[..., G0 * q.cfg.code_dim:], z_ref[..., G0 * q.cfg.code_dim:])
        return LossBreakdown(mse + margin, {"keep/latent_mse": mse.detach(), "keep/margin": margin.detach(),
                                            "keep/same_ids": same})

    @torch.no_grad()
    def _old_features(self, pixels: np.ndarray) -> torch.Tensor:
        """Features of the encoder the leg started with (the teacher's may have replaced it)."""
        enc = self._old_encoder[0] if self._old_encoder else self.model.encoder
        return enc(enc.preprocess(pixels).to(next(enc.parameters()).device))

    def on_train_batch_start(self, batch, batch_idx):
        if self._frozen is not None:  # frozen rows never count as dead (the library would replace them)
            cb = self.model.quantizer.vq._codebook
            bar = 2.0 * max(float(cb.threshold_ema_dead_code), 1.0)
            cb.cluster_size.data[self._frozen] = cb.cluster_size.data[self._frozen].clamp_min(bar)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._frozen is None:
            return
        q, ref = self.model.quantizer, self._keep[0]  # frozen rows stay exactly as loaded (no gradient, no decay)
        q.vq._codebook.embed.data[self._frozen] = ref.vq._codebook.embed.data[self._frozen]
        if q.grown is not None:  # and the up-projection's columns for the old codebooks
            old = slice(0, q.cfg.base_codebooks * q.cfg.code_dim)
            q.up[0].weight.data[:, old] = ref.up[0].weight.data[:, old]
            if self.cfg.keep_codes is not None and self.cfg.keep_codes.zero_ball > 0:
                _out_of_ball(q.vq._codebook.embed.data[q.cfg.base_codebooks:, 1:], self.cfg.keep_codes.zero_ball)


def _out_of_ball(codes: torch.Tensor, radius2: float) -> None:
    """Scale every code (..., d) whose squared norm is below ``radius2`` out to it, in place."""
    norm = codes.norm(dim=-1, keepdim=True)
    codes.mul_((radius2**0.5 / norm.clamp_min(1e-12)).clamp_min(1.0))


def kept_images(cfg: StageConfig, tasks: dict[str, float], canvas: int, rng: np.random.Generator,
                n: int) -> np.ndarray:
    """(n, H, W, 3) images of samples of ``tasks`` drawn by weight (every image of a sample, inputs and targets),
    with the leg's FrozenLake map sizes."""
    names = list(tasks)
    weights = np.array([tasks[t] for t in names], dtype=float)
    sizes = cfg.worlds.get("frozenlake", {}).get("map_sizes")
    images: list[np.ndarray] = []
    while len(images) < n:
        task = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        sample = make_sample(task, rng, canvas=canvas, **({"map_sizes": sizes} if sizes else {}))
        images += [np.asarray(x) for x in sample.images]
    return np.stack(images[:n])


def _same_encoder(model: LatentUMModel, teacher: LatentUMModel) -> bool:
    a, b = model.encoder.state_dict(), teacher.encoder.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class MoMESystem(StageSystem):
    """Stage 2: the generation branch, AR head and visual projector learn to generate latent images (and,
    optionally, the und branch learns the interleaved tasks); AIA regularises the shared attention."""

    def __init__(self, model: LatentUMModel, cfg: MoMEConfig):
        super().__init__(cfg)
        self.model = model
        bb = model.backbone
        trainable = [*bb.branch_parameters("gen"), model.head, model.visual_projector]
        if cfg.train_understanding:  # cell positions feed both branches, so they move only with und
            trainable += [*bb.branch_parameters("und"), *bb.shared_parameters(), model.cell_pos]
        set_trainable(model, trainable)
        train_adapters_only(model)  # with LoRA (``MoMEConfig.lora``): its adapters instead of the weights

    def losses(self, p: Packed) -> LossBreakdown:
        m, cfg = self.model, self.cfg
        with_aia = cfg.aia.und_weight > 0 or cfg.aia.gen_weight > 0
        fwd = m.forward_packed(p, code_noise=cfg.code_noise, with_aia=with_aia)
        parts, total = {}, 0.0
        if len(p.code_query):
            h = fwd.hidden.reshape(-1, fwd.hidden.size(-1))[p.code_query]
            ids = fwd.latent_ids.reshape(-1, fwd.latent_ids.size(-1))[p.code_src]
            weight = 1.0 + (cfg.changed_weight - 1.0) * p.code_changed.float()
            logits = m.head(h, ids)  # (M, G, K), teacher-forced
            code = code_loss(logits, ids, weight)
            total = total + code.total
            parts.update({"code_ce": code.total, **{f"code/{k}": v for k, v in code.parts.items()}})
            if (~p.code_changed).any() and p.code_changed.any():  # exactness of the tokens a change made
                hit = (logits.detach().argmax(-1) == ids).all(-1)
                parts["code/acc_changed"] = hit[p.code_changed].float().mean()
        if cfg.train_understanding and (p.text_targets != IGNORE).any():
            text = text_loss(m, fwd.hidden, p.text_targets, cfg.text_weighting)
            total = total + text.total
            parts.update(text.parts)
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
    render style (``Sample.meta["style"]``; None: unknown) and the uint8 canvas it started from (B, H, W, 3),
    encoded like the images."""

    def __init__(self, model: LatentUMModel, decoder_cfg: DecoderConfig, cfg: DecoderStageConfig,
                 init_decoder: str | None = None):
        super().__init__(cfg)
        self.model = model
        q = model.cfg.quantizer
        grid = model.cfg.encoder.grid
        init = init_decoder or cfg.init_decoder  # the runner resolves a leg's name to its decoder folder
        self.decoder = (_trained_decoder(init, decoder_cfg, q, grid) if init else
                        PixelDecoder(decoder_cfg, code_dim=q.dim, grid=grid))
        self.noise_scheduler = train_scheduler(decoder_cfg)
        set_trainable(model, [])

    def losses(self, batch) -> LossBreakdown:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise ValueError("a decoder batch must be (pixels, styles, references) (train.data.ImageStream)")
        pixels, styles, references = batch
        if references.shape != pixels.shape:
            raise ValueError(f"batch references must be canvases like the pixels {tuple(pixels.shape)}, "
                             f"got {tuple(references.shape)}")
        R = self.decoder.cfg.resolution
        codes, ref_codes = self._codes(pixels, references)
        x = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        if x.size(-1) != R:
            x = F.interpolate(x, size=(R, R), mode="area")
        weight = None
        if self.cfg.changed_weight != 1:
            changed = changed_cells(pixels, references, self.decoder.grid, R)  # (B, 1, R, R)
            weight = (1 + (self.cfg.changed_weight - 1) * changed).to(self.device)
        if self.cfg.edge_weight != 1:
            edges = (1 + (self.cfg.edge_weight - 1) * edge_pixels(x)).to(self.device)  # (B, 1, R, R)
            weight = edges if weight is None else weight * edges
        return diffusion_loss(self.decoder, self.noise_scheduler, x.to(self.device), codes,
                              self._style_labels(styles, x.size(0)), ref_codes, weight=weight)

    @torch.no_grad()
    def _codes(self, pixels: torch.Tensor, references: torch.Tensor):
        """Frozen encoder + MBAQ: codes (B, N, Dc) of the images and of their references."""
        m = self.model
        both = m.quantizer.codes_from_ids(m.image_ids(torch.cat([pixels, references]))).float()  # (2B, N, Dc)
        return both.chunk(2)

    def _style_labels(self, styles: list[str | None], batch: int) -> torch.Tensor:
        """Per-image style names -> labels (B,), each replaced by 0 ("none") with probability
        ``decoder.style_dropout`` so the unknown style keeps rendering."""
        labels = self.decoder.style_labels(styles, batch, argument="batch styles")
        drop = torch.rand(batch) < self.decoder.cfg.style_dropout  # torch's RNG, seeded by Lightning
        return labels.masked_fill(drop, 0).to(self.device)


def changed_cells(pixels: torch.Tensor, references: torch.Tensor, grid: int, resolution: int) -> torch.Tensor:
    """uint8 canvases (B, H, W, 3) and their references -> (B, 1, R, R) float, 1 on the pixels of the grid cells
    (``grid`` x ``grid`` over the canvas) where the two differ, 0 elsewhere."""
    diff = (pixels != references).any(-1).float()[:, None]  # (B, 1, H, W)
    cells = F.adaptive_max_pool2d(diff, grid)  # (B, 1, grid, grid)
    return F.interpolate(cells, size=resolution, mode="nearest")


def edge_pixels(images: torch.Tensor, threshold: float = 0.1, reach: int = 2) -> torch.Tensor:
    """images (B, 3, R, R) in [-1, 1] -> (B, 1, R, R) float, 1 on the pixels within ``reach`` pixels (diagonals
    included) of a colour change: a channel whose range over that window exceeds ``threshold``; 0 elsewhere."""
    k = 2 * reach + 1
    spread = F.max_pool2d(images, k, stride=1, padding=reach) + F.max_pool2d(-images, k, stride=1, padding=reach)
    return (spread.amax(1, keepdim=True) > threshold).float()


RETARGETABLE = ("prediction_type", "inference_steps")
"""Decoder fields a continued decoder may change: what its output is trained to be and how many steps sample it,
not the shapes of its weights."""


def _trained_decoder(folder: str, cfg: DecoderConfig, q: QuantizerConfig, grid: int) -> PixelDecoder:
    """``DecoderStageConfig.init_decoder``: the decoder saved in ``folder``, checked to be the recipe's but for
    ``RETARGETABLE`` fields, which it takes from the recipe. A decoder of the code vector the quantizer had before
    it grew codebooks (``q.grown_codebooks``) is grown to the new one (``model.grow.grow_decoder``)."""
    trained = load_decoder_folder(folder)
    same = dataclasses.replace(trained.cfg, **{k: getattr(cfg, k) for k in RETARGETABLE})
    before = q.base_codebooks * q.code_dim
    if same != cfg or trained.grid != grid or trained.code_dim not in {q.dim, before}:
        raise ValueError(f"init_decoder {folder!r}: its config {trained.cfg} (code_dim {trained.code_dim}, grid "
                         f"{trained.grid}) differs from the recipe's decoder {cfg} (code_dim {q.dim}"
                         f"{f' or {before} before the quantizer grew' if q.grown_codebooks else ''}, grid {grid})")
    if trained.code_dim != q.dim:
        trained = grow_decoder(trained, q.dim)
    trained.cfg = cfg
    return trained
