"""MoME backbone: a decoder-only transformer whose layers have an understanding and a generation branch.

Per layer (LatentUM §3, the "mot" variant): shared input and post-attention RMSNorms; per branch q/k/v/o
projections (GQA), per-head q/k RMSNorm and a SwiGLU FFN; ONE softmax attention over the whole sequence
with one KV cache. Shared too: token embedding, RoPE, final norm, lm_head. Each token is routed to one
branch by ``gen_mask`` with index_select / index_copy on the flattened rows, so no token pays for both
branches (the reference computes both and blends, doubling compute).

Shape letters:
    B  batch           T  new tokens of this forward      S  keys (cached + new)
    D  model dim       H  query heads     K  kv heads     r  query heads per kv head (H = K * r)
    d  head dim        F  FFN hidden      N  flattened token rows (B * T)     n  rows routed to one branch
    M  rows computed (N, or fewer when inference leaves padding out: ``Route``)
    L  layers          V  vocabulary
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from latentum.config import BackboneConfig
from latentum.model.attention import span_attention_mass
from latentum.model.cache import KVCache

BRANCHES = ("und", "gen")  # index 0 = understanding, 1 = generation


class AttentionSpans(NamedTuple):
    """AIA spans: each sample's query span ``query (B, T)`` and key span ``key (B, S)`` (bool)."""

    query: Tensor
    key: Tensor


class BackboneOutput(NamedTuple):
    hidden: Tensor
    """(B, T, D) after the final norm; 0 at the tokens ``key_valid`` marks invalid when gradients are off (no branch
    computes them)."""
    attn_mass: Tensor | None
    """(L, B) attention mass of the query span on the key span per layer (AIA), or None without spans."""


class Route(NamedTuple):
    """Which branch takes each of the N = B * T token rows. The layers keep the residual stream sorted by branch
    (the understanding rows first, then the generation rows, each in their order), so each branch runs on one
    slice; attention, which mixes tokens in sequence order, unsorts its input and sorts its output: two
    gathers per layer, however the tokens interleave. A route may also leave rows out (padding in inference:
    ``from_mask(keep=...)``): no branch computes them, and they unsort as zeros."""

    order: Tensor | None
    """(M,) the sequence row at each sorted place (M <= N kept rows), or None when one branch takes every row (no
    sorting)."""
    inverse: Tensor | None
    """(N,) the sorted place of each sequence row (None when rows are left out: ``unsort`` scatters)."""
    und_rows: int
    """Rows on the understanding branch (the first ``und_rows`` sorted rows)."""
    shape: tuple[int, int]
    """(B, T)."""

    @classmethod
    def from_mask(cls, gen_mask: Tensor, keep: Tensor | None = None) -> Route:
        """``gen_mask`` (B, T) True for the gen branch; ``keep`` (B, T) bool: the rows computed (default all)."""
        flat = gen_mask.reshape(-1)  # (N,)
        if keep is not None and not bool(keep.all()):
            kept = keep.reshape(-1)
            und, gen = (~flat & kept).nonzero().squeeze(1), (flat & kept).nonzero().squeeze(1)
            return cls(torch.cat([und, gen]), None, und.numel(), tuple(gen_mask.shape))
        gen = int(flat.sum())
        if gen in (0, flat.numel()):
            return cls(None, None, flat.numel() - gen, tuple(gen_mask.shape))
        order = torch.cat([(~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)])
        return cls(order, torch.argsort(order), flat.numel() - gen, tuple(gen_mask.shape))

    def sort(self, x_ND: Tensor) -> Tensor:
        """Sequence-order rows (N, ...) -> branch-sorted rows (M, ...)."""
        return x_ND if self.order is None else x_ND.index_select(0, self.order)

    def unsort(self, x_ND: Tensor) -> Tensor:
        """Branch-sorted rows (M, ...) -> sequence order (N, ...), rows left out as zeros."""
        if self.order is None:
            return x_ND
        if self.inverse is None:
            return x_ND.new_zeros(self.shape[0] * self.shape[1], *x_ND.shape[1:]).index_copy(0, self.order, x_ND)
        return x_ND.index_select(0, self.inverse)

    def apply(self, x_ND: Tensor, fns: tuple[RowFn, RowFn]) -> Tensor:
        """``fns[i]`` on branch i's rows of the sorted ``x_ND`` (M, D) -> (M, out), still sorted."""
        n = self.und_rows
        if self.order is None or n in (0, x_ND.shape[0]):
            return fns[0 if n else 1](x_ND)
        return torch.cat([fns[0](x_ND[:n]), fns[1](x_ND[n:])])


RowFn = Callable[[Tensor], Tensor]


class RMSNorm(nn.Module):
    """RMSNorm as Llama/Qwen in ``transformers``: normalise in fp32, cast back, then scale.

    Hand-written rather than ``nn.RMSNorm`` so pretrained HF weights reproduce their reference numerics, and
    so bf16 autocast inputs with fp32 weights do not fall off the fused kernel (a mixed-dtype warning).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused op, same numbers as by hand
        return self.weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_frequencies(cfg: BackboneConfig) -> tuple[Tensor, float]:
    """(inv_freq (d/2,), attention scaling): plain RoPE, or a scaled one computed by ``transformers`` exactly
    as its own models do (``BackboneConfig.rope_scaling``)."""
    d = cfg.head_dim
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind == "default":
        return 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d), 1.0
    if kind not in STATIC_ROPE_TYPES:
        raise ValueError(f"backbone.rope_scaling: rope_type {kind!r} is not supported; expected one of "
                         f"{STATIC_ROPE_TYPES} (frequencies that do not change with the sequence length)")
    hf = PretrainedConfig(rope_parameters={"rope_theta": cfg.rope_theta, **cfg.rope_scaling}, head_dim=d,
                          hidden_size=cfg.dim, num_attention_heads=cfg.heads,
                          max_position_embeddings=cfg.max_seq_len)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


STATIC_ROPE_TYPES = ("linear", "yarn", "llama3")


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama/Qwen layout (rotate-half over [freqs, freqs]) so HF weights load unchanged."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        inv_freq, self.scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T), or (B, T, 2) per (row, col) axis -> cos, sin (B, 1, T, d) in fp32, broadcast over
        heads. With two axes, frequency j turns with axis j % 2 (interleaved, so each axis gets fast and slow
        frequencies); equal axes give exactly the 1-D rotation."""
        if positions.dim() == 3:
            axis = torch.arange(self.inv_freq.numel(), device=positions.device) % 2  # (d/2,)
            pos = positions.float().gather(-1, axis.expand(*positions.shape[:2], -1))  # (B, T, d/2)
        else:
            pos = positions.float()[..., None]  # (B, T, 1)
        freqs = pos * self.inv_freq  # (B, T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, d)
        if self.scaling == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, h, T, d) rotated by position; computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, gate_up: Tensor | None = None) -> Tensor:
        """(n, D) -> (n, D); ``gate_up`` (2 * F, D): the gate and up weights in one matmul (``fuse``)."""
        if gate_up is None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # each (n, F)
        return self.down(F.silu(gate) * up)


class Branch(nn.Module):
    """Everything one branch owns in a layer: q/k/v/o projections, per-head q/k norms, the FFN."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        d = cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.dim, bias=False)
        self.q_norm = RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def qkv_weights(self) -> tuple[Tensor, Tensor | None] | None:
        """The q/k/v weights ((H + 2K) * d, D) and biases concatenated, or None when a projection is not a plain
        Linear (e.g. wrapped by LoRA adapters, whose own forward must run)."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(m) is not nn.Linear for m in linears):
            return None
        bias = None if self.q_proj.bias is None else torch.cat([m.bias for m in linears])
        return torch.cat([m.weight for m in linears]), bias

    def qkv(self, x_nD: Tensor, fused: Fused | None = None) -> Tensor:
        """(n, D) -> (n, (H + 2K) * d): normed q, normed k and v, concatenated so one gather routes all. The three
        projections run as one matmul (``fused``, or the weights concatenated here: one output and one backward
        matmul instead of three plus a concatenation). Plain views rather than einops here and in ``MoMELayer``:
        they run once per layer per decoded token, where each einops call costs about as much as a small
        matmul."""
        n, d = x_nD.shape[0], self.head_dim
        weights = (fused.qkv_weight, fused.qkv_bias) if fused is not None else self.qkv_weights()
        if weights is None:
            qkv = torch.cat([proj(x_nD) for proj in (self.q_proj, self.k_proj, self.v_proj)], dim=1)
        else:
            qkv = F.linear(x_nD, *weights)
        if isinstance(self.q_norm, nn.Identity):
            return qkv
        q, k, v = qkv.view(n, -1, d).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], dim=1).view(n, -1)


class AttendMask(NamedTuple):
    """Who may attend whom, as SDPA takes it; built once per forward, shared by every layer."""

    allowed: Tensor | None
    """(B, T, S) True where a query may attend a key; None: plain causal over T == S keys, all valid."""
    sdpa: Tensor | None
    """(B, 1, T, S) ``allowed`` (bool, or additive 0 / -inf floats), except that a query with no key (a padding
    query) sees every key: a softmax over nothing would be NaN. None with ``allowed`` None: SDPA's own causal
    kernel (``is_causal``)."""
    has_key: Tensor | None
    """(B, 1, T, 1) 1 where the query has a key, 0 where not (its output is zeroed); None if all have one."""
    boxes: list[tuple[int, int, int, int]] | None = None
    """Per row (q0, q1, k0, k1): the queries [q0, q1) that have keys and the keys [k0, k1) any of them may attend
    (inference of ragged rows, ``ragged_boxes``): ``attend`` runs each row on its box alone. None: one call."""

    @classmethod
    def from_allowed(cls, allowed: Tensor, additive: torch.dtype | None = None) -> AttendMask:
        """From ``allowed`` (B, T, S). ``additive`` (the attention's dtype, for inference): ``sdpa`` as 0 / -inf
        of that dtype, converted once here rather than from bool by SDPA in every layer (its time at 16 rows of 66
        tokens on 1000 keys: 15% less, 2-core CPU); kept bool past ``ADDITIVE_MAX`` entries (4x the memory). In
        inference, rows of ragged lengths also get their ``boxes``."""
        any_key = allowed.any(-1, keepdim=True)  # (B, T, 1)
        mask = cls(allowed, allowed[:, None], None) if bool(any_key.all()) else \
            cls(allowed, (allowed | ~any_key)[:, None], any_key[:, None])
        if additive is None:
            return mask
        if allowed.numel() <= ADDITIVE_MAX:
            zeros = torch.zeros(mask.sdpa.shape, dtype=additive, device=allowed.device)
            mask = mask._replace(sdpa=zeros.masked_fill(~mask.sdpa, -math.inf))
        return mask._replace(boxes=ragged_boxes(allowed))


RAGGED_MIN = 2**17
"""The smallest attention (B * T * S mask entries) worth running row by row: below it one call costs less."""
RAGGED_SHARE = 0.6
"""Rows run on their boxes alone when the boxes cover less than this share of the mask. A batched call computes
every (query, key) pair of every row, however ragged the rows: 16 rows of drafts padded to the longest, on keys
padded to the longest row (a 2-core CPU, 16 rows x 66 queries x 1000 keys, boxes covering 38%: 13.8 -> 7.8 ms;
covering 92%: 9.4 -> 10.6 ms, the calls' overhead)."""


def ragged_boxes(allowed: Tensor) -> list[tuple[int, int, int, int]] | None:
    """Each row's box (q0, q1, k0, k1) in ``allowed`` (B, T, S): its first and past-last query that has a key, and
    the first and past-last key any query attends; or None where one call over the whole mask costs less
    (``RAGGED_MIN``, ``RAGGED_SHARE``)."""
    B, T, S = allowed.shape
    if B < 2 or allowed.numel() < RAGGED_MIN:
        return None
    q_any, k_any = allowed.any(2), allowed.any(1)  # (B, T), (B, S)

    def span(hit: Tensor) -> Tensor:  # (B, n) bool -> (B, 2): first and past-last True, (0, 0) if none
        idx = torch.arange(hit.shape[1], device=hit.device)
        first = torch.where(hit, idx, hit.shape[1]).amin(1)
        last = torch.where(hit, idx + 1, 0).amax(1)
        return torch.stack([first.clamp(max=last), last], 1)

    boxes = torch.cat([span(q_any), span(k_any)], 1)  # (B, 4)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    if int(area.sum()) >= RAGGED_SHARE * B * T * S:
        return None
    return [tuple(b) for b in boxes.tolist()]


ADDITIVE_MAX = 2**24
"""The largest inference mask (B * T * S entries) built additive: 64 MB in fp32."""


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on, else ``x``'s."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttendMask) -> Tensor:
    """SDPA of q (B, H, T, d) over k, v (B, K, S, d) under ``mask``; rows with no key give 0 (and no
    gradient)."""
    r = q.shape[1] // k.shape[1]
    if r > 1:  # GQA: each kv head serves r query heads
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # (B, H, S, d)
    sdpa = mask.sdpa if mask.sdpa is None or mask.sdpa.dtype in (torch.bool, q.dtype) else mask.sdpa.to(q.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if mask.boxes is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa, is_causal=sdpa is None)  # (B, H, T, d)
    else:  # each row on its own box: no pair outside it is computed (views, no gathers)
        out = q.new_zeros(q.shape)
        for b, (q0, q1, k0, k1) in enumerate(mask.boxes):
            if q1 > q0:
                out[b, :, q0:q1] = F.scaled_dot_product_attention(
                    q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1],
                    attn_mask=sdpa[b:b + 1, :, q0:q1, k0:k1])[0]
    return out if mask.has_key is None else out * mask.has_key.to(out.dtype)


class MoMELayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.input_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.post_attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.branches = nn.ModuleList([Branch(cfg), Branch(cfg)])  # [und, gen]

    def forward(self, x: Tensor, route: Route, rope: tuple[Tensor, Tensor], mask: AttendMask,
                kv: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                spans: AttentionSpans | None) -> tuple[Tensor, Tensor | None]:
        """x (M, D), the residual rows sorted by branch (``Route``) -> (M, D) sorted alike, and the AIA span mass
        (B,) when ``spans`` is given."""
        B, T = route.shape
        und, gen = self.branches
        H, K, d = self.heads, self.kv_heads, self.head_dim
        qkv = route.unsort(route.apply(self.input_norm(x), (und.qkv, gen.qkv)))  # (N, (H + 2K) * d)
        qkv = qkv.view(B, T, H + 2 * K, d).transpose(1, 2)  # (B, H + 2K, T, d)
        qk, v = qkv.split([H + K, K], dim=1)  # (B, H + K, T, d), (B, K, T, d)
        q, k = apply_rope(qk, *rope).split([H, K], dim=1)  # (B, H, T, d), (B, K, T, d)
        # Slices of one projection: SDPA's CPU kernels run their backward about 3% faster on packed copies.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        k_all, v_all = kv(k, v)  # (B, K, S, d)
        y = attend(q, k_all, v_all, mask)  # (B, H, T, d)
        mass = None
        if spans is not None:
            mass = span_attention_mass(q, k_all, mask.allowed, spans.query, spans.key)  # (B,)
        y = route.sort(y.transpose(1, 2).reshape(B * T, H * d))  # (N, H * d)
        x = x + route.apply(y, (und.o_proj, gen.o_proj))
        return x + route.apply(self.post_attn_norm(x), (und.ffn, gen.ffn)), mass


class Fused(NamedTuple):
    """One branch's projections of a layer concatenated for decoding: fewer, larger matmuls per step."""

    qkv_weight: Tensor  # ((H + 2K) * d, D)
    qkv_bias: Tensor | None  # ((H + 2K) * d,)
    gate_up_weight: Tensor  # (2 * F, D)


def fuse(branch: Branch) -> Fused | None:
    """The branch's q/k/v and gate/up weights concatenated, or None when a projection is not a plain Linear."""
    qkv = branch.qkv_weights()
    if qkv is None or any(type(m) is not nn.Linear for m in (branch.ffn.gate, branch.ffn.up)):
        return None
    return Fused(*qkv, torch.cat([branch.ffn.gate.weight, branch.ffn.up.weight]))


def static_step(layers: nn.ModuleList, norm: nn.Module, rope: tuple[Tensor, Tensor], x: Tensor,
                k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, written: Tensor, branch: int,
                fused: list[Fused | None]) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding step of fixed shapes: x (B, 1, D) through ``branch`` of every layer, attending over the whole
    preallocated cache k/v (L, B, K, S_max, d) (its valid keys: ``key_valid`` (B, S_max) among the first ``written``
    slots, a 0-d tensor; the key mask is computed inside) and over its own new key, rotated by ``rope`` (cos, sin)
    (B, 1, 1, d) of the step's positions. RoPE comes in computed: inside the graph, inductor inlined cos and sin
    into the attention's reduction over the cache and evaluated them once per cached key (at batch 16 that kernel
    took twice as long). The cache is only read: the new keys and values come back, (L, B, K, 1, d) each, for the
    caller to write (an in-place write inside a compiled graph copies the whole cache). Returns (final-normed hidden
    (B, 1, D), k, v). Plain tensor code without data-dependent control flow, so ``torch.compile`` traces it as one
    graph. ``fused[i]``: layer i's projections of ``branch`` concatenated (``fuse``), or None for its modules."""
    B = x.shape[0]
    cos, sin = rope
    keys = key_valid & (torch.arange(key_valid.shape[1], device=x.device) < written)[None]  # (B, S_max)
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        b = layer.branches[branch]
        H, K, d = layer.heads, layer.kv_heads, layer.head_dim
        f = fused[i]
        qkv = b.qkv(layer.input_norm(x).view(B, -1), f).view(B, 1, H + 2 * K, d).transpose(1, 2)
        qk, v = qkv.split([H + K, K], dim=1)
        q, k = apply_rope(qk, cos, sin).split([H, K], dim=1)  # (B, H, 1, d), (B, K, 1, d)
        k, v = k.to(k_cache.dtype).to(q.dtype), v.to(v_cache.dtype).to(q.dtype)  # as the cache stores them
        new_k.append(k)
        new_v.append(v)
        y = _attend_cache_and_self(q, k_cache[i].to(q.dtype), v_cache[i].to(q.dtype), k, v, keys)  # (B, H, 1, d)
        x = x + b.o_proj(y.transpose(1, 2).reshape(B, H * d)).view(B, 1, -1)
        x = x + b.ffn(layer.post_attn_norm(x).view(B, -1), None if f is None else f.gate_up_weight).view(B, 1, -1)
    return norm(x), torch.stack(new_k), torch.stack(new_v)


def _attend_cache_and_self(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, keys: Tensor):
    """Softmax attention of q (B, H, 1, d) over the cached keys (B, K, S, d) allowed by ``keys`` (B, S) plus its
    own key k (B, K, 1, d), without writing it into the cache; grouped queries share their kv head. Products and
    sums rather than matmuls: with one query per row these are reductions that inductor fuses and vectorises
    (its lowering of the two batched matmuls ran 1.4x slower at batch 16, and SDPA over the cache concatenated
    with the new key slower still)."""
    B, H, _, d = q.shape
    K = k.shape[1]
    qg = q.view(B, K, H // K, d) * d**-0.5  # (B, K, r, d)
    past = (qg[:, :, :, None] * k_cache[:, :, None]).sum(-1)  # (B, K, r, S)
    past = past.masked_fill(~keys[:, None, None, :], float("-inf"))
    own = (qg * k).sum(-1, keepdim=True)  # (B, K, r, 1)
    p = torch.cat([past, own], dim=-1).softmax(-1)  # (B, K, r, S + 1)
    y = (p[..., :-1, None] * v_cache[:, :, None]).sum(-2) + p[..., -1:] * v  # (B, K, r, d)
    return y.reshape(B, H, 1, d)


class MoMEBackbone(nn.Module):
    """The shared-attention two-branch transformer. ``forward`` takes embeddings so callers can mix
    token embeddings with projected image codes; ``embed`` and ``logits`` are the shared text ends."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList([MoMELayer(cfg) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._step: Callable | None = None  # the static decode step, when switched on (compile_decode)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanoGPT-style init, both branches drawn independently (see ``init_generation_branch``):

        - embedding: N(0, 0.02)
        - q/k/v projections, FFN gate/up, lm_head: N(0, 0.02)
        - o_proj and FFN down (the residual writers): N(0, 0.02 / sqrt(2 * depth)) (GPT-2 scaling)
        - q/k RMSNorm: weight sqrt(attn_logit_scale / sqrt(head_dim)) (see BackboneConfig.attn_logit_scale)
        - every other RMSNorm (input, post-attention, final): weight 1
        """
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.depth)
        nn.init.normal_(self.embedding.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        qk = math.sqrt(self.cfg.attn_logit_scale / math.sqrt(self.cfg.head_dim))
        for name, p in self.layers.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                nn.init.constant_(p, qk)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=resid_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        nn.init.ones_(self.norm.weight)

    @torch.no_grad()
    def grow_vocabulary(self, vocab_size: int) -> None:
        """Grow the embedding and lm_head to ``vocab_size`` rows; the old rows stay, each new one starts at the
        mean of the old (embedding and head alike), so a new word begins as an average word."""
        old = self.embedding.num_embeddings
        if vocab_size < old:
            raise ValueError(f"vocab_size must be >= the current {old}, got {vocab_size}")
        if vocab_size == old:
            return

        def grown(w: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)]))

        self.embedding.weight = grown(self.embedding.weight)
        self.embedding.num_embeddings = vocab_size
        self.lm_head.weight = self.embedding.weight if self.cfg.tie_embeddings else grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.cfg.vocab_size = vocab_size

    @torch.no_grad()
    def init_generation_branch(self) -> None:
        """Copy every und-branch parameter into the gen branch (LatentUM §3 initialisation)."""
        for layer in self.layers:
            und, gen = layer.branches
            gen.load_state_dict(und.state_dict())

    def branch_parameters(self, branch: Literal["und", "gen"]) -> Iterator[nn.Parameter]:
        """Parameters owned by one branch (the trainers freeze by these)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        i = BRANCHES.index(branch)
        for layer in self.layers:
            yield from layer.branches[i].parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Embedding, the per-layer shared norms, the final norm and lm_head."""
        branch_ids = {id(p) for b in BRANCHES for p in self.branch_parameters(b)}
        yield from (p for p in self.parameters() if id(p) not in branch_ids)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache sized for this backbone, on its device."""
        p = self.embedding.weight
        return KVCache(self.cfg.depth, batch, self.cfg.kv_heads, self.cfg.head_dim, max_len,
                       device=p.device, dtype=dtype or p.dtype)

    def embed(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> (B, T, D)."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embed: ids must be an integer tensor, got {ids.dtype}")
        return self.embedding(ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> (..., V)."""
        return self.lm_head(hidden)

    def forward(self, x: Tensor, gen_mask: Tensor, positions: Tensor, attn_mask: Tensor | None = None,
                cache: KVCache | None = None, key_valid: Tensor | None = None,
                spans: AttentionSpans | None = None) -> BackboneOutput:
        """Run T new tokens (embeddings ``x`` (B, T, D)) through every layer.

        ``gen_mask`` (B, T) routes True tokens to the gen branch; ``positions`` (B, T) are RoPE positions, or
        (B, T, 2) (row, col) positions with ``image_rope="2d"`` (see ``LatentUMModel.rope_positions``).
        ``attn_mask`` (B, T, S) is True where a query may attend a key, S = cached length + T; when None it
        is causal over [cached keys ; new keys]. Either way keys marked invalid (the cache's stored
        ``key_valid`` and this call's ``key_valid`` (B, T), default all True) are never attended: that is
        how left padding is masked during generation. With ``cache`` the new keys are appended to it. Without
        gradients the invalid tokens are not computed at all: their hidden states are 0.
        """
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        self._check_inputs(x, gen_mask, positions, attn_mask, cache, key_valid, spans, past)
        if self._step is not None and cache is not None and T == 1 and attn_mask is None and spans is None \
                and not torch.is_grad_enabled() and (key_valid is None or bool(key_valid.all())) \
                and (B == 1 or bool((gen_mask == gen_mask[0, 0]).all())):
            valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            return self._decode_static(x, int(gen_mask[0, 0]), positions, cache, valid)
        if cache is not None and key_valid is not None and spans is None and not torch.is_grad_enabled():
            live = key_valid.any(1)  # (B,) rows that feed a token here
            if self.sit_out(B, int(live.sum()), T):
                return self._forward_rows(torch.nonzero(live).flatten(), x, gen_mask, positions, attn_mask, cache,
                                          key_valid)
        if key_valid is None:
            key_valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        # Inference computes only the tokens that count (drafted rows are padded to the longest draft).
        route = Route.from_mask(gen_mask, None if torch.is_grad_enabled() else key_valid)
        rope = self.rope(positions)
        if cache is None:
            return self._run(x, route, rope, attn_mask, key_valid, None, spans)
        with cache.extend(key_valid) as valid_all:
            return self._run(x, route, rope, attn_mask, valid_all, cache, spans)

    SIT_OUT = 12
    """Rows that feed nothing sit a cached forward out when their tokens outnumber ``SIT_OUT`` times the rows left
    in: gathering a row's cached keys costs about as much as computing a dozen of its tokens (measured on a
    2-core CPU, shipped dims, 16 rows on 1000 cached keys: 2.2x faster with 1 row of 16 left in at T=1, 2.7x
    with 4 at T=64, 1.1x with 8 at T=16; 0.8x with 12 at T=16, which stays whole)."""

    @classmethod
    def sit_out(cls, B: int, live: int, T: int) -> bool:
        """Should a cached forward of ``T`` tokens run on its ``live`` of ``B`` rows only?"""
        return 0 < live < B and (B - live) * T >= cls.SIT_OUT * live

    def _forward_rows(self, rows: Tensor, x: Tensor, gen_mask: Tensor, positions: Tensor, attn_mask: Tensor | None,
                      cache: KVCache, key_valid: Tensor) -> BackboneOutput:
        """The forward of ``rows`` (R,) only, on those rows of the cache (``KVCache.rows``; the others' new slots
        are written invalid); the other rows' hidden states are 0, as no query of theirs is valid."""
        out = self(x[rows], gen_mask[rows], positions[rows], None if attn_mask is None else attn_mask[rows],
                   cache=cache.rows(rows), key_valid=key_valid[rows])
        hidden = out.hidden.new_zeros(x.shape[0], *out.hidden.shape[1:])
        hidden[rows] = out.hidden
        return BackboneOutput(hidden=hidden, attn_mass=None)

    def compile_decode(self, enabled: bool = True, compile: bool = True) -> None:
        """Switch the static decode step on (or off): a cached forward of one token per row, every row on one
        branch, then runs ``static_step`` over the whole preallocated cache (slots past the written length
        masked) with each branch's projections fused, so its shapes never change while decoding and
        ``torch.compile`` (``compile``) builds it once per (batch, cache size, branch), gpt-fast style. Off by
        default; outputs equal the general path's to float rounding (tests/test_backbone.py), the compile time is
        paid on the first step of each shape. On a CPU the compiled step calls its kernels from C++ (inductor's
        ``cpp_wrapper``), and its guards skip ``torch.nn``'s own modules (their parameters are the step's
        inputs, read afresh on every call): a step is dominated by per-call overhead at these sizes, and each cut
        it by about a tenth / a fiftieth (benchmarks/speed.py)."""
        self._step = None
        if enabled:
            cpu = self.embedding.weight.device.type == "cpu"
            options = {"cpp_wrapper": True,
                       "guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe} if cpu else None
            self._step = torch.compile(static_step, dynamic=False, options=options) if compile else static_step
        self._fused: dict[int, tuple[list, list[Fused | None]]] = {}
        self._branch_params = [[p for layer in self.layers for p in layer.branches[b].parameters()] for b in (0, 1)]

    def _fused_weights(self, branch: int) -> list[Fused | None]:
        """``fuse`` of every layer's ``branch``, rebuilt whenever one of its weights changed in place (version
        counters: optimizer steps, ``load_state_dict``). Parameters replaced by new tensors (``assign=True``) need
        ``compile_decode`` again."""
        key = [0 if p.is_inference() else p._version for p in self._branch_params[branch]]  # inference: constant
        if branch not in self._fused or self._fused[branch][0] != key:
            with torch.no_grad():
                self._fused[branch] = (key, [fuse(layer.branches[branch]) for layer in self.layers])
        return self._fused[branch][1]

    def _decode_static(self, x: Tensor, branch: int, positions: Tensor, cache: KVCache,
                       key_valid: Tensor) -> BackboneOutput:
        """x (B, 1, D), every row on ``branch`` and valid, through ``static_step`` into ``cache``."""
        with cache.extend(key_valid):
            written = torch.tensor(cache.length, device=x.device)  # the slots written before this step
            hidden, k, v = self._step(self.layers, self.norm, self.rope(positions), x, cache.k, cache.v,
                                      cache.key_valid, written, branch, self._fused_weights(branch))
            cache.write(k, v)
        return BackboneOutput(hidden=hidden, attn_mass=None)

    def _run(self, x: Tensor, route: Route, rope: tuple[Tensor, Tensor], attn_mask: Tensor | None,
             valid_all: Tensor, cache: KVCache | None, spans: AttentionSpans | None) -> BackboneOutput:
        """The layer loop; ``valid_all`` (B, S) is the validity of every key this forward sees."""
        B, T, _ = x.shape
        S = valid_all.shape[1]
        if attn_mask is None and S == T and spans is None and bool(valid_all.all()):
            mask = AttendMask(None, None, None)  # plain causal: SDPA's causal kernel, no (B, 1, T, S) mask
        else:
            if attn_mask is None:
                q_pos = torch.arange(S - T, S, device=x.device)  # absolute slot of each new query
                attn_mask = (torch.arange(S, device=x.device)[None, :] <= q_pos[:, None])[None]  # (1, T, S)
            mask = AttendMask.from_allowed(attn_mask & valid_all[:, None, :],  # allowed (B, T, S)
                                           additive=None if torch.is_grad_enabled() else _compute_dtype(x))
        masses = []
        x = route.sort(x.reshape(B * T, -1))  # (M, D), sorted by branch through every layer
        for i, layer in enumerate(self.layers):
            if cache is None:
                kv = lambda k, v: (k, v)
            else:
                kv = lambda k, v, i=i: cache.append(i, k, v)
            x, mass = layer(x, route, rope, mask, kv, spans)
            masses.append(mass)
        attn_mass = torch.stack(masses) if spans is not None else None  # (L, B)
        return BackboneOutput(hidden=self.norm(route.unsort(x).view(B, T, -1)), attn_mass=attn_mass)

    def _check_inputs(self, x: Tensor, gen_mask: Tensor, positions: Tensor, attn_mask: Tensor | None,
                      cache: KVCache | None, key_valid: Tensor | None, spans: AttentionSpans | None,
                      past: int) -> None:
        """Boundary checks: every error names the argument and the expected shape/dtype."""
        if x.ndim != 3 or x.shape[2] != self.cfg.dim or x.shape[1] < 1:
            raise ValueError(f"x must be (B, T>=1, D={self.cfg.dim}) embeddings, got {tuple(x.shape)}")
        B, T, _ = x.shape
        S = past + T
        pos_shape = (B, T, 2) if positions.dim() == 3 else (B, T)
        expect = {"gen_mask": (gen_mask, (B, T), (torch.bool,)),
                  "positions": (positions, pos_shape, (torch.int64, torch.int32)),
                  "attn_mask": (attn_mask, (B, T, S), (torch.bool,)),
                  "key_valid": (key_valid, (B, T), (torch.bool,))}
        if spans is not None:
            expect["spans.query"] = (spans.query, (B, T), (torch.bool,))
            expect["spans.key"] = (spans.key, (B, S), (torch.bool,))
        for name, (t, shape, dtypes) in expect.items():
            if t is not None and (tuple(t.shape) != shape or t.dtype not in dtypes):
                raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} of shape {shape} "
                                 f"(S = cached {past} + T {T}), got {t.dtype} {tuple(t.shape)}")
        if cache is not None and cache.batch != B:
            raise ValueError(f"cache holds batch {cache.batch}, but x has batch {B}")
