"""The benchmark scripts run (on the tiny settings they offer): they measure nothing here, but a script that
no longer runs would only be found on the day a GPU is lent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_tiny_smoke_on_the_cpu():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--steps", "1", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                  "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tokens_per_s=" in out and "batch 16:" in out and "planning 8x8: batched" in out


def test_speed_prints_every_figure_beside_its_peer():
    proc = subprocess.run([sys.executable, "benchmarks/speed.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x" in line.split("|")[-2]]
    assert len(rows) + ("not timed: bf16 was already slow" in proc.stdout) == 13  # (no bf16 at d=512 where slow)
    assert "same tokens: True" in proc.stdout  # the engine decodes what transformers does
    assert "same outputs: True" in proc.stdout and "same plans: True" in proc.stdout  # batched equals alone
