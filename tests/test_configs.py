"""Configs: every shipped YAML parses and round-trips; typos and invalid values fail with errors that name
the offending key or field."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentum.config import (
    STAGES,
    AIAConfig,
    AIAStage,
    BackboneConfig,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    QuantizerConfig,
    RecipeConfig,
    TrainConfig,
    from_dict,
    load_recipe,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.stem for p in YAMLS} >= {"debug", "tiny"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_shipped_yaml_parses_and_round_trips(path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, RecipeConfig)
    assert recipe.stages and set(recipe.stages) <= set(STAGES)
    assert all(isinstance(c, TrainConfig) for c in recipe.stages.values())
    # config.json of an export is to_dict of the config: it must rebuild the same config.
    assert from_dict(RecipeConfig, to_dict(recipe)) == recipe


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_shipped_yaml_names_only_known_tasks(path):
    """config.py cannot check task names (it imports nothing heavy); a typo would only fail at train time."""
    from latentum.data.worlds import TASKS

    for stage, cfg in load_recipe(str(path)).stages.items():
        assert cfg.tasks, f"{path.name}: stage {stage!r} has no tasks"
        assert set(cfg.tasks) <= set(TASKS), f"{path.name}: stage {stage!r}: {set(cfg.tasks) - set(TASKS)}"


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="stpes") as e:
        from_dict(TrainConfig, {"steps": 5, "stpes": 6})
    assert "TrainConfig" in str(e.value)


@pytest.mark.parametrize("text, bad", [
    ("model: {backbone: {dimm: 32}}\n", "dimm"),  # nested dataclass
    ("stages: {vlm: {steps: 2, lrr: 0.1}}\n", "lrr"),  # per-stage TrainConfig
    ("stages: {vlm: {aia: {und_wieght: 0.1}}}\n", "und_wieght"),  # two levels down
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
                                 ModelConfig, TrainConfig, RecipeConfig])
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
    (lambda: TrainConfig(steps=0), "steps"),
    (lambda: TrainConfig(lr=0.0), "lr"),
    (lambda: TrainConfig(batch_size=0), "batch_size"),
    (lambda: TrainConfig(map_sizes=[2, 3]), "map_sizes"),
    (lambda: TrainConfig(tasks={"vsp_plan": -1.0}), "task weights"),
    (lambda: TrainConfig(aia={"und_weight": -1.0}), "aia"),
    (lambda: RecipeConfig(stages={"pretrain": {}}), "pretrain"),
])
def test_invalid_value_is_rejected_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
