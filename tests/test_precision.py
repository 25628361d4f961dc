"""precision: auto (issue #30): bf16 autocast only where bf16 is fast, read off the device or measured."""

import pytest
import torch

from latentum.train import precision as P
from latentum.train.config import VLMConfig


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    P.auto_precision.cache_clear()
    yield
    P.auto_precision.cache_clear()


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma"}, "32-true"),  # an AMD / older Intel CPU: bf16 matmuls ~10x slower
    ({"avx2", "avx512_bf16", "amx_bf16", "amx_tile"}, "bf16-mixed"),
])
def test_auto_reads_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(P, "cpu_flags", lambda: flags)
    monkeypatch.setattr(P, "bf16_matmul_is_faster", lambda: pytest.fail("flags decide, no probe needed"))
    chosen, why = P.auto_precision()
    assert chosen == want and why


@pytest.mark.parametrize("flags", [set(), {"avx2", "avx512f", "avx512_bf16"}])
@pytest.mark.parametrize("faster, want", [(True, "bf16-mixed"), (False, "32-true")])
def test_where_flags_do_not_settle_it_a_measured_probe_decides(monkeypatch, flags, faster, want):
    """No flags to read, or AVX-512 BF16 without AMX (measured both ways on different CPUs)."""
    monkeypatch.setattr(P, "cpu_flags", lambda: flags)
    monkeypatch.setattr(P, "bf16_matmul_is_faster", lambda: (faster, "measured"))
    chosen, why = P.auto_precision()
    assert chosen == want and "measured" in why and ("no AMX" in why) == bool(flags)


def test_auto_is_the_default_and_is_said(monkeypatch, capsys):
    assert VLMConfig().precision == "auto"
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2"})
    assert P.resolve_precision("auto") == "32-true"
    assert "precision auto -> 32-true" in capsys.readouterr().out
    assert P.resolve_precision("bf16-mixed") == "bf16-mixed"  # an explicit choice stands


def test_the_probe_runs():
    faster, why = P.bf16_matmul_is_faster(n=64, repeats=1)
    assert isinstance(faster, bool) and "GFLOP/s" in why
