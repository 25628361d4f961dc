"""The four stages. Each owns how its leg builds the model it trains, its Lightning system, its data and its
export; the runner (``train.run``) only walks a recipe's legs and never names a stage.

| stage   | starts from                           | trains (``train.systems``)       | exports             |
|---------|---------------------------------------|----------------------------------|---------------------|
| vlm     | a fresh model (or ``init_from``)      | encoder, und branch, shared      | a model folder      |
| mbaq    | the previous model leg                | the quantizer                    | a model folder      |
| mome    | the previous model leg                | gen branch, AR head, projector   | a model folder      |
| decoder | the previous model leg (frozen)       | the pixel decoder                | a decoder folder    |
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from latentum.checkpoint import load_model_folder, save_decoder_folder, save_model_folder
from latentum.config import EncoderConfig, QuantizerConfig
from latentum.data.hf_tokenizer import AnyTokenizer
from latentum.model.decoder import PixelDecoder
from latentum.model.grow import grow_codebooks
from latentum.model.latentum import LatentUMModel
from latentum.model.quantizer import MBAQ
from latentum.train.config import DecoderStageConfig, Leg, RecipeConfig, StageConfig
from latentum.train.data import ImageStream, packed_loader
from latentum.train.lora import add_lora, has_lora, merge_lora, save_adapters
from latentum.train.systems import DecoderSystem, MBAQSystem, MoMESystem, VLMSystem
from latentum.worlds.registry import default_tokenizer


class Stage:
    """A stage's recipe for one leg; subclasses override what differs."""

    exports_model = True
    """A model folder (False: a pixel decoder folder)."""
    starts_fresh = False
    """With no ``init_from`` and no earlier model leg, build a new model (only the first stage may)."""

    def build(self, recipe: RecipeConfig, cfg: StageConfig, start: Path | None) -> LatentUMModel:
        """The model this leg trains: the exported model at ``start`` (weights, not optimiser state), or a new
        one. A recipe can switch coordinate grounding on for a model it continues."""
        if start is None:
            model_cfg = copy.deepcopy(recipe.model)
            model_cfg.backbone.vocab_size = default_tokenizer().vocab_size
            return LatentUMModel(model_cfg)
        model = load_model_folder(start)[0]
        if recipe.model.ground_coordinates:
            model.cfg.ground_coordinates = True
        if cfg.ground_coordinates is not None:
            model.cfg.ground_coordinates = cfg.ground_coordinates
        return model

    def system(self, model: LatentUMModel, recipe: RecipeConfig, cfg: StageConfig,
               folders: dict[str, Path]) -> L.LightningModule:
        raise NotImplementedError

    def loader(self, enc: EncoderConfig, cfg: StageConfig, tok: AnyTokenizer, rank: int, start_step: int,
               num_workers: int) -> DataLoader:
        """The leg's batches, drawn on the canvas of the model it trains (``enc``: its encoder's config)."""
        return packed_loader(cfg, tok, enc.grid, enc.image_size, rank, start_step, num_workers)

    def export(self, system: L.LightningModule, tok: AnyTokenizer, folder: Path, origin: dict,
               state: dict | None = None) -> Path:
        """Write the leg's model folder; ``state`` is the system's full state dict when the live modules are
        sharded (FSDP: gathered on rank 0, ``train.run.full_state_dict``)."""
        model = system.model if state is None else unsharded(LatentUMModel(system.model.cfg), "model", state)
        return save_model_folder(model, tok, folder, origin=origin)


class VLMStage(Stage):
    starts_fresh = True

    def system(self, model, recipe, cfg, folders):
        return VLMSystem(model, cfg)


class MBAQStage(Stage):
    def build(self, recipe, cfg, start):
        model = super().build(recipe, cfg, start)
        if cfg.fresh_quantizer:
            model.quantizer = fresh_quantizer(model, cfg.quantizer or recipe.model.quantizer)
        if cfg.grow_codebooks:
            model = grow_codebooks(model, cfg.grow_codebooks)
        return model

    def system(self, model, recipe, cfg, folders):
        teacher = None
        if cfg.teacher is not None:
            path = folders.get(cfg.teacher, Path(cfg.teacher))
            if not (path / "config.json").is_file():
                raise ValueError(f"teacher: {cfg.teacher!r} is neither a trained leg of this recipe nor a model folder")
            teacher = load_model_folder(path)[0]
            if teacher.cfg.backbone.vocab_size != model.cfg.backbone.vocab_size:
                raise ValueError(f"teacher: {cfg.teacher!r} has a vocabulary of {teacher.cfg.backbone.vocab_size}, the "
                                 f"trained model {model.cfg.backbone.vocab_size}; both must read the same tokens")
        return MBAQSystem(model, cfg, teacher)


class MoMEStage(Stage):
    def build(self, recipe, cfg, start):
        model = super().build(recipe, cfg, start)
        if cfg.init_generation:
            model.backbone.init_generation_branch()  # LatentUM: the gen branch starts as a copy of und
        q = model.cfg.quantizer
        same_width = (q.projector_hidden_dim or q.hidden_dim) == (q.up_hidden_dim or q.hidden_dim)
        if cfg.init_projector if cfg.init_projector is not None else cfg.init_generation and same_width:
            # latents start out read like MBAQ's quantized features; a projector of another width (LatentUM-Base's
            # is 2560 wide, MBAQ's up-projection 10240) starts new, as the reference's visual_projector does
            model.init_visual_projector()
        if cfg.lora is not None:
            lora = cfg.lora
            add_lora(model, lora.branch, lora.rank, lora.alpha, lora.dropout, lora.targets)
        return model

    def system(self, model, recipe, cfg, folders):
        return MoMESystem(model, cfg)

    def export(self, system, tok, folder, origin, state=None):
        if has_lora(system.model):  # the adapters on their own, then the model with them merged in
            if state is not None:
                raise ValueError("lora: exporting adapters of a sharded (fsdp) model is not supported yet; "
                                 "train LoRA legs with strategy ddp or auto")
            save_adapters(system.model, folder.parent / "adapters")
            merge_lora(system.model)
        return super().export(system, tok, folder, origin, state)


class DecoderStage(Stage):
    exports_model = False

    def system(self, model, recipe, cfg: DecoderStageConfig, folders):
        init = cfg.init_decoder
        if init is not None and init in folders:  # a leg's name: that leg's decoder
            init = str(folders[init])
        return DecoderSystem(model, recipe.decoder, cfg, init_decoder=init)

    def loader(self, enc, cfg, tok, rank, start_step, num_workers):
        stream = ImageStream(cfg, enc.image_size, rank, start_step)
        return DataLoader(stream, batch_size=None, num_workers=num_workers, generator=torch.Generator())

    def export(self, system, tok, folder, origin, state=None):
        decoder = system.decoder
        if state is not None:
            decoder = unsharded(PixelDecoder(decoder.cfg, decoder.code_dim, decoder.grid), "decoder", state)
        return save_decoder_folder(decoder, folder, origin=origin)


STAGES: dict[str, Stage] = {"vlm": VLMStage(), "mbaq": MBAQStage(), "mome": MoMEStage(), "decoder": DecoderStage()}


def unsharded(module: torch.nn.Module, attr: str, state: dict) -> torch.nn.Module:
    """``module`` (a new, unsharded copy of the system's ``attr``) loaded with that part of the system's full
    state dict ``state``."""
    prefix = f"{attr}."
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return module


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


def start_folder(recipe: RecipeConfig, leg: Leg, out: Path) -> Path | None:
    """The exported model a leg starts from: ``init_from`` (a leg's name or a folder), else the export of the
    nearest earlier leg that exports a model, else None (a new model; only a stage that starts fresh may)."""
    names = [x.name for x in recipe.legs]
    init = leg.config.init_from
    if init is not None:
        if init in names:
            return out / init / "export"
        return Path(init)
    earlier = [x for x in recipe.legs[:names.index(leg.name)] if STAGES[x.stage].exports_model]
    if earlier:
        return out / earlier[-1].name / "export"
    if STAGES[leg.stage].starts_fresh:
        return None
    raise ValueError(f"leg {leg.name!r} (stage {leg.stage!r}) has nothing to start from: give it init_from "
                     f"(an exported model folder, or an earlier leg), or put a model leg before it")


def existing_start(recipe: RecipeConfig, leg: Leg, out: Path) -> Path | None:
    """``start_folder``, checked to hold an exported model."""
    start = start_folder(recipe, leg, out)
    if start is not None and not (start / "config.json").is_file():
        raise ValueError(f"leg {leg.name!r} starts from {str(start)!r}, which holds no exported model; train the "
                         f"leg that exports it first")
    return start


def build_model(recipe: RecipeConfig, out: str | Path, leg_name: str) -> LatentUMModel:
    """The model that leg ``leg_name`` of ``recipe`` (run folder ``out``) starts training."""
    leg = recipe.leg(leg_name)
    return STAGES[leg.stage].build(recipe, leg.config, existing_start(recipe, leg, Path(out)))
