"""Heads around the backbone for image tokens: the visual projector (codes in) and the depth-wise AR head
(codes out), LatentUM §4.

Legend: M image-token positions (rows), D backbone width, G codebooks (depth steps), K codebook size,
L depth-sequence length (<= G), nh heads, hs head size, C code vector dim (G * code_dim).

The backbone takes one step per image token; its final hidden state h is the "base token" of a tiny
causal transformer that runs *along depth* over [h, E_0(c_0), ..., E_{G-2}(c_{G-2})] and predicts
c_0 ... c_{G-1} (RQ-Transformer style). Each depth has its own embedding table because id j of codebook 0
and id j of codebook 1 are unrelated codes; the output Linear is shared, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from latentum.config import HeadConfig


class VisualProjector(nn.Module):
    """z_q (..., C) -> backbone input embedding (..., D): how a (generated or read) latent enters the LLM.

    It has the layout of the MBAQ up-projection (C -> hidden -> D) so stage 2 can start it as a copy of that
    projection (:meth:`LatentUMModel.init_visual_projector`): the und branch then reads a latent exactly as it
    reads the quantized features MBAQ aligned with its behaviour, before any stage-2 step.
    """

    def __init__(self, code_dim_total: int, dim: int, hidden: int | None = None):
        super().__init__()
        self.code_dim_total = code_dim_total
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(code_dim_total, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, z_q: Tensor) -> Tensor:
        if z_q.size(-1) != self.code_dim_total:
            raise ValueError(f"z_q must end with dim {self.code_dim_total}, got {tuple(z_q.shape)}")
        return self.net(z_q)


class CellPositions(nn.Module):
    """Learned 2-D position of an image token: a row embedding plus a column embedding of its canvas cell.

    The backbone's RoPE is 1-D, so for an N x N map "row r column c" would be token (r-1)*N + c-1 after
    ``<img>``, a different offset for every N. Adding the cell's own (row, col) to every image token read by
    the understanding branch makes cells addressable by content, whatever the map size. Generation-branch
    tokens carry the cell they *predict* (the next cell in raster order), a position query as in
    position-instructed AR image models, so the gen branch never has to infer where the raster has got to.
    """

    def __init__(self, grid: int, dim: int, std: float = 0.1, enabled: bool = True):
        super().__init__()
        self.grid, self.dim = grid, dim
        # Disabled (pretrained VLMs, LatentUM-Base): no parameters, every position is the zero vector.
        self.row = nn.Parameter(torch.randn(grid, dim) * std) if enabled else None  # (grid, D)
        self.col = nn.Parameter(torch.randn(grid, dim) * std) if enabled else None  # (grid, D)

    def forward(self, cells: Tensor) -> Tensor:
        """cells (...) long canvas indices r * grid + c, or -1 for "no position" -> (..., D), 0 where -1."""
        if cells.dtype != torch.long or (cells.numel() and int(cells.max()) >= self.grid**2):
            raise ValueError(f"cells must be long canvas indices < {self.grid**2} (or -1), got {cells.dtype} "
                             f"max {int(cells.max()) if cells.numel() else None}")
        if self.row is None:
            return torch.zeros(*cells.shape, self.dim, device=cells.device)
        c = cells.clamp(min=0)
        emb = self.row[c // self.grid] + self.col[c % self.grid]  # (..., D)
        return emb * (cells >= 0)[..., None].to(emb.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x (M, nh, L, hs), cos/sin (L, hs)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def depth_rope(length: int, head_size: int, device, theta: float = 1e4) -> tuple[Tensor, Tensor]:
    """cos, sin (L, hs) of 1-D RoPE over depth positions 0..L-1 (LatentUM-Base's head, theta 1e4)."""
    inv = theta ** -(torch.arange(0, head_size, 2, device=device, dtype=torch.float) / head_size)  # (hs/2,)
    angles = torch.arange(length, device=device, dtype=torch.float)[:, None] * inv  # (L, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hs)
    return angles.cos(), angles.sin()


class _Block(nn.Module):
    """Pre-norm block: RMSNorm -> causal SDPA (q/k RMSNorm, optional depth RoPE) -> residual; RMSNorm -> GELU
    MLP -> residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        hs = dim // heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(hs, eps=1e-6)
        self.k_norm = nn.RMSNorm(hs, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "m l (three nh hs) -> three m nh l hs", three=3,
                            nh=self.heads)  # each (M, nh, L, hs)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rotate(q, *rope).to(v.dtype), _rotate(k, *rope).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(rearrange(y, "m nh l hs -> m l (nh hs)"))
        return x + self.mlp(self.norm2(x))


class DepthHead(nn.Module):
    """Depth-wise AR head: backbone state h (M, D) -> the G codebook ids of that image token."""

    def __init__(self, cfg: HeadConfig, dim: int, codebooks: int, codebook_size: int):
        super().__init__()
        if dim % cfg.heads != 0:
            raise ValueError(f"dim={dim} must divide by head.heads={cfg.heads}")
        if codebooks < 1 or codebook_size < 2:
            raise ValueError(f"codebooks must be >= 1 and codebook_size >= 2, "
                             f"got {codebooks}, {codebook_size}")
        self.dim, self.codebooks, self.codebook_size = dim, codebooks, codebook_size
        # E_g for g < G-1: the last id is never fed back (nothing comes after it).
        self.embeds = nn.ModuleList(nn.Embedding(codebook_size, dim) for _ in range(codebooks - 1))
        # Depth positions: a learned embedding (G, D) added to the inputs, or RoPE inside attention.
        self.pos = None if cfg.depth_rope else nn.Parameter(torch.zeros(codebooks, dim))
        self.head_size = dim // cfg.heads
        self.blocks = nn.ModuleList(_Block(dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(dim, eps=cfg.final_norm_eps)
        self.out = nn.Linear(dim, codebook_size)  # shared over depths
        self.init_weights()

    def init_weights(self) -> None:
        """Linear/Embedding weights and the depth position embedding ~ N(0, 0.02); Linear biases 0;
        RMSNorm scales 1 (their default)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.pos is not None:
            nn.init.normal_(self.pos, std=0.02)

    def logits(self, h: Tensor, prefix: Tensor) -> Tensor:
        """h (M, D), prefix ids (M, L-1) of the first depths -> logits (M, L, K) for depths 0..L-1."""
        embs = [self.embeds[g](prefix[:, g]) for g in range(prefix.size(1))]  # each (M, D)
        x = torch.stack([h, *embs], dim=1)  # (M, L, D)
        rope = None
        if self.pos is None:
            rope = depth_rope(x.size(1), self.head_size, x.device)
        else:
            x = x + self.pos[: x.size(1)].to(x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return self.out(self.norm(x))  # (M, L, K)

    def forward(self, h: Tensor, ids: Tensor) -> Tensor:
        """Teacher forcing: h (M, D), ids (M, G) -> logits (M, G, K); logits[:, g] sees only ids[:, :g]."""
        self.check_states(h)
        self._check_ids(ids, h.size(0))
        return self.logits(h, ids[:, :-1])

    def check_states(self, h: Tensor) -> None:
        if h.dim() != 2 or h.size(1) != self.dim:
            raise ValueError(f"h must be (M, {self.dim}), got {tuple(h.shape)}")

    def _check_ids(self, ids: Tensor, rows: int) -> None:
        G, K = self.codebooks, self.codebook_size
        if ids.shape != (rows, G) or ids.dtype != torch.long:
            raise ValueError(f"ids must be a long tensor of shape ({rows}, {G}), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= K):
            raise ValueError(f"ids must lie in [0, {K}), got range [{ids.min()}, {ids.max()}]")
