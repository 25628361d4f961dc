"""What a new user hits in the first hour (issue #27, "Boundaries"): every bad file, folder or argument is a
one-line error that names it and says what was expected (the CLI exits with code 2), never a traceback from
deep inside torch, and nothing is lost or half-written."""

from __future__ import annotations

import json
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentum.train.run  # noqa: F401  (Lightning's log handler keeps the stderr it sees at import: not capsys's)
from latentum import LatentImage, LatentUM
from latentum.apps import vsp
from latentum.checkpoint import load_model_folder, save_model_folder
from latentum.cli import main
from latentum.worlds import frozenlake as fl

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "recipes" / "debug.yaml"


def cli(argv, capsys) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture
def folder(untrained_model, tmp_path) -> Path:
    """A writable copy of a loadable model folder."""
    shutil.copytree(untrained_model, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture(scope="module")
def api(untrained_model) -> LatentUM:
    return LatentUM.from_pretrained(untrained_model)


@pytest.fixture(scope="module")
def board() -> np.ndarray:
    m = fl.LakeMap.from_desc(["SFFF", "FFFF", "FFFF", "FFFG"])
    return fl.render(m, style="gymnasium")


# --- broken model folders -----------------------------------------------------------------------------------
def test_a_truncated_weights_file_is_named(folder, capsys):
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    with pytest.raises(ValueError, match="model.safetensors.*not a readable safetensors file"):
        LatentUM.from_pretrained(folder)
    one_line_error(*cli(["generate", "a circle", "--model", folder], capsys), "model.safetensors")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["model"]["encoder"].update(image_size="128"), "model.encoder.image_size must be an int"),
    (lambda m: m["model"]["backbone"].update(dim=[32]), "model.backbone.dim must be an int"),
    (lambda m: m["model"]["quantizer"].update(norm_latents="yes"), "model.quantizer.norm_latents must be true or"),
    (lambda m: m["model"]["backbone"].update(rope_theta=float("nan")), "rope_theta must be a finite number"),
])
def test_a_wrong_typed_config_field_is_named(folder, capsys, edit, field):
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=field):
        LatentUM.from_pretrained(folder)
    one_line_error(*cli(["generate", "a circle", "--model", folder], capsys), "config.json", field.split()[0])


def test_a_wrong_shaped_config_field_says_the_weights_do_not_fit(folder, capsys):
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["backbone"]["ffn_hidden"] *= 2  # a valid config, but not the one the weights were saved with
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors.*does not fit the model of its config.json"):
        LatentUM.from_pretrained(folder)
    one_line_error(*cli(["generate", "a circle", "--model", folder], capsys), "does not fit")


@pytest.mark.parametrize("breaks, match", [
    (lambda f: (f / "config.json").write_bytes(b""), "config.json.*not valid JSON"),  # killed while writing
    (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda f: (f / "tokenizer.json").write_text("{"), "tokenizer.json.*not a readable tokenizer"),
    (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
])
def test_a_half_written_folder_is_named(folder, capsys, breaks, match):
    breaks(folder)
    with pytest.raises(ValueError, match=match):
        LatentUM.from_pretrained(folder)
    one_line_error(*cli(["generate", "a circle", "--model", folder], capsys), str(folder))


# --- writing folders ----------------------------------------------------------------------------------------
def test_an_export_is_atomic_and_a_failed_one_leaves_the_old_folder(untrained_model, tmp_path, monkeypatch):
    import latentum.checkpoint as ckpt

    model, tok = load_model_folder(untrained_model)
    target = tmp_path / "export"
    save_model_folder(model, tok, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def dies(*args, **kwargs):  # as if killed after config.json was written
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_model", dies)
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(model, tok, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the complete old export, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(model, tok, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # never a folder without its weights


def test_exported_files_are_world_readable(debug_run):
    files = [p for p in (debug_run / "model").rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in files}
    assert (debug_run / "model" / "decoder" / "model.safetensors") in files
    for p in files + [debug_run / "mome" / "export" / "model.safetensors"]:
        assert p.stat().st_mode & stat.S_IROTH, f"{p} is not world-readable"


def test_an_exported_model_records_where_it_came_from(debug_run):
    meta = json.loads((debug_run / "model" / "config.json").read_text())
    assert meta["origin"]["recipe"] == "debug" and meta["origin"]["leg"] == "mome"
    assert "git_commit" in meta["origin"]


class _Armed:
    """Unpickling this runs code: a resume must never unpickle a checkpoint (``weights_only=True``)."""

    fired = False

    def __reduce__(self):
        return (_fire, ())


def _fire():
    _Armed.fired = True
    return "fired"


def test_resume_never_unpickles_a_checkpoint(tmp_path):
    from latentum.train.config import load_recipe
    from latentum.train.run import train_leg

    ckpt = tmp_path / "vlm" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 1, "payload": _Armed()}, ckpt, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match="last.ckpt.*not a readable training checkpoint"):
        train_leg(load_recipe(str(DEBUG)), "vlm", tmp_path, resume=True, progress=False)
    assert not _Armed.fired


# --- bad arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.5, "3"])
def test_a_bad_cfg_scale_is_named(api, scale):
    with pytest.raises(ValueError, match="cfg_scale must be a finite number >= 1"):
        api.generate_images(["a circle"], cfg_scale=scale)


@pytest.mark.parametrize("seed", [2**70, -1])
def test_a_seed_out_of_range_is_named(api, board, seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        api.generate_images(["a circle"], seed=seed)
    with pytest.raises(ValueError, match="seed must be in"):
        api.answer(board, "Where is the player ?", seed=seed)
    with pytest.raises(ValueError, match="seed must be in"):
        vsp.plan(api, board, seed=seed)


@pytest.mark.parametrize("latent", [None, "ids", [None], []])
def test_render_of_something_else_is_named(api, latent):
    with pytest.raises(TypeError, match="latent must be a LatentImage"):
        api.render(latent)


def test_answer_batch_with_one_string_is_named(api, board):
    with pytest.raises(TypeError, match="questions must be a list, got str"):
        api.answer_batch([board], "Where is the player ?")
    with pytest.raises(TypeError, match="images must be a list"):
        api.answer_batch(board, ["Where is the player ?"])


def test_too_many_steps_for_the_context_are_named(api, board):
    """A map the model may walk around forever: 500 moves cannot fit the context, said before any work."""
    with pytest.raises(ValueError, match=r"max_steps=500 does not fit the model's context.*use at most \d+"):
        vsp.plan(api, board, max_steps=500)
    with pytest.raises(ValueError, match=r"actions\[0\]"):
        vsp.imagine(api, board, ["R", "L"] * 300)


def test_a_question_in_unknown_words_is_refused_naming_them(api, board, capsys):
    with pytest.raises(ValueError, match="question has words outside the model's vocabulary: 'zebra', 'tomorrow'"):
        api.answer(board, "Is there a zebra at row 1 column 2 tomorrow ?")
    with pytest.raises(ValueError, match=r"prompts\[1\] has words outside.*'unicorn'"):
        api.generate_images(["a red circle", "a unicorn"])
    assert api.answer(board, "Where is the player ?")  # known words are answered


def test_a_9x9_map_is_named_with_the_sizes_that_work(api, untrained_model, tmp_path, capsys):
    """The real env draws a 9x9 map at 512 px (a cell is not 64 px): planning it says which maps work."""
    m = fl.LakeMap.from_desc(["S" + "F" * 8] + ["F" * 9] * 7 + ["F" * 8 + "G"])
    path = tmp_path / "nine.png"
    Image.fromarray(fl.render_env(m)).save(path)
    one_line_error(*cli(["plan", path, "--model", untrained_model], capsys), "nine.png", "3..8 cells", "9x9")
    wide = np.zeros((576, 576, 3), np.uint8)  # 9 cells of 64 px
    with pytest.raises(ValueError, match=r"images\[0\]: image is not a FrozenLake map.*N in 3\.\.8, got 576x576"):
        vsp.plan(api, wide)


@pytest.mark.parametrize("ids, named", [
    (torch.zeros(16, 3, dtype=torch.long), "16 tokens of 3 codebooks"),  # another model's codebooks
    (torch.zeros(15, 2, dtype=torch.long), "15 tokens"),  # not a square grid
    (torch.full((16, 2), 10_000), "ids in"),  # outside the codebooks
    (torch.zeros(16, 2), "long"),
])
def test_a_latent_image_that_is_not_this_models_is_named(api, ids, named):
    with pytest.raises(ValueError, match=named):
        api.answer(LatentImage(ids), "Where is the player ?")
    with pytest.raises(ValueError, match=named):
        api.render(LatentImage(ids))


# --- recipes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, named", [
    ("stages: {vlm: {steps: ten}}\n", "stages.vlm.steps must be an int"),
    ("model: {encoder: {image_size: 64.5}}\n", "model.encoder.image_size must be an int"),
    ("decoder: {channels: 8}\n", "decoder.channels must be a list of an int"),
    ("stages: {vlm: {tasks: [vsp_plan]}}\n", "stages.vlm.tasks must be a mapping"),
    ("stages: {vlm: {worlds: {frozenlake: {map_sizes: [9]}}}}\n", "map_sizes"),
    ("stages: [vlm]\n", "stages must be a mapping"),
    ("{unclosed\n", "not valid YAML"),
    ("stages: {vlm: {strategy: dpp}}\n", "strategy must be one of"),
])
def test_a_bad_recipe_field_exits_2_naming_the_file_and_field(tmp_path, capsys, text, named):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    one_line_error(*cli(["train", "--config", path, "--out", tmp_path / "run"], capsys), "recipe.yaml", named)


@pytest.mark.parametrize("flag, value, named", [("--strategy", "dpp", "--strategy must be one of"),
                                                ("--steps", "0", "--steps must be >= 1"),
                                                ("--devices", "-2", "--devices must be >= 1")])
def test_a_bad_train_override_exits_2_naming_the_flag(tmp_path, capsys, flag, value, named):
    one_line_error(*cli(["train", "--config", DEBUG, flag, value, "--out", tmp_path / "run"], capsys), named)
    assert not (tmp_path / "run").exists()  # refused before anything was written
