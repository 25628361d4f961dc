import pytest
import torch
import torch.nn.functional as F

from latentum.config import QuantizerConfig
from latentum.losses.behaviour import behaviour_kl, mbaq_loss
from latentum.model.quantizer import MBAQ, USAGE_DECAY
from latentum.types import LossBreakdown

CFG = QuantizerConfig(codebooks=3, codebook_size=16, code_dim=4, hidden_dim=32)
FEAT, OUT = 12, 20


def make(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return MBAQ(cfg, feature_dim=FEAT, out_dim=OUT)


def feats(b=2, n=8, seed=1):
    return torch.randn(b, n, FEAT, generator=torch.Generator().manual_seed(seed))


def test_shapes_range_and_finite_loss():
    q = make()
    out = q.encode(feats())
    assert out.codes.shape == (2, 8, CFG.dim) and out.ids.shape == (2, 8, CFG.codebooks)
    assert out.ids.dtype == torch.long and out.ids.min() >= 0 and out.ids.max() < CFG.codebook_size
    assert isinstance(out.loss, LossBreakdown) and torch.isfinite(out.loss.total)
    assert set(out.loss.parts) == {"codebook", "commit", "entropy"}
    assert q.project(out.codes).shape == (2, 8, OUT)


@pytest.mark.parametrize("training", [False, True])
def test_codes_from_ids_is_exact_inverse(training):
    q = make().train(training)
    with torch.no_grad():
        out = q.encode(feats())
        assert torch.equal(q.codes_from_ids(out.ids), out.codes)


def test_ids_are_nearest_code_per_chunk():
    q = make().eval()
    x = feats()
    with torch.no_grad():
        z = q.down(x).reshape(2, 8, CFG.codebooks, CFG.code_dim)
        dist = torch.cdist(z.transpose(0, 2).reshape(CFG.codebooks, -1, CFG.code_dim), q.vq.codebook)
        expect = dist.argmin(-1).reshape(CFG.codebooks, 8, 2).permute(2, 1, 0)
        assert torch.equal(q.encode(x).ids, expect)


def test_norm_latents_searches_the_layer_normalised_z_and_adds_no_weights():
    import dataclasses

    cfg = dataclasses.replace(CFG, norm_latents=True)
    q, plain = make(cfg=cfg).eval(), make().eval()
    assert q.state_dict().keys() == plain.state_dict().keys()  # old checkpoints load either way
    x = feats() * 50  # a far-out z keeps unit scale
    with torch.no_grad():
        z = F.layer_norm(q.down(x), (cfg.dim,)).reshape(2, 8, cfg.codebooks, cfg.code_dim)
        dist = torch.cdist(z.transpose(0, 2).reshape(cfg.codebooks, -1, cfg.code_dim), q.vq.codebook)
        expect = dist.argmin(-1).reshape(cfg.codebooks, 8, 2).permute(2, 1, 0)
        assert torch.equal(q.encode(x).ids, expect)
        assert not torch.equal(plain.encode(x).ids, expect)


def test_straight_through_gradient_reaches_down_projection_and_codebook():
    q = make().train()
    out = q.encode(feats())
    (q.project(out.codes).pow(2).mean() + out.loss.total).backward()
    assert q.down[0].weight.grad is not None and q.down[0].weight.grad.abs().sum() > 0
    assert q.vq.codebook.grad is not None and q.vq.codebook.grad.abs().sum() > 0


def test_deterministic_in_eval_and_eval_leaves_state_alone():
    q = make().eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    a, b = q.encode(feats()), q.encode(feats())
    assert torch.equal(a.ids, b.ids) and torch.equal(a.codes, b.codes)
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())


def test_dead_codes_are_revived_from_the_batch():
    """Collapse each codebook onto code 0 (others far away, zero usage); one training step re-seeds them."""
    q = make().train()
    cb = q.vq._codebook
    with torch.no_grad():
        cb.embed.fill_(100.0)
        cb.embed[:, 0] = 0.0
        cb.cluster_size.zero_()
        cb.cluster_size[:, 0] = 1e3
    x = feats(b=4, n=16)
    q.eval()
    assert q.encode(x).ids.unique().numel() == 1
    q.train()
    q.encode(x)
    q.eval()
    ids = q.encode(x).ids
    used = [ids[..., g].unique().numel() for g in range(CFG.codebooks)]
    assert min(used) > CFG.codebook_size // 2, used


def test_usage_tracks_ema_of_code_frequencies():
    q = make().train()
    out = q.encode(feats())
    K = CFG.codebook_size
    for g in range(CFG.codebooks):
        freq = torch.bincount(out.ids[..., g].flatten(), minlength=K).float() / out.ids[..., g].numel()
        expect = USAGE_DECAY / K + (1 - USAGE_DECAY) * freq
        assert torch.allclose(q.usage_ema[g], expect, atol=1e-6)
    stats = q.usage()
    assert 1.0 <= stats["perplexity"] <= K and 0.0 <= stats["used_frac"] <= 1.0
    assert stats["dead"] == sum(stats[f"cb{g}/dead"] for g in range(CFG.codebooks))


def test_usage_reports_dead_codes():
    q = make()
    with torch.no_grad():
        q.usage_ema.zero_()
        q.usage_ema[:, :4] = 0.25  # 4 of 16 codes in use
    stats = q.usage()
    assert stats["dead"] == 12 * CFG.codebooks and stats["used_frac"] == pytest.approx(0.25)
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-5)


def test_entropy_bonus_is_maximal_for_uniform_soft_assignment():
    q = make()
    with torch.no_grad():
        q.vq._codebook.embed.zero_()  # every code equidistant -> uniform p_bar -> H = log K
    out = q.encode(feats())
    assert out.loss.parts["entropy"].item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=1e-5)


def test_bad_inputs_raise_naming_the_argument():
    q = make()
    with pytest.raises(ValueError, match="features"):
        q.encode(torch.zeros(2, 8, FEAT + 1))
    with pytest.raises(ValueError, match="ids"):
        q.codes_from_ids(torch.zeros(2, 8, CFG.codebooks + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        q.codes_from_ids(torch.full((2, 8, CFG.codebooks), CFG.codebook_size))
    with pytest.raises(ValueError, match="z_q"):
        q.project(torch.zeros(2, 8, CFG.dim + 1))


# -- behaviour alignment -------------------------------------------------------------------------------


def _logits(seed, shape=(2, 5, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


MASK = torch.tensor([[False, True, True, False, True], [False, False, True, True, False]])


def test_kl_zero_when_equal_and_positive_otherwise():
    t = _logits(0)
    assert behaviour_kl(t, t.clone(), MASK).abs() < 1e-6
    assert behaviour_kl(t, _logits(1), MASK) > 0


def test_kl_ignores_masked_positions_and_detaches_teacher():
    t, s = _logits(0).requires_grad_(), _logits(1).requires_grad_()
    s2 = s.detach().clone()
    s2[~MASK] = 1000 * torch.randn_like(s2[~MASK])
    assert torch.allclose(behaviour_kl(t, s, MASK), behaviour_kl(t, s2, MASK))
    behaviour_kl(t, s, MASK).backward()
    assert t.grad is None and s.grad[~MASK].abs().sum() == 0 and s.grad[MASK].abs().sum() > 0


def test_kl_matches_torch_kl_div():
    t, s = _logits(2), _logits(3)
    ref = F.kl_div(s[MASK].log_softmax(-1), t[MASK].log_softmax(-1), log_target=True, reduction="batchmean")
    assert torch.allclose(behaviour_kl(t, s, MASK), ref, atol=1e-6)


def test_mbaq_loss_adds_weighted_vq_term():
    t, s = _logits(0), _logits(1)
    vq = LossBreakdown(torch.tensor(0.5), {"commit": torch.tensor(0.1)})
    out = mbaq_loss(t, s, MASK, vq, vq_weight=2.0)
    assert torch.allclose(out.total, behaviour_kl(t, s, MASK) + 1.0)
    assert {"kl", "vq", "vq/commit"} <= set(out.parts)


def test_kl_rejects_bad_mask():
    with pytest.raises(ValueError, match="answer_mask"):
        behaviour_kl(_logits(0), _logits(1), MASK.float())


def test_used_recently_counts_the_codes_assigned_in_the_window():
    """The honest usage figure: a code counts only if some token took it in the last SEEN_WINDOW steps, however
    high its EMA still is (the EMA threshold keeps calling a code in use long after its last token)."""
    from latentum.model.quantizer import SEEN_WINDOW

    q = make().train()
    first = q.encode(feats()).ids  # step 0
    seen0 = [first[..., g].unique().numel() for g in range(CFG.codebooks)]
    stats = q.usage()
    assert [stats[f"cb{g}/used_recently"] for g in range(CFG.codebooks)] == seen0
    q.steps += SEEN_WINDOW + 1  # as if the window passed without these codes
    assert q.usage()["used_recently_frac"] == 0.0 and q.usage()["dead"] == 0  # the EMA still says all alive
