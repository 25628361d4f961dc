"""Precision by capability: ``precision: auto`` trains under bf16 autocast only where bf16 is fast.

bf16 matmuls are several times faster than fp32 on GPUs with bf16 tensor cores and on CPUs with AMX, and about
ten times slower on CPUs with no bf16 instructions (AVX2 only: 1-3 GFLOP/s), where autocast would make training
ruinously slow. In between, a CPU with AVX-512 BF16 but no AMX can go either way (a 2-core Xeon measured bf16
matmuls at 0.65x fp32 and the training step at 0.6-0.7x). So the choice is read off the device where that
settles it (CUDA's own report, AMX, no bf16 flag at all) and otherwise measured by timing one bf16 and one fp32
matmul; the runner prints it.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch

AMX_FLAG, AVX512_BF16_FLAG = "amx_bf16", "avx512_bf16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def matmul_gflops(n: int = 512, repeats: int = 5) -> dict[torch.dtype, float]:
    """Measured GFLOP/s of an (n, n) fp32 and a bf16 matmul on this CPU: both warmed up first (the first matmuls
    after start-up run several times slower), then timed in turn, best of ``repeats``."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    xs = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    times = {dtype: [] for dtype in xs}
    for i in range(2 + repeats):
        for dtype, x in xs.items():
            t0 = time.perf_counter()
            x @ x
            if i >= 2:
                times[dtype].append(time.perf_counter() - t0)
    return {dtype: 2 * n**3 / min(t) / 1e9 for dtype, t in times.items()}


def bf16_matmul_is_faster(n: int = 512, repeats: int = 5) -> tuple[bool, str]:
    """(whether a bf16 matmul beats the fp32 one on this CPU, the measured figures in words)."""
    speed = matmul_gflops(n, repeats)
    bf16, fp32 = speed[torch.bfloat16], speed[torch.float32]
    return bf16 > fp32, f"a bf16 matmul measured {bf16:.0f} GFLOP/s against fp32's {fp32:.0f}"


@cache
def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(Lightning precision, why) for ``precision: auto`` on this machine."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA device {torch.cuda.get_device_name()} supports bf16"
        return "16-mixed", f"CUDA device {torch.cuda.get_device_name()} has no bf16: fp16 autocast"
    flags = cpu_flags()
    if AMX_FLAG in flags:
        return "bf16-mixed", f"the CPU has {AMX_FLAG}"
    if flags and AVX512_BF16_FLAG not in flags:
        return "32-true", f"the CPU has neither {AMX_FLAG} nor {AVX512_BF16_FLAG} (bf16 matmuls would be ~10x slower)"
    faster, measured = bf16_matmul_is_faster()
    given = f"the CPU has {AVX512_BF16_FLAG} but no AMX; " if flags else ""
    return ("bf16-mixed" if faster else "32-true"), given + measured


def resolve_precision(precision: str) -> str:
    """A leg's precision for Lightning: ``auto`` resolved (and said), anything else as given."""
    if precision != "auto":
        return precision
    chosen, why = auto_precision()
    print(f"precision auto -> {chosen} ({why})", flush=True)
    return chosen
