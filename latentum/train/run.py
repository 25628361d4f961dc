"""Run a recipe's legs in order with Lightning: build the leg's model, system and data (``train.stages``), fit
(resuming if asked), export. The runner knows no stage by name.

Folders under ``out``: ``<leg>/checkpoints/last.ckpt`` (resume), ``<leg>/logs`` (CSV), ``<leg>/tb``
(TensorBoard), ``<leg>/export`` (the model or decoder folder later legs start from) and ``model/``: the last
model leg's export with the last decoder leg's export as ``decoder/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.strategies.fsdp import _get_full_state_dict_context  # Lightning's own gather
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from latentum.checkpoint import write_folder_atomically
from latentum.data.hf_tokenizer import AnyTokenizer, load_tokenizer
from latentum.data.tokenizer import SPECIALS, TextTokenizer
from latentum.model.backbone import MoMELayer
from latentum.train.config import Leg, RecipeConfig, StageConfig, recipe_to_data
from latentum.train.precision import resolve_precision
from latentum.train.stages import STAGES, existing_start
from latentum.worlds.registry import default_tokenizer

LAST = "last.ckpt"


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


def train_leg(recipe: RecipeConfig, leg_name: str, out: str | Path, *, resume: bool = False,
              overwrite: bool = False, num_workers: int = 0, progress: bool = True,
              callbacks: list[Callback] | None = None) -> Path:
    """Train one leg and export it; returns its export folder. A leg that already has a run is continued with
    ``resume`` (from ``checkpoints/last.ckpt``, bit-identical to an uninterrupted run: the data stream and the
    RNG restart where they were) or started over with ``overwrite``; with neither it is refused."""
    leg = recipe.leg(leg_name)
    cfg, stage = leg.config, STAGES[leg.stage]
    out = Path(out)
    folder = out / leg.name
    ckpt = folder / "checkpoints" / LAST
    _check_run_folder(folder, leg, resume, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = existing_start(recipe, leg, out)
    model = stage.build(recipe, cfg, start)
    tok = load_tokenizer(start) if start else default_tokenizer()
    if cfg.grow_vocabulary:
        tok = grow_vocabulary(model, tok)
    system = stage.system(model, recipe, cfg, {x.name: out / x.name / "export" for x in recipe.legs})
    ckpt_path = str(ckpt) if resume and ckpt.is_file() else None
    start_step = _checkpoint_step(ckpt) if ckpt_path else 0
    trainer = L.Trainer(
        accelerator="auto", devices=cfg.devices, strategy=strategy(cfg), precision=resolve_precision(cfg.precision),
        max_steps=cfg.steps, gradient_clip_val=cfg.grad_clip, log_every_n_steps=cfg.log_every,
        logger=[CSVLogger(folder, name="logs", flush_logs_every_n_steps=cfg.log_every),
                TensorBoardLogger(folder, name="tb")],
        callbacks=[ModelCheckpoint(folder / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every,
                                   enable_version_counter=False),
                   WeightDigest(folder), StepPrinter(cfg.log_every), StopEveryRank(), *(callbacks or [])],
        enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
        limit_val_batches=0, num_sanity_val_steps=0)
    loader = stage.loader(model.cfg.encoder, cfg, tok, trainer.global_rank, start_step, num_workers)
    t0 = time.time()
    trainer.fit(system, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
    state = full_state_dict(trainer)  # a collective under FSDP: every rank takes part
    if trainer.global_rank == 0:
        stage.export(system, tok, folder / "export", origin(recipe, leg), state)
        (folder / "time.txt").write_text(f"{time.time() - t0:.1f}\n")
    if trainer.world_size > 1:
        trainer.strategy.barrier("export")  # every rank waits until the export the next leg starts from exists
    return folder / "export"


def grow_vocabulary(model, tok: AnyTokenizer) -> AnyTokenizer:
    """``tok`` with the built-in worlds' words it lacks, and ``model``'s embedding grown to match."""
    if not isinstance(tok, TextTokenizer):
        raise ValueError("grow_vocabulary: only the built-in word-level tokenizer grows; a pretrained model's "
                         "tokenizer already has its words")
    tok = tok.extended(w for w in default_tokenizer().tokenizer.get_vocab() if w not in SPECIALS)
    model.backbone.grow_vocabulary(max(tok.vocab_size, model.backbone.embedding.num_embeddings))
    return tok


def strategy(cfg: StageConfig):
    """Lightning's strategy for a leg, its collectives timing out after ``collective_timeout`` seconds (a rank
    that died or stalled stops the run with an error, never a hang). DDP replicates the model; FSDP shards it
    one backbone layer per unit (mixed precision follows the leg's ``precision``), optionally recomputing each
    layer's activations, and checkpoints each rank's shard; only trained parameters hold optimizer state."""
    timeout = timedelta(seconds=cfg.collective_timeout)
    if cfg.strategy in ("ddp", "ddp_spawn"):
        return DDPStrategy(timeout=timeout, start_method="spawn" if cfg.strategy == "ddp_spawn" else "popen")
    if cfg.strategy == "fsdp":
        return FSDPStrategy(auto_wrap_policy={MoMELayer}, state_dict_type="sharded", timeout=timeout,
                            activation_checkpointing_policy={MoMELayer} if cfg.activation_checkpointing else None)
    return cfg.strategy


class StopEveryRank(Callback):
    """In a multi-process run, SIGTERM or Ctrl-C in any rank stops every rank at once (exit 128 + signal): the
    launching rank kills the ranks it started, another rank passes the signal to it. Lightning's own SIGTERM
    handler broadcasts from inside the handler, which deadlocks (or dies of a reset connection) against a
    gradient all-reduce in flight; this one replaces it once training starts. The leg then resumes from its last
    checkpoint with --resume, as after kill -9."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.before: dict = {}

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            self.before = {s: signal.signal(s, self._stop(trainer)) for s in self.SIGNALS}

    def teardown(self, trainer, pl_module, stage):
        for s, handler in self.before.items():
            signal.signal(s, handler)
        self.before = {}

    @staticmethod
    def _stop(trainer):
        def stop(signum, frame):
            procs = getattr(trainer.strategy.launcher, "procs", None) or []  # the ranks this one started
            for proc in procs:
                proc.kill()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except Exception:  # never let reaping keep this rank from stopping
                    pass
            if trainer.local_rank != 0:
                os.kill(os.getppid(), signal.SIGTERM)
            print(f"[rank {trainer.global_rank}] stopped by signal {signum}; continue with --resume",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        return stop


def full_state_dict(trainer: L.Trainer) -> dict | None:
    """Under FSDP, the whole model's state dict gathered on rank 0 (shards live on every rank; checkpoints stay
    sharded); None for strategies whose modules hold their full weights."""
    strat = trainer.strategy
    if not isinstance(strat, FSDPStrategy):
        return None
    with _get_full_state_dict_context(strat.model, world_size=strat.world_size):
        return strat.model.state_dict()


def _check_run_folder(folder: Path, leg: Leg, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both")
    started = (folder / "checkpoints" / LAST).is_file() or (folder / "export").exists()
    if not started:
        return
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)  # every rank of a multi-process run clears it at once
    elif not resume:
        raise ValueError(f"leg {leg.name!r} already has a run in {str(folder)!r}; pass --resume to continue it "
                         f"or --overwrite to start it over")


def _checkpoint_step(ckpt: Path) -> int:
    """The global step a checkpoint was saved at (loaded without unpickling code: ``weights_only``)."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{str(ckpt)!r} is not a readable training checkpoint ({e}); pass --overwrite to start "
                         f"the leg over") from None


def origin(recipe: RecipeConfig, leg: Leg) -> dict:
    """Where an export came from: the recipe, the leg and the git commit of the code that trained it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"recipe": recipe.name, "leg": leg.name, "stage": leg.stage, "git_commit": commit,
            "recipe_config": recipe_to_data(recipe)}


def assemble(recipe: RecipeConfig, out: str | Path) -> Path:
    """``out/model``: the last model leg's export with the last decoder leg's export as ``decoder/``. Written by
    rank 0 only: in a multi-process run every rank gets here, and two ranks replacing one folder at once fail."""
    out = Path(out)
    if rank_zero_only.rank != 0:  # the Trainer set it to this process's global rank
        return out / "model"
    model_legs = [x for x in recipe.legs if STAGES[x.stage].exports_model]
    decoder_legs = [x for x in recipe.legs if not STAGES[x.stage].exports_model]
    if not model_legs:
        raise ValueError(f"recipe {recipe.name!r} has no leg that exports a model")

    def write(tmp: Path) -> None:
        shutil.copytree(out / model_legs[-1].name / "export", tmp, dirs_exist_ok=True)
        if decoder_legs and (out / decoder_legs[-1].name / "export").is_dir():
            shutil.copytree(out / decoder_legs[-1].name / "export", tmp / "decoder")

    return write_folder_atomically(out / "model", write)


def train_recipe(recipe: RecipeConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 num_workers: int = 0, legs: list[str] | None = None, progress: bool = True) -> Path:
    """Train ``legs`` (default: all, in order), then assemble ``out/model``."""
    for name in legs or [x.name for x in recipe.legs]:
        train_leg(recipe, name, out, resume=resume, overwrite=overwrite, num_workers=num_workers,
                  progress=progress)
    return assemble(recipe, out)
