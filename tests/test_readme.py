"""The README's Python example runs as written (on the debug-trained model instead of the shipped one), and
the README's two set-up commands are the ones .ci/run and the bootstrap script implement."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(debug_run, moves_first):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert "LatentUM.from_pretrained" in block
    code = block.replace('"checkpoints/tiny"', repr(str(debug_run / "model")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the point is to run the docs
    assert set(scope["plan"].actions) <= set("LDRU")
    assert scope["picture"].size[0] > 0


def test_readme_setup_commands_match_ci():
    assert "bash tools/bootstrap.sh && .venv/bin/latentum demo" in README
    assert "bash tools/bootstrap.sh && .venv/bin/python -m pytest" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/bootstrap.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_the_shapes_docs_examples_run(debug_run):
    """docs/shapes.md's examples, on the debug model (whose vocabulary has the reflection protocol's words)."""
    text = (ROOT / "docs" / "shapes.md").read_text()
    scope: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        code = block.replace('"checkpoints/tiny"', repr(str(debug_run / "model")))
        exec(compile(code, "docs/shapes.md", "exec"), scope)  # noqa: S102
    assert len(scope["rows"]) == 2 and scope["judged"].best < len(scope["judged"].images) <= 4
    assert type(scope["best"]).__name__ == "LatentImage" and len(scope["pictures"]) == 2
