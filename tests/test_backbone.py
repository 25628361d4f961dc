"""MoME backbone and KV cache: cache equals no-cache, routing isolation, fork/replay, masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import latentum.model.backbone as bkb
from latentum.config import BackboneConfig
from latentum.model.backbone import AttentionSpans, MoMEBackbone
from latentum.model.cache import KVCache

CFG = BackboneConfig(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2, ffn_hidden=64, max_seq_len=64)
TOL = 1e-5


@pytest.fixture
def model() -> MoMEBackbone:
    torch.manual_seed(0)
    m = MoMEBackbone(CFG)
    # Make the branches differ clearly so that a routing mistake changes the numbers.
    with torch.no_grad():
        for p in m.branch_parameters("gen"):
            p.add_(0.05 * torch.randn_like(p))
    return m


def _left_padded(B: int, T: int, pads: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    valid = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]  # (B, T)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    gen_mask = torch.rand(B, T, generator=g) < 0.5
    return ids, valid, positions, gen_mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _prompt_draft_follow(model: MoMEBackbone, prompt, draft: torch.Tensor, fed: torch.Tensor, after: torch.Tensor):
    """Three cached forwards: ``prompt`` (``_left_padded``'s ids, valid, positions, gen_mask); a gen-branch draft
    (B, T) of which ``fed`` (B, T) is real (rows padded to the longest); then ``after`` (B, 2) on the und branch.
    Returns their hidden states and the cache."""
    ids, valid, positions, gen_mask = prompt
    B, T = draft.shape
    cache = model.new_cache(B, ids.shape[1] + T + after.shape[1])
    first = model(model.embed(ids), gen_mask, positions, cache=cache, key_valid=valid).hidden
    mid = model(model.embed(draft), torch.ones(B, T, dtype=torch.bool), positions[:, -1:] + 1 + torch.arange(T),
                cache=cache, key_valid=fed).hidden
    end = model(model.embed(after), torch.zeros(B, 2, dtype=torch.bool), positions[:, -1:] + 7 + torch.arange(2),
                cache=cache).hidden
    return first, mid, end, cache


def test_shapes_and_logits(model):
    B, T = 3, 5
    ids, valid, pos, gen = _left_padded(B, T, [0, 1, 2])
    out = model(model.embed(ids), gen, pos, key_valid=valid)
    assert out.hidden.shape == (B, T, CFG.dim) and out.attn_mass is None
    assert model.logits(out.hidden).shape == (B, T, CFG.vocab_size)
    spans = AttentionSpans(query=torch.ones(B, T, dtype=torch.bool), key=torch.zeros(B, T, dtype=torch.bool))
    out = model(model.embed(ids), gen, pos, key_valid=valid, spans=spans)
    assert out.attn_mass.shape == (CFG.depth, B)


@pytest.mark.parametrize("grad", [False, True])
def test_incremental_decoding_equals_full_forward(model, grad):
    """Prefill then token by token through the cache (left padding, mixed routing) == one forward."""
    B, T, P = 3, 9, 4
    ids, valid, pos, gen = _left_padded(B, T, [0, 2, 3])
    x = model.embed(ids)
    with torch.set_grad_enabled(grad):
        full = model(x, gen, pos, key_valid=valid).hidden
        cache = model.new_cache(B, max_len=16)
        steps = [model(x[:, :P], gen[:, :P], pos[:, :P], cache=cache, key_valid=valid[:, :P]).hidden]
        for t in range(P, T):
            s = slice(t, t + 1)
            steps.append(model(x[:, s], gen[:, s], pos[:, s], cache=cache, key_valid=valid[:, s]).hidden)
    assert cache.length == T
    assert torch.isfinite(full).all()
    assert _max_diff(torch.cat(steps, 1), full) < TOL


def test_chunked_prefill_with_mixed_routing_equals_no_cache(model):
    B, T = 2, 10
    ids, _, pos, _ = _left_padded(B, T, [0, 0])
    gen = torch.zeros(B, T, dtype=torch.bool)
    gen[0, 3:7] = True  # a gen span mid-sequence in one row, the other row all und
    gen[1, ::3] = True  # scattered gen tokens
    x = model.embed(ids)
    with torch.no_grad():
        full = model(x, gen, pos).hidden
        cache = model.new_cache(B, max_len=T)
        chunks, start = [], 0
        for size in (3, 1, 4, 2):
            s = slice(start, start + size)
            chunks.append(model(x[:, s], gen[:, s], pos[:, s], cache=cache).hidden)
            start += size
    assert _max_diff(torch.cat(chunks, 1), full) < TOL


@torch.no_grad()
def test_fork_generate_discard_replay_equals_fresh_prefill(model):
    """LatentUM §4: fork, generate through gen, discard the fork, replay through und == a fresh prefill."""
    B, P, G = 2, 5, 4
    ids = torch.randint(0, CFG.vocab_size, (B, P + G))
    x = model.embed(ids)
    pos = torch.arange(P + G).expand(B, -1)
    und = torch.zeros(B, P + G, dtype=torch.bool)
    cache = model.new_cache(B, max_len=32)
    model(x[:, :P], und[:, :P], pos[:, :P], cache=cache)
    k_before = cache.k[:, :, :, :P].clone()

    fork = cache.fork()
    for t in range(P, P + G):  # the gen branch fills the fork only
        model(x[:, t : t + 1], ~und[:, t : t + 1], pos[:, t : t + 1], cache=fork)
    assert fork.length == P + G and cache.length == P
    assert torch.equal(cache.k[:, :, :, :P], k_before)

    fresh = model(x, und, pos).hidden[:, P:]  # no cache, everything through und
    replay = model(x[:, P:], und[:, P:], pos[:, P:], cache=cache).hidden
    assert _max_diff(replay, fresh) < TOL

    model(model.embed(ids[:, :3]), und[:, :3], pos[:, :3] + P + G, cache=cache)  # junk to throw away
    cache.truncate(P)
    replay2 = model(x[:, P:], und[:, P:], pos[:, P:], cache=cache).hidden
    assert _max_diff(replay2, fresh) < TOL
    with pytest.raises(ValueError, match="length"):
        cache.truncate(P + G + 1)


@torch.no_grad()
def test_cache_reorder_selects_batch_rows(model):
    B, T, P = 2, 6, 4
    ids, _, pos, gen = _left_padded(B, T, [0, 0], seed=1)
    x = model.embed(ids)
    index = torch.tensor([1, 0, 1])  # CFG-style doubling with repeats
    full = model(x[index], gen[index], pos[index]).hidden
    cache = model.new_cache(B, max_len=T)
    model(x[:, :P], gen[:, :P], pos[:, :P], cache=cache)
    cache.reorder(index)
    assert cache.batch == 3
    tail = model(x[index, P:], gen[index, P:], pos[index, P:], cache=cache).hidden
    assert _max_diff(tail, full[:, P:]) < TOL


def test_cache_overflow_and_failed_forward_leave_cache_unchanged(model):
    cache = model.new_cache(1, max_len=4)
    x = model.embed(torch.zeros(1, 3, dtype=torch.long))
    pos = torch.arange(3)[None]
    gen = torch.zeros(1, 3, dtype=torch.bool)
    model(x, gen, pos, cache=cache)
    with pytest.raises(ValueError, match="limit=4"):
        model(x, gen, pos, cache=cache)
    assert cache.length == 3
    with pytest.raises(ValueError, match="KVCache"):
        KVCache(depth=0, batch=1, kv_heads=1, head_dim=2, max_len=4)


@torch.no_grad()
def test_a_growing_cache_gives_what_a_preallocated_one_gives(model):
    """A cache that starts small and doubles up to its limit decodes exactly as one allocated whole."""
    ids, valid, pos, gen = _left_padded(2, 11, [0, 2])
    x = model.embed(ids)
    outs = []
    for cache in (model.new_cache(2, max_len=16), KVCache(CFG.depth, 2, CFG.kv_heads, CFG.head_dim, 2, limit=16)):
        steps = [model(x[:, :3], gen[:, :3], pos[:, :3], cache=cache, key_valid=valid[:, :3]).hidden]
        for t in range(3, 11):
            s = slice(t, t + 1)
            steps.append(model(x[:, s], gen[:, s], pos[:, s], cache=cache, key_valid=valid[:, s]).hidden)
        outs.append(torch.cat(steps, 1))
    assert cache.max_len == 16 and torch.equal(outs[0], outs[1])


def test_routing_isolates_branch_gradients(model):
    """Attention limited to same-branch keys: a loss on one branch's tokens never reaches the other."""
    B, T = 2, 8
    ids, _, pos, gen = _left_padded(B, T, [0, 0], seed=3)
    gen[:, 0], gen[:, 1] = True, False  # both branches present in every row
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    same = gen[:, :, None] == gen[:, None, :]
    for loss_on, silent in ((gen, "und"), (~gen, "gen")):
        model.zero_grad()
        hidden = model(model.embed(ids), gen, pos, attn_mask=causal & same).hidden
        (hidden[loss_on] ** 2).sum().backward()
        live = "gen" if silent == "und" else "und"
        assert all(p.grad is None or not p.grad.any() for p in model.branch_parameters(silent))
        assert any(p.grad is not None and p.grad.any() for p in model.branch_parameters(live))
        assert model.embedding.weight.grad.any()


def test_parameter_groups_partition_the_model(model):
    groups = [list(model.branch_parameters("und")), list(model.branch_parameters("gen")),
              list(model.shared_parameters())]
    ids = [{id(p) for p in g} for g in groups]
    assert sum(len(s) for s in ids) == len({id(p) for p in model.parameters()})
    assert len(ids[0] | ids[1] | ids[2]) == len(list(model.parameters()))
    assert len(groups[0]) == len(groups[1]) > 0
    with pytest.raises(ValueError, match="branch"):
        list(model.branch_parameters("vision"))


@torch.no_grad()
def test_init_generation_branch_makes_branches_identical(model):
    B, T = 2, 7
    ids, _, pos, gen = _left_padded(B, T, [0, 0], seed=4)
    x = model.embed(ids)
    und_only = model(x, torch.zeros_like(gen), pos).hidden
    assert _max_diff(model(x, gen, pos).hidden, und_only) > 1e-3  # branches differ before the copy
    model.init_generation_branch()
    assert _max_diff(model(x, gen, pos).hidden, und_only) < TOL
    assert _max_diff(model(x, torch.ones_like(gen), pos).hidden, und_only) < TOL


@torch.no_grad()
def test_block_mask_generation_block_sees_only_a_prefix(model):
    """LatentUM dual sequence: U causal; a gen block sees U up to its delimiter and itself causally."""
    B, U, G, cut = 2, 6, 3, 3  # the block sees U[:cut]
    ids = torch.randint(0, CFG.vocab_size, (B, U + G))
    x = model.embed(ids)
    S = U + G
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[:U, :U] = torch.ones(U, U, dtype=torch.bool).tril()
    mask[U:, :cut] = True
    mask[U:, U:] = torch.ones(G, G, dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(U), torch.arange(cut, cut + G)]).expand(B, -1)
    gen = torch.zeros(B, S, dtype=torch.bool)
    gen[:, U:] = True
    out = model(x, gen, pos, attn_mask=mask.expand(B, S, S).clone()).hidden
    ref_u = model(x[:, :U], gen[:, :U], pos[:, :U]).hidden
    sel = torch.cat([torch.arange(cut), torch.arange(U, S)])
    ref_g = model(x[:, sel], gen[:, sel], pos[:, sel]).hidden[:, cut:]
    assert _max_diff(out[:, :U], ref_u) < TOL
    assert _max_diff(out[:, U:], ref_g) < TOL


def test_padding_queries_stay_finite_in_value_and_gradient(model):
    B, T = 2, 6
    ids, valid, pos, gen = _left_padded(B, T, [3, 0], seed=5)
    hidden = model(model.embed(ids), gen, pos, key_valid=valid).hidden
    assert torch.isfinite(hidden).all()
    hidden.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_mass_wiring(model):
    """The key span = every allowed key gives mass 1; an empty key span gives 0; an empty query span 0."""
    B, T = 3, 6
    ids, valid, pos, gen = _left_padded(B, T, [0, 2, 0], seed=6)
    query = valid.clone()
    query[2] = False  # empty query span
    full = model(model.embed(ids), gen, pos, key_valid=valid, spans=AttentionSpans(query, valid)).attn_mass
    assert torch.allclose(full[:, :2], torch.ones(CFG.depth, 2), atol=TOL)
    assert torch.equal(full[:, 2], torch.zeros(CFG.depth))
    none = model(model.embed(ids), gen, pos, key_valid=valid,
                 spans=AttentionSpans(query, torch.zeros_like(valid))).attn_mass
    assert torch.equal(none, torch.zeros(CFG.depth, B))
    half = torch.zeros_like(valid)
    half[:, :4] = True
    part = model(model.embed(ids), gen, pos, key_valid=valid, spans=AttentionSpans(query, half)).attn_mass
    assert ((part[:, :2] > 0) & (part[:, :2] < 1)).all()


def test_bad_inputs_name_the_argument(model):
    x = model.embed(torch.zeros(1, 4, dtype=torch.long))
    pos = torch.arange(4)[None]
    gen = torch.zeros(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="gen_mask"):
        model(x, gen.float(), pos)
    with pytest.raises(ValueError, match="positions"):
        model(x, gen, pos[:, :3])
    with pytest.raises(ValueError, match="attn_mask"):
        model(x, gen, pos, attn_mask=torch.ones(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        model(x[..., :8], gen, pos)
    with pytest.raises(TypeError, match="ids"):
        model.embed(torch.zeros(1, 4))


@torch.no_grad()
def test_left_padding_does_not_change_valid_tokens(model):
    """A left-padded row computes exactly what the same tokens compute alone, unpadded."""
    B, T, pad = 2, 7, 3
    ids, valid, pos, gen = _left_padded(B, T, [pad, 0], seed=7)
    padded = model(model.embed(ids), gen, pos, key_valid=valid).hidden[0, pad:]
    alone = model(model.embed(ids[:1, pad:]), gen[:1, pad:], pos[:1, pad:]).hidden[0]
    assert _max_diff(padded, alone) < TOL


def test_bf16_autocast_with_cache_runs(model):
    B, T = 2, 5
    ids, valid, pos, gen = _left_padded(B, T, [1, 0], seed=8)
    cache = model.new_cache(B, max_len=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(model.embed(ids[:, :4]), gen[:, :4], pos[:, :4], cache=cache, key_valid=valid[:, :4])
        out = model(model.embed(ids[:, 4:]), gen[:, 4:], pos[:, 4:], cache=cache)
    assert torch.isfinite(out.hidden).all() and cache.length == T


@torch.no_grad()
def test_rope_positions_matter_only_relatively(model):
    B, T = 2, 6
    ids, _, pos, gen = _left_padded(B, T, [0, 0], seed=9)
    x = model.embed(ids)
    base = model(x, gen, pos).hidden
    assert _max_diff(model(x, gen, pos + 11).hidden, base) < 1e-4  # a constant shift changes nothing
    gapped = pos.clone()
    gapped[:, 3:] += 5
    assert _max_diff(model(x, gen, gapped).hidden[:, 3:], base[:, 3:]) > 1e-3


def test_two_axis_rope_with_equal_axes_is_the_1d_rope(model):
    B, T = 2, 6
    ids, _, pos, gen = _left_padded(B, T, [0, 0], seed=4)
    x = model.embed(ids)
    one = model(x, gen, pos).hidden
    two = model(x, gen, torch.stack([pos, pos], dim=-1)).hidden
    assert _max_diff(one, two) < 1e-6
    moved = torch.stack([pos, pos], dim=-1)
    moved[:, 2:4, 1] += 3  # only the column axis of two tokens moves: the output must change
    assert _max_diff(model(x, gen, moved).hidden[:, 2:], one[:, 2:]) > 1e-3


def test_two_axis_rope_depends_only_on_the_2d_offset():
    """The score between two tokens depends on (d_row, d_col) only: a neighbour below is the same query
    offset wherever the pair sits, i.e. on every map size (BackboneConfig.image_rope = "2d")."""
    from latentum.model.backbone import RotaryEmbedding, apply_rope

    rope = RotaryEmbedding(BackboneConfig(dim=64, heads=4, kv_heads=4))  # head_dim 16
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # each (B=1, h=1, T=1, d=16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    below = [score((10 + r, 10 + c), (11 + r, 10 + c)) for r, c in [(0, 0), (2, 5), (6, 1)]]
    assert max(below) - min(below) < 1e-4
    assert abs(score((10, 10), (11, 10)) - score((10, 10), (10, 11))) > 1e-4  # below differs from right


def _decode(model, ids, valid, pos, gen, prefill: int, truncate_to: int | None = None):
    """Prefill, optionally roll back (stale keys stay in the slots), then one token per step on one branch."""
    cache = model.new_cache(ids.size(0), max_len=24)
    x = model.embed(ids)
    model(x[:, :prefill], gen[:, :prefill], pos[:, :prefill], cache=cache, key_valid=valid[:, :prefill])
    if truncate_to is not None:
        cache.truncate(truncate_to)
    start = cache.length
    steps = []
    for t in range(start, ids.size(1)):
        s = slice(t, t + 1)
        branch = torch.full_like(gen[:, s], t % 3 == 0)  # every row on one branch, switching between steps
        steps.append(model(x[:, s], branch, pos[:, s], cache=cache).hidden)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("truncate_to", [None, 3])
@torch.no_grad()
def test_the_static_decode_step_equals_the_general_path(model, truncate_to):
    """The fixed-shape step (attention over the whole preallocated cache, slots past the length masked) gives
    the general path's hidden states, with left padding, both branches and stale slots after a rollback."""
    ids, valid, pos, gen = _left_padded(2, 11, [0, 2])
    want = _decode(model, ids, valid, pos, gen, prefill=6, truncate_to=truncate_to)
    model.compile_decode(True, compile=False)
    got = _decode(model, ids, valid, pos, gen, prefill=6, truncate_to=truncate_to)
    model.compile_decode(False)
    assert _max_diff(got, want) < 1e-5


@pytest.mark.slow
@torch.no_grad()
def test_the_compiled_decode_step_equals_the_general_path(model):
    """Also for a second backbone of the same shapes but other modules (no q/k norms), compiled after the first:
    the step's guards skip torch.nn's own modules, never the structure that decides the graph."""
    ids, valid, pos, gen = _left_padded(2, 11, [0, 2])
    torch.manual_seed(1)
    other = MoMEBackbone(dataclasses.replace(CFG, qk_norm=not CFG.qk_norm))
    for m in (model, other):
        want = _decode(m, ids, valid, pos, gen, prefill=6)
        m.compile_decode(True)
        got = _decode(m, ids, valid, pos, gen, prefill=6)
        assert _max_diff(got, want) < 1e-4


@torch.no_grad()
def test_the_static_decode_step_takes_two_axis_positions_and_a_reordered_cache():
    """2-D RoPE positions (B, 1, 2) and a cache whose rows were reordered (CFG doubling) decode alike."""
    torch.manual_seed(0)
    model = MoMEBackbone(BackboneConfig(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2, ffn_hidden=64,
                                        max_seq_len=64, image_rope="2d"))
    ids, valid, pos, gen = _left_padded(2, 9, [0, 1])
    pos2 = torch.stack([pos, pos * 2 % 5], -1)  # (B, T, 2)
    x = model.embed(ids)
    outs = []
    for static in (False, True):
        model.compile_decode(static, compile=False)
        cache = model.new_cache(2, max_len=24)
        model(x[:, :4], gen[:, :4], pos2[:, :4], cache=cache, key_valid=valid[:, :4])
        cache.reorder(torch.tensor([1, 0, 1]))
        rows = torch.tensor([1, 0, 1])
        steps = [model(x[rows, t:t + 1], torch.ones(3, 1, dtype=torch.bool), pos2[rows, t:t + 1], cache=cache).hidden
                 for t in range(4, 9)]
        outs.append(torch.cat(steps, 1))
    assert _max_diff(outs[0], outs[1]) < 1e-5


@torch.no_grad()
def test_the_static_step_sees_weights_changed_after_it_was_switched_on(model):
    """The fused projections are rebuilt when a weight changes in place (a training step, a loaded state)."""
    ids, valid, pos, gen = _left_padded(2, 9, [0, 1])
    model.compile_decode(True, compile=False)
    _decode(model, ids, valid, pos, gen, prefill=5)  # builds the fused weights
    for p in model.branch_parameters("und"):
        p.mul_(1.1)
    got = _decode(model, ids, valid, pos, gen, prefill=5)
    model.compile_decode(False)
    assert _max_diff(got, _decode(model, ids, valid, pos, gen, prefill=5)) < 1e-5


def test_the_static_step_runs_on_a_model_built_in_inference_mode():
    """Inference tensors keep no version counter: their fused projections are built once."""
    with torch.inference_mode():
        torch.manual_seed(0)
        m = MoMEBackbone(CFG)
        ids, valid, pos, gen = _left_padded(2, 8, [0, 1])
        want = _decode(m, ids, valid, pos, gen, prefill=4)
        m.compile_decode(True, compile=False)
        assert _max_diff(_decode(m, ids, valid, pos, gen, prefill=4), want) < 1e-5


@torch.no_grad()
def test_rows_of_one_cache_forget_their_own_slots_take_new_rows_and_compact(model):
    """``truncate_rows`` forgets per row, ``put_rows`` right-aligns another cache's rows in place of some (shifting
    every row when they are longer), ``compact`` drops the holes: through all of it each row attends exactly
    the keys it would alone."""
    ids, _, pos, gen = _left_padded(2, 9, [0, 0], seed=2)
    x = model.embed(ids)
    cache = model.new_cache(2, max_len=32)
    model(x[:, :5], gen[:, :5], pos[:, :5], cache=cache)
    model(x[:, 5:], gen[:, 5:], pos[:, 5:], cache=cache)  # row 0 keeps all 4 new keys, row 1 only 2
    cache.truncate_rows(5, torch.tensor([4, 2]))
    assert cache.length == 9 and cache.valid()[1].tolist() == [True] * 7 + [False] * 2
    step = torch.full((2, 1), 3)
    p1 = torch.tensor([[9], [7]])  # row 1 goes on from position 7
    out = model(model.embed(step), gen[:, :1], p1, cache=cache).hidden
    want1 = model(torch.cat([x[1:, :7], model.embed(step[1:])], 1), torch.cat([gen[1:, :7], gen[1:, :1]], 1),
                  torch.arange(8)[None]).hidden[:, -1]
    assert _max_diff(out[1], want1) < TOL
    # a longer stream takes row 1's place: every row shifts right, row 0 goes on as before
    other = model.new_cache(1, max_len=16)
    long_ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    model(model.embed(long_ids), torch.zeros(1, 12, dtype=torch.bool), torch.arange(12)[None], cache=other)
    cache.put_rows(torch.tensor([1]), other)
    assert cache.length == 12 and cache.valid()[1].all() and cache.slack() == 0.0
    nxt = model(model.embed(step), gen[:, :1], torch.tensor([[10], [12]]), cache=cache).hidden
    ref0 = model(torch.cat([x[:1], model.embed(step[:1]), model.embed(step[:1])], 1),
                 torch.cat([gen[:1], gen[:1, :1], gen[:1, :1]], 1), torch.arange(11)[None]).hidden[:, -1]
    ref1 = model(torch.cat([model.embed(long_ids), model.embed(step[1:])], 1),
                 torch.cat([torch.zeros(1, 12, dtype=torch.bool), gen[1:, :1]], 1), torch.arange(13)[None]).hidden
    assert _max_diff(nxt[0], ref0) < TOL and _max_diff(nxt[1], ref1[:, -1]) < TOL
    cache.truncate_rows(0, torch.tensor([cache.length, cache.length]))  # keeps everything
    cache.key_valid[1, :6] = False  # holes: row 1 forgot its first six keys
    before = model(model.embed(step), gen[:, :1], torch.tensor([[11], [13]]), cache=cache).hidden
    cache.truncate(cache.length - 1)
    cache.compact()
    assert cache.length == int(cache.valid().sum(1).max())
    after = model(model.embed(step), gen[:, :1], torch.tensor([[11], [13]]), cache=cache).hidden
    assert _max_diff(before, after) < TOL
    with pytest.raises(ValueError, match="keep"):
        cache.truncate_rows(0, torch.tensor([1]))


def test_inference_skips_padding_tokens_and_changes_no_valid_state(model):
    """Without gradients, padded tokens go through no branch (their states are 0) and the mask is additive
    (``AttendMask.from_allowed``): the valid tokens' states, the cache and a later forward equal those of the
    gradient path, which computes every token under a boolean mask."""
    prompt = _left_padded(4, 6, [0, 2, 5, 1])
    valid = prompt[1]
    new = torch.randint(0, CFG.vocab_size, (4, 5), generator=torch.Generator().manual_seed(1))
    fed = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 5, [False] * 5])  # ragged drafts
    runs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            first, mid, end, cache = _prompt_draft_follow(model, prompt, new, fed, new[:, :2])
            kv = torch.stack([cache.k, cache.v])[:, :, :, :, :cache.length]  # (2, L, B, K, S, d)
            runs.append((first.detach(), mid.detach(), end.detach(), kv.clone(), cache.valid().clone()))
    (first0, mid0, end0, kv0, valid0), (first1, mid1, end1, kv1, valid1) = runs
    assert _max_diff(first0[valid], first1[valid]) < TOL and _max_diff(mid0[fed], mid1[fed]) < TOL
    assert torch.equal(mid1[~fed], torch.zeros_like(mid1[~fed]))  # nothing computed for them
    assert _max_diff(end0, end1) < TOL
    assert torch.equal(valid0, valid1)  # the keys and values any query may see are the same
    assert _max_diff(kv0.permute(2, 4, 0, 1, 3, 5)[valid0], kv1.permute(2, 4, 0, 1, 3, 5)[valid0]) < TOL


@torch.no_grad()
def test_rows_that_feed_nothing_sit_a_forward_out_and_change_nothing(model, monkeypatch):
    """A cached forward in which some rows feed no token runs on the other rows only (``KVCache.rows``): their
    hidden states and every later forward equal those of the forward that computes every row."""
    assert MoMEBackbone.sit_out(16, 4, 64) and not MoMEBackbone.sit_out(16, 12, 16)  # many rows out, long enough
    assert not MoMEBackbone.sit_out(4, 4, 64) and not MoMEBackbone.sit_out(4, 0, 64)  # all in; none in
    prompt = _left_padded(4, 6, [0, 2, 0, 1])
    new = torch.randint(0, CFG.vocab_size, (4, 5), generator=torch.Generator().manual_seed(1))
    live = torch.tensor([False, True, False, True])
    fed = live[:, None] & torch.tensor([True, True, True, False, True])  # row 3 leaves one slot out
    after = torch.randint(0, CFG.vocab_size, (4, 2), generator=torch.Generator().manual_seed(2))
    runs = []
    for sit_out in (10**9, 0):  # never, then whenever rows feed nothing
        monkeypatch.setattr(MoMEBackbone, "SIT_OUT", sit_out)
        _, mid, end, cache = _prompt_draft_follow(model, prompt, new, fed, after)
        runs.append((mid, end, cache.valid().clone()))
    (mid0, end0, valid0), (mid1, end1, valid1) = runs
    assert _max_diff(mid0[live][fed[live]], mid1[live][fed[live]]) < TOL
    assert torch.equal(mid1[~live], torch.zeros_like(mid1[~live]))  # no query of theirs: nothing computed
    assert torch.equal(valid0, valid1) and _max_diff(end0, end1) < TOL


def test_ragged_boxes_bound_each_rows_queries_and_keys():
    """A row's box is its queries that have keys by the keys any of them attends; small or dense masks get none."""
    allowed = torch.zeros(3, 4, 10, dtype=torch.bool)
    allowed[0, 1:3, 2:6] = True  # queries 1-2 on keys 2-5
    allowed[1, 0, 9] = True  # one query, one key
    # row 2 attends nothing (a row that sits the forward out)
    assert bkb.ragged_boxes(allowed) is None  # 120 entries: one call costs less
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bkb, "RAGGED_MIN", 0)
        assert bkb.ragged_boxes(allowed) == [(1, 3, 2, 6), (0, 1, 9, 10), (0, 0, 0, 0)]
        assert bkb.ragged_boxes(torch.ones(3, 4, 10, dtype=torch.bool)) is None  # the boxes cover everything


@torch.no_grad()
def test_ragged_rows_attended_box_by_box_equal_one_batched_call(model, monkeypatch):
    """Rows of ragged drafts on keys of ragged lengths: attention run row by row on each row's box gives the states,
    cache and later forward of one call over the whole mask."""
    prompt = _left_padded(4, 8, [0, 5, 2, 7])
    valid = prompt[1]
    new = torch.randint(0, CFG.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
    fed = torch.arange(6)[None] < torch.tensor([6, 1, 3, 0])[:, None]  # drafts padded to the longest
    monkeypatch.setattr(bkb, "RAGGED_MIN", 0)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(bkb.F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape) or
                        sdpa(q, *a, **k))
    runs = []
    for share in (0.0, 1.01):  # never by boxes, then always
        monkeypatch.setattr(bkb, "RAGGED_SHARE", share)
        calls.clear()
        first, mid, end, cache = _prompt_draft_follow(model, prompt, new, fed, new[:, :2])
        runs.append((first, mid, end, cache.k[:, :, :, :cache.length].clone(), list(calls)))
    (first0, mid0, end0, k0, calls0), (first1, mid1, end1, k1, calls1) = runs
    assert all(q[0] == 4 for q in calls0) and any(q[0] == 1 and q[2] < 6 for q in calls1)  # boxes were used
    assert _max_diff(first0[valid], first1[valid]) < TOL and _max_diff(mid0, mid1) < TOL
    assert _max_diff(end0, end1) < TOL and _max_diff(k0, k1) < TOL
