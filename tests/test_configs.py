"""Configs: every shipped YAML parses and round-trips; typos and invalid values fail with errors that name
the offending key or field."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentum.config import (
    AIAConfig,
    AIAStage,
    BackboneConfig,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    QuantizerConfig,
    from_dict,
)
from latentum.train.config import (
    STAGE_CONFIGS,
    DecoderStageConfig,
    MBAQConfig,
    MoMEConfig,
    RecipeConfig,
    VLMConfig,
    load_recipe,
    parse_recipe,
    recipe_to_data,
)

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.stem for p in YAMLS} >= {"debug", "tiny"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_shipped_yaml_parses_and_round_trips(path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, RecipeConfig)
    assert recipe.legs and all(isinstance(x.config, STAGE_CONFIGS[x.stage]) for x in recipe.legs)
    # An export records recipe_to_data of its recipe: it must rebuild the same recipe.
    assert parse_recipe(recipe_to_data(recipe)) == recipe


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_shipped_yaml_names_only_known_tasks(path):
    from latentum.worlds.registry import TASKS

    for leg in load_recipe(str(path)).legs:
        assert leg.config.tasks, f"{path.name}: leg {leg.name!r} has no tasks"
        assert set(leg.config.tasks) <= set(TASKS), f"{path.name}: leg {leg.name!r}"


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="stpes") as e:
        from_dict(VLMConfig, {"steps": 5, "stpes": 6})
    assert "VLMConfig" in str(e.value)


@pytest.mark.parametrize("text, bad", [
    ("model: {backbone: {dimm: 32}}\n", "dimm"),  # nested dataclass
    ("stages: {vlm: {steps: 2, lrr: 0.1}}\n", "stages.vlm.*lrr"),  # a stage's own config
    ("stages: {mome: {aia: {und_wieght: 0.1}}}\n", "und_wieght"),  # two levels down
    ("stages: {vlm: {init_generation: true}}\n", "init_generation"),  # another stage's option
    ("legs: [{name: a, stage: mome, changed_wieght: 2}]\n", "legs.a.*changed_wieght"),
    ("legs: [{name: a, stage: mbaq}, {name: a, stage: mome}]\n", "taken"),
    ("legs: [{name: a, stage: pretrain}]\n", "pretrain"),
    ("stages: {vlmm: {steps: 2}}\n", "vlmm"),  # unknown stage
    ("nmae: x\n", "nmae"),  # top level
])
def test_load_recipe_names_the_unknown_key(tmp_path, text, bad):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=bad):
        load_recipe(str(path))


def test_load_recipe_rejects_a_non_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(str(path))


@pytest.mark.parametrize("cls", [EncoderConfig, QuantizerConfig, BackboneConfig, AIAConfig, DecoderConfig,
                                 ModelConfig, VLMConfig, MBAQConfig, MoMEConfig, DecoderStageConfig, RecipeConfig])
def test_defaults_are_valid(cls):
    cls()


@pytest.mark.parametrize("build, field", [
    (lambda: EncoderConfig(image_size=100, patch_size=16), "image_size"),
    (lambda: EncoderConfig(width=130, heads=4), "width"),
    (lambda: QuantizerConfig(codebooks=0), "codebooks"),
    (lambda: QuantizerConfig(codebook_size=1), "codebook_size"),
    (lambda: BackboneConfig(dim=130, heads=4), "dim"),
    (lambda: BackboneConfig(heads=4, kv_heads=3), "kv_heads"),
    (lambda: BackboneConfig(dim=12, heads=4, kv_heads=4), "RoPE"),  # head_dim 3 is odd
    (lambda: BackboneConfig(image_rope="3d"), "image_rope"),
    (lambda: AIAStage(start=1.0, target=0.1, delta=0.1), "start"),
    (lambda: AIAStage(start=0.0, target=1.5, delta=0.1), "target"),
    (lambda: AIAStage(start=0.0, target=0.1, delta=0.0), "delta"),
    (lambda: AIAConfig(und_stages=[AIAStage(0.5, 0.1, 0.1)]), "und_stages"),
    (lambda: AIAConfig(gen_stages=[AIAStage(0.0, 0.1, 0.1), AIAStage(0.0, 0.2, 0.1)]), "gen_stages"),
    (lambda: DecoderConfig(prediction_type="noise"), "prediction_type"),
    (lambda: DecoderConfig(resolution=30, channels=[8, 16, 32]), "resolution"),
    (lambda: VLMConfig(steps=0), "steps"),
    (lambda: MBAQConfig(lr=0.0), "lr"),
    (lambda: MoMEConfig(batch_size=0), "batch_size"),
    (lambda: VLMConfig(text_weighting="row"), "text_weighting"),
    (lambda: MoMEConfig(worlds={"frozenlake": {"map_sizes": [2, 3]}}), "map_sizes"),
    (lambda: MoMEConfig(worlds={"lake": {}}), "lake"),
    (lambda: MoMEConfig(tasks={"vsp_plan": -1.0}), "weights"),
    (lambda: MoMEConfig(tasks={"vsp_plann": 1.0}), "vsp_plann"),
    (lambda: MoMEConfig(aia={"und_weight": -1.0}), "aia"),
    (lambda: DecoderStageConfig(changed_weight=0.5), "changed_weight"),
    (lambda: parse_recipe({"stages": {"pretrain": {}}}), "pretrain"),
])
def test_invalid_value_is_rejected_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
