import pytest
import torch

from latentum.config import HeadConfig
from latentum.generation.sampling import sample_codes
from latentum.losses.tokens import code_loss, sample_weights, text_loss
from latentum.model.heads import CellPositions, DepthHead, VisualProjector
from latentum.types import GREEDY, SamplingParams

D, G, K, M = 16, 4, 11, 6


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return DepthHead(HeadConfig(depth=2, heads=2, mlp_ratio=2), D, G, K).eval()


def h_(seed=0, m=M):
    return torch.randn(m, D, generator=torch.Generator().manual_seed(seed))


def ids_(seed=0, m=M):
    return torch.randint(0, K, (m, G), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_loss(head):
    logits = head(h_(), ids_())
    assert logits.shape == (M, G, K)
    out = code_loss(head(h_(), ids_()), ids_())
    assert torch.isfinite(out.total) and set(out.parts) == {"ce", *(f"acc/d{g}" for g in range(G))}
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, K), ids_().reshape(-1))
    assert torch.allclose(out.total, ref, atol=1e-6)


def test_causal_over_depth(head):
    """Logits at depth g see only ids[:, :g]: changing ids at >= g leaves depths <= g unchanged."""
    ids = ids_()
    base = head(h_(), ids)
    for g in range(G):
        other = ids.clone()
        other[:, g:] = (other[:, g:] + 1 + torch.arange(G - g)) % K
        changed = head(h_(), other)
        assert torch.allclose(changed[:, : g + 1], base[:, : g + 1], atol=1e-6)
        if g + 1 < G:
            assert not torch.allclose(changed[:, g + 1:], base[:, g + 1:])


def test_greedy_sample_is_consistent_with_teacher_forcing(head):
    ids = sample_codes(head, h_(), GREEDY)
    assert ids.shape == (M, G) and ids.dtype == torch.long
    assert torch.equal(head(h_(), ids).argmax(-1), ids)


def test_seeded_sampling_is_reproducible_and_in_range(head):
    p = SamplingParams(temperature=1.0, top_k=5)
    a = sample_codes(head, h_(), p, generator=torch.Generator().manual_seed(3))
    b = sample_codes(head, h_(), p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < K


def test_cfg_scale_one_equals_no_cfg(head):
    p = SamplingParams(temperature=1.0)
    plain = sample_codes(head, h_(), p, generator=torch.Generator().manual_seed(1))
    cfg1 = sample_codes(head, h_(), p, generator=torch.Generator().manual_seed(1), h_uncond=h_(9), cfg_scale=1.0)
    assert torch.equal(plain, cfg1)


def test_cfg_guides_logits_at_every_depth(head):
    """Greedy CFG ids equal argmax of l_u + s (l_c - l_u) from teacher forcing on those same ids."""
    s = 3.0
    ids = sample_codes(head, h_(), GREEDY, h_uncond=h_(9), cfg_scale=s)
    l_c, l_u = head(h_(), ids), head(h_(9), ids)
    assert torch.equal((l_u + s * (l_c - l_u)).argmax(-1), ids)
    assert not torch.equal(ids, sample_codes(head, h_(), GREEDY))  # guidance does change something here


def test_single_codebook_head():
    head = DepthHead(HeadConfig(depth=1, heads=2), D, 1, K)
    assert head(h_(), ids_()[:, :1]).shape == (M, 1, K)
    assert sample_codes(head, h_(), GREEDY).shape == (M, 1)


def test_gradient_reaches_h_and_every_depth_embedding(head):
    h = h_().requires_grad_()
    code_loss(head(h, ids_()), ids_()).total.backward()
    assert h.grad.abs().sum() > 0
    assert all(e.weight.grad is not None and e.weight.grad.abs().sum() > 0 for e in head.embeds)
    head.zero_grad()


def test_bad_inputs(head):
    with pytest.raises(ValueError, match="ids"):
        head(h_(), ids_()[:, :2])
    with pytest.raises(ValueError, match="ids"):
        head(h_(), ids_() + K)
    with pytest.raises(ValueError, match="h "):
        head(torch.zeros(M, D + 1), ids_())
    with pytest.raises(ValueError, match="h_uncond"):
        sample_codes(head, h_(), GREEDY, h_uncond=h_(m=M + 1), cfg_scale=2.0)
    with pytest.raises(ValueError, match="heads"):
        DepthHead(HeadConfig(heads=3), D, G, K)


def test_visual_projector():
    proj = VisualProjector(8, D)
    assert proj(torch.randn(2, 5, 8)).shape == (2, 5, D)
    with pytest.raises(ValueError, match="z_q"):
        proj(torch.randn(2, 5, 9))


def test_cell_positions_are_row_plus_column_and_zero_for_none():
    pos = CellPositions(grid=4, dim=8)
    cells = torch.tensor([[0, 5, -1], [15, 4, 1]])
    out = pos(cells)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[0, 1], pos.row[1] + pos.col[1])
    torch.testing.assert_close(out[1, 0], pos.row[3] + pos.col[3])
    assert (out[0, 2] == 0).all()
    with pytest.raises(ValueError, match="cells"):
        pos(torch.tensor([16]))


def test_weighted_loss_averages_per_token_ce(head):
    h, ids = h_(), ids_()
    per_token = torch.nn.functional.cross_entropy(head(h, ids).permute(0, 2, 1), ids, reduction="none").mean(1)
    assert torch.allclose(code_loss(head(h, ids), ids, torch.ones(M)).total, per_token.mean(), atol=1e-6)
    only_two = torch.zeros(M).index_fill(0, torch.tensor([1, 4]), 1.0)
    assert torch.allclose(code_loss(head(h, ids), ids, only_two).total, per_token[[1, 4]].mean(), atol=1e-6)
    w = torch.rand(M, generator=torch.Generator().manual_seed(1)) + 0.5
    assert torch.allclose(code_loss(head(h, ids), ids, w).total, (w * per_token).sum() / w.sum(), atol=1e-6)


def test_sample_weighted_text_loss_is_the_mean_of_per_row_means():
    """A row's answer weighs the same whatever its length; uniform weights give back the token mean."""
    V = 7
    sup = torch.tensor([[True, False, False, False], [True, True, True, True], [False, False, False, False]])
    logits = torch.randn(int(sup.sum()), V, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, V, (int(sup.sum()),), generator=torch.Generator().manual_seed(2))
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    out = text_loss(logits, targets, sample_weights(sup))
    assert torch.allclose(out.total, (ce[0] + ce[1:].mean()) / 2, atol=1e-6)
    assert torch.allclose(text_loss(logits, targets).total, ce.mean(), atol=1e-6)
    assert torch.allclose(text_loss(logits, targets, torch.ones(len(targets))).total, ce.mean(), atol=1e-6)
