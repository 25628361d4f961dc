"""The training pipeline: the debug recipe trains every stage and exports a loadable model, a stage resumes
from its checkpoint, two DDP ranks stay identical, and stage 2 without ``train_understanding`` leaves every
part but the generation side bit-identical."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch

from latentum.checkpoint import load_model_folder
from latentum.train.config import STAGE_CONFIGS, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "recipes" / "debug.yaml"


def global_step(stage_folder: Path) -> int:
    ckpt = torch.load(stage_folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def logged_steps(stage_folder: Path) -> list[list[int]]:
    """Steps written to the CSV log, one list per logger version (one version per fit)."""
    runs = []
    for version in sorted((stage_folder / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            runs.append(sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("loss")}))
    return runs


# --- (a) the whole recipe -------------------------------------------------------------------------------
def test_debug_recipe_trains_every_stage(debug_run):
    recipe = load_recipe(str(DEBUG))
    assert [leg.stage for leg in recipe.legs] == list(STAGE_CONFIGS)
    for leg in recipe.legs:
        stage, cfg = leg.name, leg.config
        folder = debug_run / stage
        assert (folder / "export" / "config.json").is_file(), stage
        assert (folder / "export" / "model.safetensors").is_file(), stage
        assert global_step(folder) == cfg.steps, stage
        assert logged_steps(folder)[-1] == list(range(cfg.steps)), stage  # log_every is 1 in debug.yaml


def test_exported_model_loads_with_its_decoder(debug_run):
    from latentum.api import LatentImage, LatentUM

    model_dir = debug_run / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "decoder/config.json",
                 "decoder/model.safetensors"):
        assert (model_dir / name).is_file(), name
    api = LatentUM.from_pretrained(model_dir)
    assert api.decoder_path == model_dir / "decoder"
    cfg = load_recipe(str(DEBUG)).model
    assert api.config.backbone.dim == cfg.backbone.dim and api.config.encoder == cfg.encoder
    assert api.tokenizer.vocab_size == api.config.backbone.vocab_size > 0
    # The exported weights are the mome stage's, bit for bit.
    mome = LatentUM.from_pretrained(debug_run / "mome" / "export").model.state_dict()
    assert all(torch.equal(v, mome[k]) for k, v in api.model.state_dict().items())
    # The decoder renders codes of the model's own quantizer (shapes agree across the two exports).
    G, K = cfg.quantizer.codebooks, cfg.quantizer.codebook_size
    ids = torch.randint(0, K, (cfg.encoder.num_tokens, G), generator=torch.Generator().manual_seed(0))
    image = np.asarray(api.render(LatentImage(ids)))
    side = load_recipe(str(DEBUG)).decoder.resolution
    assert image.shape == (side, side, 3) and image.dtype == np.uint8


# --- (b) resume -----------------------------------------------------------------------------------------
def _more_steps(recipe, stage: str, extra: int):
    cfg = recipe.leg(stage).config
    recipe.leg(stage).config = dataclasses.replace(cfg, steps=cfg.steps + extra)
    return recipe


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    from latentum.train.run import train_leg

    recipe = load_recipe(str(DEBUG))
    first = recipe.leg("vlm").config.steps
    train_leg(recipe, "vlm", tmp_path, progress=False)
    export = train_leg(_more_steps(recipe, "vlm", 2), "vlm", tmp_path, resume=True, progress=False)
    assert global_step(tmp_path / "vlm") == first + 2
    # The resumed fit logs only the new steps: it continued, it did not start over.
    assert logged_steps(tmp_path / "vlm") == [list(range(first)), [first, first + 1]]
    assert (export / "model.safetensors").is_file()


def test_a_copied_run_folder_resumes_and_keeps_one_last_checkpoint(debug_run, tmp_path):
    """Runs get copied (off a cluster, into a bigger disk). Resuming the copy must update its last.ckpt;
    a stale last.ckpt beside a fresh last-v1.ckpt would make the next --resume go back in time."""
    from latentum.train.run import train_leg

    recipe = load_recipe(str(DEBUG))
    first = recipe.leg("vlm").config.steps
    shutil.copytree(debug_run / "vlm", tmp_path / "vlm", ignore=shutil.ignore_patterns("export"))
    train_leg(_more_steps(recipe, "vlm", 2), "vlm", tmp_path, resume=True, progress=False)
    assert logged_steps(tmp_path / "vlm")[-1] == [first, first + 1]
    assert [p.name for p in (tmp_path / "vlm" / "checkpoints").iterdir()] == ["last.ckpt"]
    assert global_step(tmp_path / "vlm") == first + 2


def test_an_existing_run_is_refused_without_resume_or_overwrite(debug_run, tmp_path):
    from latentum.train.run import train_leg

    recipe = load_recipe(str(DEBUG))
    steps = recipe.leg("vlm").config.steps
    shutil.copytree(debug_run / "vlm", tmp_path / "vlm", ignore=shutil.ignore_patterns("export"))
    before = (tmp_path / "vlm" / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match="already has a run.*--resume.*--overwrite"):
        train_leg(recipe, "vlm", tmp_path, progress=False)
    assert (tmp_path / "vlm" / "checkpoints" / "last.ckpt").read_bytes() == before  # nothing lost
    train_leg(recipe, "vlm", tmp_path, overwrite=True, progress=False)
    assert logged_steps(tmp_path / "vlm") == [list(range(steps))]  # started over, old logs gone


def test_cli_train_on_an_existing_run_exits_2_and_names_the_flags(debug_run, tmp_path, capsys):
    from latentum.cli import main

    shutil.copytree(debug_run / "vlm", tmp_path / "vlm", ignore=shutil.ignore_patterns("export"))
    code = main(["train", "--config", str(DEBUG), "--leg", "vlm", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


KILLED_LEG = """
import os, signal, sys
from lightning.pytorch.callbacks import Callback
from latentum.train.config import load_recipe
from latentum.train.run import train_leg

class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

recipe = load_recipe(sys.argv[1])
train_leg(recipe, "mome", sys.argv[2], progress=False, callbacks=[Kill()])
"""


def test_kill_9_mid_leg_then_resume_is_bit_identical_to_an_uninterrupted_run(debug_run, tmp_path):
    """kill -9 after step 5 (its last checkpoint: step 4), then --resume: the data stream and the RNG pick up
    where they were, so every weight equals the uninterrupted run's, bit for bit."""
    import yaml

    from latentum.checkpoint import load_model_folder
    from latentum.train.run import train_leg

    data = yaml.safe_load(DEBUG.read_text())
    data["stages"] = {"mome": {**data["stages"]["mome"], "steps": 7, "checkpoint_every": 2,
                               "init_from": str(debug_run / "mbaq" / "export")}}
    (tmp_path / "mome.yaml").write_text(yaml.safe_dump(data, sort_keys=False))  # the task order is the mixture's
    recipe = load_recipe(str(tmp_path / "mome.yaml"))
    train_leg(recipe, "mome", tmp_path / "whole", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_LEG.format(kill_at=5), str(tmp_path / "mome.yaml"),
                           str(tmp_path / "killed")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert global_step(tmp_path / "killed" / "mome") == 4 and not (tmp_path / "killed" / "mome" / "export").exists()
    train_leg(recipe, "mome", tmp_path / "killed", resume=True, progress=False)
    whole = load_model_folder(tmp_path / "whole" / "mome" / "export")[0].state_dict()
    resumed = load_model_folder(tmp_path / "killed" / "mome" / "export")[0].state_dict()
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert differ == []


# --- (c) DDP --------------------------------------------------------------------------------------------
def _gen_rows_per_step(cfg, canvas: int, rank: int, steps: int) -> list[bool]:
    """Whether each of a rank's first batches holds an image to generate (the stream the runner draws)."""
    from latentum.train.data import SampleStream

    stream = iter(SampleStream(cfg, canvas, rank))
    return [any(s.is_text_to_image or any(not isinstance(x, str) for x in s.assistant) for s in next(stream)[0])
            for _ in range(steps)]


def test_the_whole_recipe_trains_on_two_ddp_processes_with_identical_weights(tmp_path):
    """Every leg on 2 CPU processes (DDP, gloo) as one command through the real CLI: each leg's export is
    written by rank 0 before any rank starts the next leg, both ranks end every leg with the same weights, and
    stage 2 finishes although one rank's batch holds no image to generate while the other's does (a rank
    whose gen branch got no gradient used to wait for the other forever)."""
    import yaml

    data = yaml.safe_load(DEBUG.read_text())
    data["stages"]["mome"].update(batch_size=1, steps=4, tasks={"vsp_hole": 1, "vsp_plan": 1})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(str(path))
    canvas = recipe.model.encoder.image_size
    ranks = [_gen_rows_per_step(recipe.leg("mome").config, canvas, r, 4) for r in (0, 1)]
    assert any(a != b for a, b in zip(*ranks)), ranks  # the case that hung: one rank generates, one does not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "latentum.cli", "train", "--config", str(path), "--devices", "2", "--strategy",
           "ddp", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for leg in recipe.legs:
        folder = tmp_path / "run" / leg.name
        digests = [(folder / f"digest_rank{r}.txt").read_text().strip() for r in (0, 1)]
        assert len(digests[0]) == 64 and digests[0] == digests[1], leg.name
        assert global_step(folder) == leg.config.steps, leg.name
    assert (tmp_path / "run" / "model" / "decoder" / "model.safetensors").is_file()


def test_only_rank_0_assembles_the_model_folder(monkeypatch, tmp_path):
    """Every rank of a multi-process run reaches ``assemble`` (after ``train_recipe``'s legs, or after the CLI's
    one leg); two ranks replacing ``out/model`` at once raced (one rank's rename met the other's finished folder),
    so only rank 0 assembles."""
    from lightning.pytorch.utilities import rank_zero_only

    from latentum.train import run

    recipe = load_recipe(str(DEBUG))
    assembled = []
    monkeypatch.setattr(run, "train_leg", lambda *a, **k: None)
    monkeypatch.setattr(run, "write_folder_atomically", lambda path, write: assembled.append(path) or path)
    for rank in (1, 0):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        assert run.train_recipe(recipe, tmp_path) == tmp_path / "model"
        assert run.assemble(recipe, tmp_path) == tmp_path / "model"
    assert assembled == [tmp_path / "model"] * 2  # rank 0's two calls


def test_a_ddp_leg_runs_with_a_collective_timeout():
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from latentum.train.run import strategy

    cfg = dataclasses.replace(load_recipe(str(DEBUG)).leg("vlm").config, strategy="ddp", collective_timeout=42)
    built = strategy(cfg)
    assert isinstance(built, DDPStrategy) and built._timeout == timedelta(seconds=42)
    assert strategy(dataclasses.replace(cfg, strategy="auto")) == "auto"


# --- (d) stage 2 freezing -------------------------------------------------------------------------------
def _gen_side(model) -> set[str]:
    """State-dict names of what stage 2 always trains: the gen branch, the AR head, the visual projector."""
    ids = {id(p) for p in model.backbone.branch_parameters("gen")}
    ids |= {id(p) for m in (model.head, model.visual_projector) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _mome_steps(run: Path, train_understanding: bool, steps: int = 3):
    """Build stage 2 from the debug run's mbaq export and take a few optimiser steps on one packed batch."""
    from latentum.data.tokenizer import TextTokenizer
    from latentum.train.data import PackCollate
    from latentum.train.stages import build_model
    from latentum.train.systems import MoMESystem
    from latentum.worlds.registry import make_sample

    recipe = load_recipe(str(DEBUG))
    cfg = dataclasses.replace(recipe.leg("mome").config, train_understanding=train_understanding, code_noise=0.0,
                              cfg_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(recipe, run, "mome")
    system = MoMESystem(model, cfg)
    rng = np.random.default_rng(0)
    canvas = recipe.model.encoder.image_size
    # Planning (images in both turns, text targets) and text-to-image: every branch gets gradients.
    samples = [make_sample(t, rng, map_sizes=[3], canvas=canvas) for t in ("vsp_plan", "shapes_t2i")]
    tok = TextTokenizer.load(run / "mbaq" / "export")
    batch = PackCollate(tok, recipe.model.encoder.grid, cfg)((samples, 0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = system.configure_optimizers()["optimizer"]
    system.train()
    system.on_train_epoch_start()  # frozen parts to eval mode, as in the Lightning loop
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        system.losses(batch).total.backward()
        opt.step()
    return model, before


@pytest.mark.filterwarnings("ignore:You are trying to `self.log:UserWarning")  # no Trainer attached here
def test_stage2_without_understanding_only_changes_the_generation_side(debug_run):
    model, before = _mome_steps(debug_run, train_understanding=False)
    gen = _gen_side(model)
    after = model.state_dict()
    frozen_changed = [k for k in before if k not in gen and not torch.equal(before[k], after[k])]
    assert frozen_changed == []  # und branch, shared norms/embeddings, encoder, quantizer (buffers too)
    for prefix in ("backbone.layers.", "head.", "visual_projector."):
        names = [k for k in gen if k.startswith(prefix)]
        assert names and any(not torch.equal(before[k], after[k]) for k in names), prefix
    und = {id(p) for p in model.backbone.branch_parameters("und")}
    assert not any(p.requires_grad for p in model.parameters() if id(p) in und)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log:UserWarning")
def test_stage2_with_understanding_changes_the_und_branch(debug_run):
    """The contrast case: the same batch does move the und branch when it is trainable, so the test above
    would notice a broken freeze."""
    model, before = _mome_steps(debug_run, train_understanding=True)
    und = {id(p) for p in model.backbone.branch_parameters("und")}
    names = [n for n, p in model.named_parameters() if id(p) in und]
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in names)


@pytest.mark.parametrize("stage, before", [("mome", "mbaq"), ("decoder", "mome")])
def test_a_stage_without_its_predecessor_says_what_to_train(stage, before, tmp_path):
    from latentum.train.run import train_leg

    with pytest.raises(ValueError, match=f"{before}/export.*holds no exported model"):
        train_leg(load_recipe(str(DEBUG)), stage, tmp_path, progress=False)


@pytest.mark.parametrize("init_generation", [True, False])
def test_init_generation_false_continues_a_trained_stage2(debug_run, init_generation):
    """A stage 2 that starts from a stage-2 export (``init_from``) keeps its trained generation branch and
    projector with ``init_generation: false``; the default starts them over as copies of the und side."""
    from latentum.api import LatentUM
    from latentum.train.stages import build_model

    recipe = load_recipe(str(DEBUG))
    recipe.leg("mome").config = dataclasses.replace(recipe.leg("mome").config, init_from=str(debug_run / "model"),
                                                init_generation=init_generation)
    trained = LatentUM.from_pretrained(debug_run / "model").model.state_dict()
    model = build_model(recipe, debug_run, "mome")
    built = model.state_dict()
    gen = [k for k in _gen_side(model) if k.startswith(("backbone", "visual"))]  # what the init rewrites
    assert gen
    assert all(torch.equal(trained[k], built[k]) for k in gen) == (not init_generation)


def test_a_recipe_switches_coordinate_grounding_on_for_the_model_it_continues(debug_run):
    from latentum.train.stages import build_model

    recipe = load_recipe(str(DEBUG))
    assert not build_model(recipe, debug_run, "mome").cfg.ground_coordinates  # as the export was saved
    recipe.model.ground_coordinates = True
    assert build_model(recipe, debug_run, "mome").cfg.ground_coordinates


def test_init_projector_resets_only_the_projector_of_a_continued_stage2(debug_run):
    """``init_projector: true`` with ``init_generation: false``: the projector starts again as MBAQ's
    up-projection (a retrained quantizer), the generation branch stays as trained."""
    from latentum.api import LatentUM
    from latentum.train.stages import build_model

    recipe = load_recipe(str(DEBUG))
    recipe.leg("mome").config = dataclasses.replace(recipe.leg("mome").config, init_from=str(debug_run / "model"),
                                                init_generation=False, init_projector=True)
    trained = LatentUM.from_pretrained(debug_run / "model").model.state_dict()
    model = build_model(recipe, debug_run, "mome")
    up, proj = model.quantizer.up.state_dict(), model.visual_projector.net.state_dict()
    assert up.keys() == proj.keys() and all(torch.equal(up[k], proj[k]) for k in up)
    assert not all(torch.equal(trained[f"visual_projector.net.{k}"], proj[k]) for k in proj)
    gen = [k for k in _gen_side(model) if k.startswith("backbone")]
    assert gen and all(torch.equal(trained[k], model.state_dict()[k]) for k in gen)


def test_fresh_quantizer_starts_stage1_over_on_a_trained_model(debug_run):
    from latentum.train.stages import build_model

    recipe = load_recipe(str(DEBUG))
    recipe.leg("mbaq").config = dataclasses.replace(recipe.leg("mbaq").config, init_from=str(debug_run / "model"))
    kept = build_model(recipe, debug_run, "mbaq")
    recipe.leg("mbaq").config = dataclasses.replace(recipe.leg("mbaq").config, fresh_quantizer=True)
    torch.manual_seed(0)
    fresh = build_model(recipe, debug_run, "mbaq")
    codebook = "quantizer.vq._codebook.embed"
    assert not torch.equal(kept.state_dict()[codebook], fresh.state_dict()[codebook])
    others = [k for k in kept.state_dict() if not k.startswith("quantizer.")]
    assert others and all(torch.equal(kept.state_dict()[k], fresh.state_dict()[k]) for k in others)
    assert fresh.quantizer.usage_ema.eq(1.0 / fresh.cfg.quantizer.codebook_size).all()


def test_fresh_quantizer_takes_the_recipe_config_and_keeps_the_code_shapes(debug_run):
    from latentum.train.stages import build_model

    recipe = load_recipe(str(DEBUG))
    recipe.leg("mbaq").config = dataclasses.replace(recipe.leg("mbaq").config, init_from=str(debug_run / "model"),
                                                fresh_quantizer=True)
    recipe.model.quantizer = dataclasses.replace(recipe.model.quantizer, norm_latents=True)
    model = build_model(recipe, debug_run, "mbaq")
    assert model.cfg.quantizer.norm_latents and model.quantizer.cfg.norm_latents  # exported with the model
    recipe.model.quantizer = dataclasses.replace(recipe.model.quantizer,
                                                 codebook_size=2 * recipe.model.quantizer.codebook_size)
    with pytest.raises(ValueError, match="fresh_quantizer.*codebook_size"):
        build_model(recipe, debug_run, "mbaq")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log:UserWarning")  # no Trainer attached here
def test_stage1_trains_a_loaded_quantizer_in_train_mode(debug_run):
    """A stage loads its model in eval mode (``from_pretrained``); the trained part must train in train mode,
    or the quantizer never revives a dead code nor counts usage, and the frozen parts stay in eval mode."""
    from latentum.data.tokenizer import TextTokenizer
    from latentum.train.data import PackCollate
    from latentum.train.stages import build_model
    from latentum.train.systems import MBAQSystem
    from latentum.worlds.registry import make_sample

    recipe = load_recipe(str(DEBUG))
    cfg = recipe.leg("mbaq").config
    model = build_model(recipe, debug_run, "mbaq")
    assert not model.training  # as loaded
    system = MBAQSystem(model, cfg)
    system.on_train_epoch_start()
    assert model.quantizer.training and model.quantizer.vq.training
    assert not model.encoder.training and not model.backbone.training
    rng = np.random.default_rng(0)
    samples = [make_sample("vsp_player", rng, map_sizes=[3], canvas=recipe.model.encoder.image_size)]
    batch = PackCollate(TextTokenizer.load(debug_run / "vlm" / "export"), recipe.model.encoder.grid, cfg)((samples, 0))
    usage = model.quantizer.usage_ema.clone()
    system.losses(batch)
    assert not torch.equal(usage, model.quantizer.usage_ema)


def _gone(pid: int) -> bool:
    """The process has ended: no such process, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("target, signum", [("launcher", "SIGINT"), ("other rank", "SIGTERM")])
def test_a_signal_to_any_rank_stops_every_rank(tmp_path, target, signum):
    """Ctrl-C or SIGTERM to either process of a 2-rank run ends both within seconds (Lightning's own handler
    used to deadlock against the gradient all-reduce: both ranks idle, signals ignored)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "latentum.cli", "train", "--config", str(DEBUG), "--leg", "vlm", "--steps", "5000",
           "--devices", "2", "--strategy", "ddp", "--out", str(tmp_path)]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while "step 20/" not in (tmp_path / "log.txt").read_text():  # both ranks are training
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "latentum.cli"], capture_output=True,
                                  text=True).stdout.split()  # rank 1 (not any helper process of the moment)
        assert len(children) == 1, children
        victim = proc.pid if target == "launcher" else int(children[0])
        os.kill(victim, getattr(signal, signum))
        code = proc.wait(timeout=120)
        time.sleep(1)
        assert _gone(int(children[0])), (tmp_path / "log.txt").read_text()[-2000:]  # rank 1 ended too
        assert code != 0 and "stopped by signal" in (tmp_path / "log.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


# --- (e) FSDP -------------------------------------------------------------------------------------------
def test_an_fsdp_leg_shards_every_backbone_layer_planned_on_the_meta_device():
    """The FSDP strategy a leg builds, and the units its wrap policy cuts a model into, computed on a
    meta-device model (no memory, no process group): one unit per backbone layer, the rest in the root."""
    from lightning.pytorch.strategies import FSDPStrategy

    from latentum.model.backbone import MoMELayer
    from latentum.model.latentum import LatentUMModel
    from latentum.train.run import strategy

    recipe = load_recipe(str(ROOT / "configs" / "experiments" / "fsdp.yaml"))
    cfg = recipe.leg("mome").config
    built = strategy(cfg)
    assert isinstance(built, FSDPStrategy) and built._state_dict_type == "sharded"  # checkpoints stay sharded
    assert built._activation_checkpointing_kwargs  # the recipe switches recomputation on
    with torch.device("meta"):
        model = LatentUMModel(recipe.model)
    assert all(p.is_meta for p in model.parameters())
    units = built.kwargs["auto_wrap_policy"]._run_policy(model, set(), {})
    layers = [m for m in units if isinstance(m, MoMELayer)]
    assert len(layers) == recipe.model.backbone.depth and set(units) == set(layers)  # the root wraps the rest
    assert strategy(dataclasses.replace(cfg, activation_checkpointing=False))._activation_checkpointing_kwargs == {}


def test_an_export_from_a_gathered_state_dict_equals_the_live_model(debug_run, tmp_path):
    """Under FSDP the export is built from the full state dict gathered on rank 0; from the same weights it
    writes the same folder as from the live model."""
    from latentum.train.stages import STAGES
    from latentum.train.systems import MoMESystem

    recipe = load_recipe(str(DEBUG))
    model, tok = load_model_folder(debug_run / "model")
    system = MoMESystem(model, recipe.leg("mome").config)
    live = STAGES["mome"].export(system, tok, tmp_path / "live", {})
    gathered = STAGES["mome"].export(system, tok, tmp_path / "gathered", {}, state=system.state_dict())
    a, b = load_model_folder(live)[0].state_dict(), load_model_folder(gathered)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (f) a quantizer taught a new world by a teacher, old codes kept ----------------------------------------

def _teacher_recipe(tmp_path: Path, debug_model: Path, train_encoder: bool = False, take_encoder: bool = False,
                    grow: int = 0) -> Path:
    import yaml

    data = yaml.safe_load(DEBUG.read_text())
    common = {"batch_size": 2, "log_every": 1, "precision": "32-true", "worlds": {"frozenlake": {"map_sizes": [3, 4]}}}
    data.pop("stages")
    data["legs"] = [
        {"name": "teacher", "stage": "vlm", "init_from": str(debug_model), "train_encoder": train_encoder,
         "steps": 2, "lr": 1e-2, "tasks": {"shapes_qa": 1}, **common,
         **({"keep_features": {"tasks": {"vsp_hole": 1}, "images": 4}} if take_encoder else {})},
        {"name": "keep", "stage": "mbaq", "init_from": str(debug_model), "teacher": "teacher", "steps": 3,
         "lr": 1e-2, "tasks": {"shapes_qa": 1}, "teacher_encoder": take_encoder, "grow_codebooks": grow,
         "keep_codes": {"tasks": {"vsp_hole": 1}, "images": 4, "probe_images": 32,
                        **({"zero_ball": 0.5} if grow else {})}, **common}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_teacher_aligns_the_quantizer_and_kept_codes_stay(debug_run, tmp_path):
    from latentum.train.run import train_leg
    from latentum.worlds.registry import make_sample

    recipe = load_recipe(str(_teacher_recipe(tmp_path, debug_run / "model")))
    teacher = load_model_folder(train_leg(recipe, "teacher", tmp_path / "run", progress=False))[0]
    old = load_model_folder(debug_run / "model")[0]
    new = load_model_folder(train_leg(recipe, "keep", tmp_path / "run", progress=False))[0]
    t, o, n = teacher.state_dict(), old.state_dict(), new.state_dict()
    assert all(torch.equal(t[k], o[k]) for k in o if k.startswith("encoder."))  # train_encoder: false
    assert not all(torch.equal(t[k], o[k]) for k in o if k.startswith("backbone."))  # the teacher learnt
    changed = {k for k in o if not torch.equal(o[k], n[k])}
    assert changed and all(k.startswith("quantizer.") for k in changed)  # the model keeps its own backbone
    # every codebook row the kept task's images use is exactly as it was
    rng = np.random.default_rng(0)
    images = np.stack([x for _ in range(16) for x in make_sample("vsp_hole", rng, map_sizes=[3, 4], canvas=64).images])
    ids = old.image_ids(images)
    key = "quantizer.vq._codebook.embed"
    for g in range(ids.size(-1)):
        rows = ids[..., g].unique()
        assert torch.equal(n[key][g, rows], o[key][g, rows])
    assert not torch.equal(n[key], o[key])  # the other rows trained
    with open(next((tmp_path / "run" / "keep" / "logs").glob("version_*")) / "metrics.csv") as f:
        assert any(row.get("train/keep/same_ids") for row in csv.DictReader(f))


def test_a_grown_codebook_learns_from_a_teacher_with_its_own_encoder_and_old_ids_stay(debug_run, tmp_path):
    """``grow_codebooks``: the model keeps its encoder, down-projection and old codebooks (every image keeps its
    old ids, not only the kept task's), the teacher sees through its own encoder, the kept task's images are pulled
    to code 0 of the new codebook, which stays the zero vector."""
    from latentum.train.run import train_leg
    from latentum.train.systems import MBAQSystem
    from latentum.worlds.registry import make_sample

    recipe = load_recipe(str(_teacher_recipe(tmp_path, debug_run / "model", train_encoder=True, grow=1)))
    teacher = load_model_folder(train_leg(recipe, "teacher", tmp_path / "run", progress=False))[0]
    seen = []
    real = MBAQSystem.losses
    with patch.object(MBAQSystem, "losses", lambda self, p: seen.append(self._teacher_view) or real(self, p)):
        new = load_model_folder(train_leg(recipe, "keep", tmp_path / "run", progress=False))[0]
    assert seen and all(seen)  # the teacher's encoder learnt, so it saw through its own
    old = load_model_folder(debug_run / "model")[0]
    t, o, n = teacher.state_dict(), old.state_dict(), new.state_dict()
    assert not all(torch.equal(t[k], o[k]) for k in o if k.startswith("encoder."))
    G0 = old.cfg.quantizer.codebooks
    assert (new.cfg.quantizer.codebooks, new.cfg.quantizer.grown_codebooks) == (G0 + 1, 1)
    key = "quantizer.vq._codebook.embed"
    unchanged = [k for k in o if not k.startswith(("quantizer.up.0.weight", "quantizer.usage_ema", "quantizer.vq.",
                                                   "visual_projector.", "head."))]
    assert all(torch.equal(o[k], n[k]) for k in unchanged)  # encoder, down-projection, backbone
    assert torch.equal(n[key][:G0], o[key]) and torch.count_nonzero(n[key][G0:, 0]) == 0
    assert n[key][G0:, 1:].square().sum(-1).min() >= 0.5 - 1e-5  # no other new code near it (zero_ball)
    up, D0 = "quantizer.up.0.weight", old.cfg.quantizer.dim
    assert torch.equal(n[up][:, :D0], o[up]) and torch.count_nonzero(n[up][:, D0:]) > 0  # its new columns trained
    rng = np.random.default_rng(0)
    for task in ("vsp_hole", "shapes_qa"):
        images = np.stack([x for _ in range(8) for x in make_sample(task, rng, map_sizes=[3, 4], canvas=64).images])
        assert torch.equal(new.image_ids(images)[..., :G0], old.image_ids(images))
    with open(next((tmp_path / "run" / "keep" / "logs").glob("version_*")) / "metrics.csv") as f:
        assert any(row.get("train/keep/same_ids") for row in csv.DictReader(f))


def test_grow_vocabulary_adds_new_words_after_the_old_and_keeps_old_logits():
    from latentum.data.tokenizer import TextTokenizer
    from latentum.train.run import grow_vocabulary

    model, tok = load_model_folder(ROOT / "checkpoints" / "tiny")[:2]
    assert tok.unknown_words("a photo of a red circle") == ["photo"]  # it predates the GenEval template
    ids = torch.tensor([tok.encode("How many circles are there ?")])
    before = model.backbone.logits(model.backbone.embed(ids))
    grown = grow_vocabulary(model, tok)
    assert isinstance(grown, TextTokenizer) and grown.vocab_size > tok.vocab_size
    assert grown.encode("How many circles are there ?") == ids[0].tolist()  # old ids unchanged
    assert not grown.unknown_words("a photo of a red circle")
    assert model.backbone.embedding.num_embeddings == grown.vocab_size == model.cfg.backbone.vocab_size
    after = model.backbone.logits(model.backbone.embed(ids))
    torch.testing.assert_close(after[..., :tok.vocab_size], before)
    new = model.backbone.embedding.weight[tok.vocab_size:]
    torch.testing.assert_close(new, model.backbone.embedding.weight[:tok.vocab_size].mean(0).expand_as(new))


def test_a_taught_encoder_is_taken_with_the_old_codes_kept(debug_run, tmp_path):
    """A teacher whose encoder learnt (features of the kept task pulled to where they were) hands its encoder to
    the trained model; the codebook rows the old encoder's codes of the kept task use stay as they were."""
    from latentum.train.run import train_leg
    from latentum.worlds.registry import make_sample

    recipe = load_recipe(str(_teacher_recipe(tmp_path, debug_run / "model", train_encoder=True, take_encoder=True)))
    teacher = load_model_folder(train_leg(recipe, "teacher", tmp_path / "run", progress=False))[0]
    old = load_model_folder(debug_run / "model")[0]
    new = load_model_folder(train_leg(recipe, "keep", tmp_path / "run", progress=False))[0]
    t, o, n = teacher.state_dict(), old.state_dict(), new.state_dict()
    enc = [k for k in o if k.startswith("encoder.")]
    assert not all(torch.equal(t[k], o[k]) for k in enc) and all(torch.equal(t[k], n[k]) for k in enc)
    changed = {k for k in o if not torch.equal(o[k], n[k])}
    assert all(k.startswith(("quantizer.", "encoder.")) for k in changed)
    rng = np.random.default_rng(0)
    images = np.stack([x for _ in range(16) for x in make_sample("vsp_hole", rng, map_sizes=[3, 4], canvas=64).images])
    ids, key = old.image_ids(images), "quantizer.vq._codebook.embed"
    for g in range(ids.size(-1)):
        rows = ids[..., g].unique()
        assert torch.equal(n[key][g, rows], o[key][g, rows])
    with open(next((tmp_path / "run" / "teacher" / "logs").glob("version_*")) / "metrics.csv") as f:
        assert any(row.get("train/keep/feature_mse") for row in csv.DictReader(f))


def test_the_kept_reference_is_the_model_as_loaded_not_a_resumed_checkpoint(debug_run, tmp_path):
    """Lightning restores a resumed leg's weights after the system is built: the references keep_codes and
    keep_features hold are taken when it is built, so a resumed leg keeps what the leg started from."""
    from latentum.train.systems import MBAQSystem, VLMSystem

    recipe = load_recipe(str(_teacher_recipe(tmp_path, debug_run / "model", train_encoder=True, take_encoder=True)))
    model = load_model_folder(debug_run / "model")[0]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    mbaq = MBAQSystem(model, recipe.leg("keep").config)
    vlm = VLMSystem(model, recipe.leg("teacher").config)
    with torch.no_grad():  # what restoring a checkpoint does
        for p in model.parameters():
            p.add_(1.0)
    ref = mbaq._keep[0].state_dict()
    assert all(torch.equal(v, start[f"quantizer.{k}"]) for k, v in ref.items() if f"quantizer.{k}" in start)
    enc = vlm._reference[0].state_dict()
    assert all(torch.equal(v, start[f"encoder.{k}"]) for k, v in enc.items())


def test_teacher_and_kept_codes_are_refused_under_fsdp():
    from latentum.train.config import MBAQConfig, VLMConfig

    with pytest.raises(ValueError, match="fsdp"):
        MBAQConfig(tasks={"shapes_qa": 1}, strategy="fsdp", teacher="t")
    with pytest.raises(ValueError, match="fsdp"):
        VLMConfig(tasks={"shapes_qa": 1}, strategy="fsdp", keep_features={"tasks": {"vsp_hole": 1}})
