"""LoRA on one backbone branch (issue #31, low-memory fine-tuning): adapters start as a no-op, only they train
within the branch, and the export saves them on their own and merges them into a plain model that gives the
same outputs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from latentum.checkpoint import load_model_folder
from latentum.model.latentum import LatentUMModel
from latentum.train.config import LoRAConfig, load_recipe
from latentum.train.lora import add_lora, has_lora, merge_lora, train_adapters_only
from latentum.worlds.registry import default_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "recipes" / "debug.yaml"


def tiny_model() -> LatentUMModel:
    cfg = copy.deepcopy(load_recipe(str(DEBUG)).model)
    cfg.backbone.vocab_size = default_tokenizer().vocab_size
    torch.manual_seed(0)
    return LatentUMModel(cfg).eval()


def backbone_out(model: LatentUMModel, gen: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, model.cfg.backbone.dim, generator=g)
    mask = torch.full((2, 5), gen)
    return model.backbone(x, mask, torch.arange(5).expand(2, 5)).hidden


@pytest.mark.parametrize("branch", ["gen", "und"])
def test_adapters_start_as_a_no_op_and_only_they_train_in_their_branch(branch):
    model = tiny_model()
    before = backbone_out(model, gen=branch == "gen")
    add_lora(model, branch, rank=2, alpha=4.0)
    assert has_lora(model)
    torch.testing.assert_close(backbone_out(model, gen=branch == "gen"), before, rtol=0, atol=0)
    model.requires_grad_(True)
    train_adapters_only(model)
    i = ("und", "gen").index(branch)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and f".branches.{i}." in name, name
        elif ".base_layer." in name:
            assert not p.requires_grad and f".branches.{i}." in name, name
        else:
            assert p.requires_grad, name  # the rest is the stage's choice, untouched


def test_merging_gives_a_plain_model_with_the_same_outputs():
    model = tiny_model()
    add_lora(model, "gen", rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter
    adapted = backbone_out(model, gen=True)
    merge_lora(model)
    assert not has_lora(model) and not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(backbone_out(model, gen=True), adapted, rtol=1e-5, atol=1e-5)


def test_a_lora_leg_trains_the_adapters_and_exports_them_merged(debug_run, tmp_path):
    from latentum.train.run import train_leg

    recipe = load_recipe(str(DEBUG))
    recipe.legs = [recipe.leg("mome")]
    recipe.leg("mome").config = dataclasses.replace(
        recipe.leg("mome").config, init_from=str(debug_run / "mbaq" / "export"), train_understanding=False,
        lora=LoRAConfig(branch="gen", rank=2, alpha=4.0), lr=1e-2)
    export = train_leg(recipe, "mome", tmp_path, progress=False)
    adapters = tmp_path / "mome" / "adapters" / "adapters.safetensors"
    assert adapters.is_file()
    from safetensors.torch import load_file

    saved = load_file(str(adapters))
    assert saved and all("lora_" in k for k in saved) and any(v.abs().sum() > 0 for k, v in saved.items()
                                                               if "lora_B" in k)  # trained, not zero
    trained, _ = load_model_folder(export)  # a plain model: no peft needed to load it
    start, _ = load_model_folder(debug_run / "mbaq" / "export")
    start.backbone.init_generation_branch()
    got, want = trained.state_dict(), start.state_dict()
    gen_q = "backbone.layers.0.branches.1.q_proj.weight"
    assert not torch.equal(got[gen_q], want[gen_q])  # the merged adapter moved the gen branch
    und = [k for k in got if ".branches.0." in k]
    assert und and all(torch.equal(got[k], want[k]) for k in und)  # the und branch did not move


@pytest.mark.filterwarnings("ignore:You are trying to `self.log:UserWarning")
def test_frozen_parameters_hold_no_optimizer_state():
    """Stage 2 with a frozen und branch and LoRA on gen: the optimizer sees the adapters and the gen side's
    other trained parts only; no frozen weight takes optimizer memory."""
    from latentum.train.systems import MoMESystem

    model = tiny_model()
    cfg = dataclasses.replace(load_recipe(str(DEBUG)).leg("mome").config, train_understanding=False,
                              lora=LoRAConfig(branch="gen", rank=2))
    add_lora(model, "gen", rank=2, alpha=16.0)
    system = MoMESystem(model, cfg)
    opt = system.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(".branches.0." in names[i] or ".base_layer." in names[i] for i in in_opt)
    assert any("lora_A" in names[i] for i in in_opt) and any(names[i].startswith("head.") for i in in_opt)
