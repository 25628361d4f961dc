"""The ``latentum`` command: every command documents itself, bad input exits with code 2 and a message that
names the argument, and the main commands run end to end on small models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import latentum.train.run  # noqa: F401  (Lightning's log handler keeps the stderr it sees at import: not capsys's)
from latentum.cli import build_parser, main
from latentum.train.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "plan", "generate", "answer", "demo", "convert")
# Positional arguments that let each model-loading command reach the model (the files need not exist).
MODEL_COMMANDS = {
    "eval": ["vsp"],
    "plan": ["map.png"],
    "generate": ["a red circle"],
    "answer": ["map.png", "Is there a hole at row 1 column 1 ?"],
    "demo": [],
}


def run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr), whether it returns a code or argparse raises SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def squash(text: str) -> str:
    return " ".join(text.split())


def subparsers() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices


def test_the_documented_commands_exist():
    assert set(subparsers()) == set(COMMANDS)


def test_top_level_help(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert squash(build_parser().description) in squash(out)
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_prints_its_description(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    description = subparsers()[command].description
    assert description and squash(description) in squash(out)
    assert out.startswith(f"usage: latentum {command}")


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "usage: latentum" in err


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_bad_model_folder_exits_2_naming_it(command, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code, out, err = run([command, *MODEL_COMMANDS[command], "--model", missing], capsys)
    assert code == 2
    assert f"latentum {command}: error:" in err and "--model" in err and str(missing) in err
    assert "Traceback" not in err and out == ""


def test_model_folder_without_weights_exits_2(untrained_model, tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((untrained_model / "config.json").read_bytes())
    code, _, err = run(["answer", "map.png", "q ?", "--model", tmp_path], capsys)
    assert code == 2 and "latentum answer: error:" in err and "model.safetensors" in err


def test_foreign_config_json_exits_2(tmp_path, capsys):
    """A folder whose config.json is not a latentum config (e.g. a Hugging Face model) is a usage error."""
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    code, _, err = run(["answer", "map.png", "q ?", "--model", tmp_path], capsys)
    assert code == 2 and "latentum answer: error:" in err


@pytest.mark.parametrize("content", [b"this is not a png\n", None], ids=["not-an-image", "missing"])
def test_plan_rejects_a_non_image_file(untrained_model, tmp_path, capsys, content):
    path = tmp_path / "map.png"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(["plan", path, "--model", untrained_model], capsys)
    assert code == 2
    assert "latentum plan: error: image" in err and str(path) in err
    assert out == ""


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_train_parses_every_shipped_yaml_then_rejects_a_bad_stage(path, tmp_path, capsys):
    """The YAML goes through the real CLI (load_recipe and the overrides) before the stage is checked."""
    code, _, err = run(["train", "--config", path, "--stage", "bogus", "--out", tmp_path], capsys)
    assert code == 2 and "has no leg 'bogus'" in err


def test_train_rejects_a_missing_config(tmp_path, capsys):
    code, _, err = run(["train", "--config", tmp_path / "nope.yaml", "--out", tmp_path], capsys)
    assert code == 2 and "nope.yaml" in err


def _map_png(tmp_path: Path) -> Path:
    from latentum.worlds import frozenlake as fl

    m = fl.generate_map(3, np.random.default_rng(0))
    path = tmp_path / "map.png"
    Image.fromarray(fl.render(m, m.player, "gymnasium")).save(path)
    return path


def test_plan_and_answer_run_on_a_map(untrained_model, tmp_path, capsys):
    image = _map_png(tmp_path)
    code, out, err = run(["plan", image, "--model", untrained_model, "--max-steps", 2], capsys)
    assert code == 0, err
    assert out.startswith("plan:") and "strict rule" in out
    code, out, err = run(["answer", image, "Is there a hole at row 1 column 2 ?", "--model", untrained_model],
                         capsys)
    assert code == 0, err
    assert out.endswith("\n") and len(out.splitlines()) == 1


def test_generate_writes_one_png_per_prompt(debug_run, tmp_path, capsys):
    prompts = ["a red circle", "two blue squares"]
    code, out, err = run(["generate", *prompts, "--model", debug_run / "model", "--out", tmp_path], capsys)
    assert code == 0, err
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["00.png", "01.png"]
    side = load_recipe(str(ROOT / "configs" / "recipes" / "debug.yaml")).decoder.resolution  # what debug_run trained
    assert all(Image.open(f).size == (side, side) for f in files)
    assert all(p in out for p in prompts)


def test_generate_refine_writes_every_round_and_the_pick(debug_run, tmp_path, capsys):
    code, out, err = run(["generate", "a red circle", "--refine", "2", "--model", debug_run / "model", "--out",
                          tmp_path], capsys)
    assert code == 0, err
    names = sorted(f.name for f in tmp_path.glob("*.png"))
    assert "00.png" in names and 2 <= len(names) <= 4 and "00_r0.png" in names
    assert "the model says:" in out and "the one it judges best" in out
    code, out, err = run(["generate", "a red circle", "--best-of", "3", "--model", debug_run / "model", "--out",
                          tmp_path / "b"], capsys)
    assert code == 0, err
    assert [f.name for f in (tmp_path / "b").glob("*.png")] == ["00.png"]


def test_generate_refine_on_a_model_not_trained_to_reflect_is_a_one_line_error(tmp_path, capsys):
    code, out, err = run(["generate", "a red circle", "--refine", "1", "--out", tmp_path], capsys)
    assert code == 2 and "not trained to reflect" in err and len(err.strip().splitlines()) == 1


def test_demo_shapes_writes_the_grid(debug_run, tmp_path, capsys):
    code, out, err = run(["demo", "shapes", "--model", debug_run / "model", "--out", tmp_path], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 7 and all("oracle" in x and "reads:" in x and "refine:" in x for x in lines[:6])
    sheet = Image.open(tmp_path / "shapes.png")
    assert sheet.size[1] > 6 * 128 and sheet.size[0] >= 2 * 128  # six rows; the refine rounds beside the image
