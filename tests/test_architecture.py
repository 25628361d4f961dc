"""The house's architecture holds: the import-linter contracts in pyproject.toml (imports only point down,
worlds and applications apart from the generic engine, no Lightning in model code) and no world's words in
the generic layers (issue #27)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ["api.py", "checkpoint.py", "config.py", "types.py", "generation", "model", "losses", "data"]
WORLD_WORDS = re.compile(r"(?i:frozen ?lake|(?<![-/])\bvsp|gymnasium|\bclassic\b|\bholes?\b|\bstools?\b|\belf\b)"
                         r"|\bShapes\b|shapes_")


def test_import_contracts_are_kept():
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[report.find("Contracts"):]
    assert "0 broken" in report and "5 kept" in report


def test_generic_layers_name_no_world():
    hits = []
    for entry in GENERIC:
        path = ROOT / "latentum" / entry
        for file in sorted([path] if path.is_file() else path.rglob("*.py")):
            for n, line in enumerate(file.read_text().splitlines(), 1):
                if WORLD_WORDS.search(line):
                    hits.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "world words in the generic layers:\n" + "\n".join(hits)
