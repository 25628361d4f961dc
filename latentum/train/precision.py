"""Precision by capability: ``precision: auto`` trains under bf16 autocast only where bf16 is fast.

bf16 matmuls are several times faster than fp32 on GPUs with bf16 tensor cores and on CPUs with AMX or
AVX-512 BF16, and about ten times slower on CPUs with neither (AVX2 only: 1-3 GFLOP/s), where autocast would
make training ruinously slow. The choice is read off the device (CUDA's own report, the CPU's flags) and, where
the flags say nothing, settled by timing one bf16 and one fp32 matmul; the runner prints it.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def bf16_matmul_is_faster(n: int = 512, repeats: int = 3) -> bool:
    """Measured: whether an (n, n) bf16 matmul beats the fp32 one on this CPU (best of ``repeats``)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best[torch.bfloat16] < best[torch.float32]


@cache
def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(Lightning precision, why) for ``precision: auto`` on this machine."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA device {torch.cuda.get_device_name()} supports bf16"
        return "16-mixed", f"CUDA device {torch.cuda.get_device_name()} has no bf16: fp16 autocast"
    flags = cpu_flags()
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return "bf16-mixed", f"the CPU has {' and '.join(found)}"
    if flags:
        return "32-true", "the CPU has neither amx_bf16 nor avx512_bf16 (bf16 matmuls would be ~10x slower)"
    if bf16_matmul_is_faster():
        return "bf16-mixed", "a bf16 matmul measured faster than fp32 on this CPU"
    return "32-true", "a bf16 matmul measured slower than fp32 on this CPU"


def resolve_precision(precision: str) -> str:
    """A leg's precision for Lightning: ``auto`` resolved (and said), anything else as given."""
    if precision != "auto":
        return precision
    chosen, why = auto_precision()
    print(f"precision auto -> {chosen} ({why})", flush=True)
    return chosen
