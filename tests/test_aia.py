"""AIA: span attention mass (LSE form) against the eager attention map, stage targets, the Huber loss."""

from __future__ import annotations

import pytest
import torch
from einops import repeat

from latentum.config import AIAConfig, AIAStage
from latentum.losses.aia import aia_loss, stage_targets
from latentum.model.attention import span_attention_mass


def _eager_mass(q, k, allowed, query_mask, key_mask):
    """Reference: full softmax map, summed over the key span, averaged over heads and live span rows."""
    B, H, T, d = q.shape
    kk = repeat(k, "b k s d -> b (k r) s d", r=H // k.shape[1])
    scores = (q @ kk.transpose(-1, -2)) * d**-0.5  # (B, H, T, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    attn = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    per_row = (attn * key_mask[:, None, None, :]).sum(-1).mean(1)  # (B, T)
    live = query_mask & allowed.any(-1)
    return (per_row * live).sum(1) / live.sum(1).clamp(min=1)


def _case(seed: int = 0, B: int = 4, H: int = 4, K: int = 2, T: int = 6, past: int = 3, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    S = past + T
    q = torch.randn(B, H, T, d, generator=g, requires_grad=True)
    k = torch.randn(B, K, S, d, generator=g, requires_grad=True)
    causal = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]  # (T, S)
    key_valid = torch.rand(B, S, generator=g) < 0.8
    allowed = causal[None] & key_valid[:, None, :]
    allowed[1, 0] = False  # a padded query row with no key at all
    query_mask = torch.rand(B, T, generator=g) < 0.6
    query_mask[1, 0] = True  # ... that sits inside the query span
    query_mask[3] = False  # a sample with an empty query span
    key_mask = torch.rand(B, S, generator=g) < 0.5
    return q, k, allowed, query_mask, key_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_span_mass_equals_eager_attention_map(seed):
    q, k, allowed, qm, km = _case(seed)
    fast = span_attention_mass(q, k, allowed, qm, km)
    eager = _eager_mass(q, k, allowed, qm, km)
    assert fast.shape == (4,)
    assert (fast - eager).abs().max() < 1e-5
    assert fast[3] == 0
    g_fast = torch.autograd.grad(fast.sum(), (q, k))
    g_eager = torch.autograd.grad(eager.sum(), (q, k))
    for a, b in zip(g_fast, g_eager):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-5


def test_uniform_attention_gives_key_fraction():
    B, H, K, T, S, d = 2, 4, 1, 3, 10, 8
    q = torch.zeros(B, H, T, d)  # all logits equal -> uniform attention over the allowed keys
    k = torch.randn(B, K, S, d)
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    key_mask = torch.zeros(B, S, dtype=torch.bool)
    key_mask[0, :3] = True
    key_mask[1, 2:9] = True
    mass = span_attention_mass(q, k, allowed, torch.ones(B, T, dtype=torch.bool), key_mask)
    assert torch.allclose(mass, torch.tensor([3 / 10, 7 / 10]), atol=1e-6)


def test_span_mass_rejects_bad_shapes():
    q, k, allowed, qm, km = _case()
    with pytest.raises(ValueError, match="key_mask"):
        span_attention_mass(q, k, allowed, qm, km[:, :-1])
    with pytest.raises(ValueError, match="k must be"):
        span_attention_mass(q, k[:, :, :, :4], allowed, qm, km)


def test_stage_targets_match_the_janus_table():
    """30 layers with the default gen stages reproduce AIA's Janus-Pro generation table (reference §1.3)."""
    targets, deltas = stage_targets(AIAConfig().gen_stages, 30)
    assert targets.shape == deltas.shape == (30,)
    assert torch.allclose(targets, torch.tensor([0.4] * 25 + [0.2] * 5))
    assert torch.allclose(deltas, torch.tensor([0.2] * 10 + [0.1] * 15 + [0.05] * 5))
    und, _ = stage_targets(AIAConfig().und_stages, 6)
    assert torch.allclose(und, torch.tensor([0.10, 0.10, 0.15, 0.15, 0.30, 0.30]))
    one, _ = stage_targets([AIAStage(0.0, 0.3, 0.1)], 1)
    assert one.tolist() == pytest.approx([0.3])


def test_aia_loss_equals_torch_huber_reference():
    cfg = AIAConfig(und_weight=0.7, gen_weight=0.3)
    L, B = 6, 5
    mass = torch.rand(L, B)
    task = torch.tensor([0, 1, 1, 0, 1])
    valid = torch.tensor([True, True, False, True, True])
    out = aia_loss(mass, task, valid, cfg)
    ref = torch.zeros(())
    for b in range(B):
        stages, w = (cfg.gen_stages, cfg.gen_weight) if task[b] == 1 else (cfg.und_stages, cfg.und_weight)
        t, dl = stage_targets(stages, L)
        for layer in range(L):
            h = torch.nn.HuberLoss(delta=dl[layer].item())(mass[layer, b], t[layer])
            ref = ref + w * valid[b] * h
    assert torch.allclose(out.total, ref / (L * B), atol=1e-7)
    assert set(out.parts) == {"aia_und", "aia_gen", "intensity_und", "intensity_gen"}
    assert torch.allclose(out.parts["aia_und"] + out.parts["aia_gen"], out.total)
    assert torch.allclose(out.parts["intensity_gen"], mass[:, [1, 4]].mean())


def test_invalid_samples_get_zero_gradient_even_when_nan():
    L, B = 4, 3
    mass = torch.rand(L, B)
    mass[:, 1] = float("nan")  # e.g. a CFG-dropped sample with no prompt keys
    mass.requires_grad_(True)
    valid = torch.tensor([True, False, True])
    out = aia_loss(mass, torch.tensor([1, 1, 0]), valid, AIAConfig())
    out.total.backward()
    assert torch.isfinite(out.total)
    assert torch.equal(mass.grad[:, 1], torch.zeros(L))
    assert (mass.grad[:, [0, 2]] != 0).all()


def test_huber_gradient_is_clipped_at_delta():
    cfg = AIAConfig(und_weight=1.0, gen_weight=1.0, und_stages=[AIAStage(0.0, 0.2, 0.05)],
                    gen_stages=[AIAStage(0.0, 0.4, 0.1)])
    mass = torch.tensor([[1.0, 0.0, 0.22, 0.45]], requires_grad=True)  # L=1, B=4
    task = torch.tensor([0, 1, 0, 1])
    aia_loss(mass, task, torch.ones(4, dtype=torch.bool), cfg).total.backward()
    # Far above/below target -> +-delta; inside the quadratic zone -> the residual. All over L*B = 4.
    expected = torch.tensor([[0.05, -0.1, 0.02, 0.05]]) / 4
    assert torch.allclose(mass.grad, expected, atol=1e-6)


def test_aia_loss_rejects_bad_inputs():
    mass = torch.rand(2, 3)
    ok = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="task"):
        aia_loss(mass, torch.tensor([0, 2, 1]), ok, AIAConfig())
    with pytest.raises(ValueError, match="valid"):
        aia_loss(mass, torch.tensor([0, 1, 1]), ok.float(), AIAConfig())
    with pytest.raises(ValueError, match="mass"):
        aia_loss(mass[0], torch.tensor([0, 1, 1]), ok, AIAConfig())
