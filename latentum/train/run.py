"""Run a recipe's stages with Lightning: build the stage system, fit (resuming if asked), export weights.

Folder layout under ``out``:  ``<stage>/checkpoints/last.ckpt`` (resume), ``<stage>/logs`` (CSV + TensorBoard)
and ``<stage>/export`` (the self-describing model folder the next stage starts from). ``out/model`` is the
final exported model with its ``decoder/``.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from latentum.api import LatentUM, save_model_folder
from latentum.config import STAGES, QuantizerConfig, RecipeConfig
from latentum.data.tokenizer import TextTokenizer
from latentum.data.worlds import default_tokenizer
from latentum.model.latentum import LatentUMModel
from latentum.model.quantizer import MBAQ
from latentum.train.data import ImageStream, packed_loader
from latentum.train.systems import DecoderSystem, MBAQSystem, MoMESystem, VLMSystem

PREVIOUS = {"vlm": None, "mbaq": "vlm", "mome": "mbaq", "decoder": "mbaq"}


class WeightDigest(Callback):
    """Writes a hash of the trained weights per rank, so a test can check DDP ranks stayed identical."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha256()
        for k, v in sorted(pl_module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        (self.folder / f"digest_rank{trainer.global_rank}.txt").write_text(h.hexdigest())


class StepPrinter(Callback):
    """One plain line every ``every`` steps (loss, s/step): readable in a nohup log, unlike a live bar."""

    def __init__(self, every: int):
        self.every, self.t0 = every, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.t0 is None:
            self.t0 = (time.time(), step)
        if step % self.every == 0 and trainer.is_global_zero:
            t, s = self.t0
            rate = (time.time() - t) / max(1, step - s)
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(f"[{pl_module.__class__.__name__}] step {step}/{trainer.max_steps} loss {loss:.4f} "
                  f"{rate:.2f} s/step", flush=True)


def init_folder(recipe: RecipeConfig, out: Path, stage: str) -> Path | None:
    """The exported model a stage starts from: ``init_from`` if set, else the previous stage's export."""
    cfg = recipe.stages[stage]
    if cfg.init_from:
        return Path(cfg.init_from)
    prev = PREVIOUS[stage]
    return out / prev / "export" if prev else None


def build_model(recipe: RecipeConfig, out: Path, stage: str) -> LatentUMModel:
    """Stage 0 starts fresh; later stages load the previous stage's export (weights, not optimiser state)."""
    folder = init_folder(recipe, out, stage)
    if folder is None:
        cfg = copy.deepcopy(recipe.model)
        cfg.backbone.vocab_size = default_tokenizer().vocab_size
        return LatentUMModel(cfg)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage!r} starts from {folder}, which holds no exported model; "
                                f"train stage {PREVIOUS[stage]!r} first (latentum train --stage {PREVIOUS[stage]})")
    model = LatentUM.from_pretrained(folder).model
    if recipe.model.ground_coordinates:  # a recipe can switch it on for the model it continues
        model.cfg.ground_coordinates = True
    cfg = recipe.stages[stage]
    if stage == "mbaq" and cfg.fresh_quantizer:
        model.quantizer = fresh_quantizer(model, recipe.model.quantizer)
    if stage == "mome" and cfg.init_generation:
        model.backbone.init_generation_branch()  # LatentUM: the gen branch starts as a copy of und
    if stage == "mome" and (cfg.init_generation if cfg.init_projector is None else cfg.init_projector):
        model.init_visual_projector()  # latents start out read like MBAQ's quantized features
    return model


def fresh_quantizer(model: LatentUMModel, qcfg: QuantizerConfig) -> MBAQ:
    """A new MBAQ from the recipe's quantizer config for a trained model. Its code shapes must be the model's,
    since a stage 2 that continues the model predicts and reads codes of that shape."""
    old = model.cfg.quantizer
    fields = ("codebooks", "codebook_size", "code_dim", "hidden_dim")
    shape, want = tuple(getattr(old, k) for k in fields), tuple(getattr(qcfg, k) for k in fields)
    if shape != want:
        raise ValueError(f"fresh_quantizer: the recipe's quantizer {fields} = {want} "
                         f"must match the loaded model's {shape}")
    model.cfg.quantizer = copy.deepcopy(qcfg)
    return MBAQ(model.cfg.quantizer, model.quantizer.feature_dim, model.quantizer.out_dim)


def train_stage(recipe: RecipeConfig, stage: str, out: str | Path, *, resume: bool = False,
                num_workers: int = 0, progress: bool = True) -> Path:
    if stage not in recipe.stages:
        raise ValueError(f"recipe {recipe.name!r} has no stage {stage!r}; it has {sorted(recipe.stages)}")
    cfg = recipe.stages[stage]
    out = Path(out)
    folder = out / stage
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(recipe, out, stage)
    start = init_folder(recipe, out, stage)
    tok = TextTokenizer.load(start) if start else default_tokenizer()
    system = (DecoderSystem(model, recipe.decoder, cfg) if stage == "decoder" else
              {"vlm": VLMSystem, "mbaq": MBAQSystem, "mome": MoMESystem}[stage](model, cfg))
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt_path = str(ckpt) if resume and ckpt.is_file() else None
    restart = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] if ckpt_path else 0
    trainer = L.Trainer(
        accelerator="auto", devices=cfg.devices, strategy=cfg.strategy, precision=cfg.precision,
        max_steps=cfg.steps, gradient_clip_val=cfg.grad_clip, log_every_n_steps=cfg.log_every,
        logger=[CSVLogger(folder, name="logs", flush_logs_every_n_steps=cfg.log_every),
                TensorBoardLogger(folder, name="tb")],
        callbacks=[ModelCheckpoint(folder / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every,
                                   enable_version_counter=False),
                   WeightDigest(folder), StepPrinter(cfg.log_every)],
        enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
        limit_val_batches=0, num_sanity_val_steps=0)
    canvas = recipe.model.encoder.image_size
    rank = trainer.global_rank
    loader = (torch.utils.data.DataLoader(ImageStream(cfg, canvas, rank, restart), batch_size=None,
                                          num_workers=num_workers)
              if stage == "decoder" else
              packed_loader(cfg, tok, recipe.model.encoder.grid, canvas, rank, restart, num_workers))
    t0 = time.time()
    trainer.fit(system, train_dataloaders=loader, ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        export = folder / "export"
        if stage == "decoder":
            system.decoder.save_pretrained(export)
        else:
            save_model_folder(model, tok, export)
        (folder / "time.txt").write_text(f"{time.time() - t0:.1f}\n")
    return folder / "export"


def assemble(out: str | Path, model_stage: str = "mome") -> Path:
    """Copy the final backbone export and the decoder export into ``out/model`` (one loadable folder)."""
    out = Path(out)
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / model_stage / "export", final)
    if (out / "decoder" / "export").is_dir():
        shutil.copytree(out / "decoder" / "export", final / "decoder")
    return final


def train_all(recipe: RecipeConfig, out: str | Path, *, resume: bool = False, num_workers: int = 0,
              stages: list[str] | None = None, progress: bool = True) -> Path:
    for stage in stages or [s for s in STAGES if s in recipe.stages]:
        train_stage(recipe, stage, out, resume=resume, num_workers=num_workers, progress=progress)
    return assemble(out, "mome" if "mome" in recipe.stages else "mbaq")
