"""MBAQ: model-behaviour-aligned quantizer (LatentUM §2) on vector-quantize-pytorch.

Legend: B batch, N image tokens, F encoder feature width, G codebooks (ids per token), K codebook size,
d code_dim (one codebook chunk), D = G * d (a token's code vector z_q), O out_dim (backbone/VLM width),
M = B * N flattened tokens.

Pipeline: features (B,N,F) -> down MLP -> z (B,N,D) -> product VQ (G separate codebooks over d-dim chunks)
-> ids (B,N,G), z_q (B,N,D) -> up MLP -> (B,N,O), the drop-in replacement for the VLM's projector output.
Grown codebooks (``QuantizerConfig.grown_codebooks``, the last G - G0 of them; ``model.grow``) take their chunks
of z from a head of their own instead of the down MLP, so the first G0 ids do not depend on them.

What the library does and what we do (LatentUM §2 as the spec):
- ``VectorQuantize`` owns the G codebooks (learnable by gradient, no EMA codebook update, as LatentUM), the
  nearest-code assignment and dead-code replacement (``threshold_ema_dead_code``).
- The VQ loss terms are computed here: LatentUM weighs the codebook term 1.0 and the commitment term 0.25,
  but the library's single ``commitment_weight * MSE(q, z)`` with a learnable codebook gives both sides the
  same weight. Its diversity loss averages soft assignments over *different* codebooks and per position; the
  LatentUM term is the entropy of the batch-averaged assignment of each codebook, so we compute that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize
from vector_quantize_pytorch.vector_quantize_pytorch import sample_vectors_distributed

from latentum.config import QuantizerConfig
from latentum.types import LossBreakdown

USAGE_DECAY = 0.99
"""EMA decay of code usage (LatentUM keeps usage statistics with decay 0.99)."""
SEEN_WINDOW = 100
"""Steps over which ``usage()``'s ``used_recently`` counts the codes assigned at least once."""


def code_distances(codebook: Tensor, z: Tensor) -> Tensor:
    """Squared distances (..., G, K) of latents z (..., G * d) to every code of a product codebook (G, K, d), as
    |z|^2 - 2 z.e + |e|^2 in fp32 (no (..., G, K, d) difference tensor)."""
    zg = z.float().unflatten(-1, (codebook.size(0), -1))  # (..., G, d)
    e = codebook.float()
    return zg.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("...gd,gkd->...gk", zg, e) + e.pow(2).sum(-1)


class QuantizerOutput(NamedTuple):
    codes: Tensor
    """z_q (B, N, D); straight-through gradients to the down-projection when its input needs grad."""
    ids: Tensor
    """(B, N, G) long, ids[..., g] in [0, K)."""
    loss: LossBreakdown
    """codebook + commitment_weight * commit - entropy_weight * entropy."""


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MBAQ(nn.Module):
    """Down-projection, G-codebook product VQ, up-projection. See the module docstring for the split of
    work with vector-quantize-pytorch."""

    def __init__(self, cfg: QuantizerConfig, feature_dim: int, out_dim: int):
        super().__init__()
        if feature_dim < 1 or out_dim < 1:
            raise ValueError(f"feature_dim and out_dim must be >= 1, got {feature_dim}, {out_dim}")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.out_dim = out_dim
        G, K, d = cfg.codebooks, cfg.codebook_size, cfg.code_dim
        G0 = cfg.base_codebooks
        self.down = _mlp(feature_dim, cfg.hidden_dim, G0 * d)
        self.norm = nn.LayerNorm(G0 * d, elementwise_affine=False) if cfg.norm_latents else nn.Identity()
        # Grown codebooks read the features by a head of their own, not normed: a token can sit at the zero code.
        self.grown = _mlp(feature_dim, cfg.hidden_dim, cfg.grown_codebooks * d) if cfg.grown_codebooks else None
        self.vq = VectorQuantize(
            dim=G * d, codebook_dim=d, heads=G, separate_codebook_per_head=True, codebook_size=K,
            learnable_codebook=True, ema_update=False,  # codebook trained by gradient (LatentUM)
            rotation_trick=False,  # plain straight-through estimator, as LatentUM
            commitment_weight=0.0,  # VQ terms computed in _vq_loss with LatentUM's weights
            decay=USAGE_DECAY,  # EMA of cluster sizes, used only for dead-code detection here
            # Placeholder > 0 switches dead-code tracking on; the real threshold depends on the batch's
            # token count and is set per step in _set_dead_code_threshold.
            threshold_ema_dead_code=1.0 if cfg.dead_code_threshold > 0 else 0.0,
        )
        self.up = _mlp(G * d, cfg.up_hidden_dim or cfg.hidden_dim, out_dim)
        # (G, K) EMA of per-codebook code frequencies (rows sum to 1), for logging only.
        self.register_buffer("usage_ema", torch.full((G, K), 1.0 / K))
        # (G, K) training step each code was last assigned at (-1: not yet), and the step count: the honest
        # "codes in use" of the log. Not saved (a statistic of the run, not of the model).
        self.register_buffer("last_seen", torch.full((G, K), -1, dtype=torch.long), persistent=False)
        self.steps = 0

    # -- API -----------------------------------------------------------------------------------------

    def encode(self, features: Tensor) -> QuantizerOutput:
        """features (B, N, F) -> z_q (B, N, D), ids (B, N, G), VQ loss. Updates usage in training."""
        if features.dim() != 3 or features.size(-1) != self.feature_dim:
            raise ValueError(f"features must be (B, N, {self.feature_dim}), got {tuple(features.shape)}")
        z = self.latents(features)  # (B, N, D)
        if self.training:
            self._set_dead_code_threshold(z.shape[0] * z.shape[1])
        # fp32 nearest-code search: bf16 autocast distances would blur the argmin (the library disables
        # autocast for CUDA only).
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, ids, _ = self.vq(z.float())  # ids (B, N, G); library loss is zero (commitment_weight=0)
        ids = ids.long()
        q = self.codes_from_ids(ids)  # (B, N, D), exact codebook vectors, grad to the codebook
        loss = self._vq_loss(z, q)
        if self.training:
            self._update_usage(ids)
        # Straight-through only when a gradient can flow, so eval/no-grad codes equal codes_from_ids bitwise.
        codes = z + (q - z).detach() if z.requires_grad else q
        return QuantizerOutput(codes, ids, loss)

    def latents(self, features: Tensor) -> Tensor:
        """features (B, N, F) -> z (B, N, D), what the code search reads: the down-projection's chunks (normed with
        ``norm_latents``), then the grown codebooks' chunks from their own head."""
        z = self.norm(self.down(features))  # (B, N, G0 * d)
        return z if self.grown is None else torch.cat([z, self.grown(features).to(z.dtype)], dim=-1)

    def codes_from_ids(self, ids: Tensor) -> Tensor:
        """ids (B, N, G) long -> z_q (B, N, D): the exact inverse of :meth:`encode`'s assignment."""
        G, K = self.cfg.codebooks, self.cfg.codebook_size
        if ids.dim() != 3 or ids.size(-1) != G or ids.dtype != torch.long:
            raise ValueError(f"ids must be a long tensor of shape (B, N, {G}), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= K):
            raise ValueError(f"ids must lie in [0, {K}), got range [{ids.min()}, {ids.max()}]")
        return self.vq.get_codes_from_indices(ids)  # (B, N, G*d), chunks concatenated in codebook order

    def project(self, z_q: Tensor) -> Tensor:
        """z_q (B, N, D) -> (B, N, O): the up-projection that stands in for the VLM's feature projector."""
        if z_q.size(-1) != self.cfg.dim:
            raise ValueError(f"z_q must end with dim {self.cfg.dim} (codebooks * code_dim), "
                             f"got {tuple(z_q.shape)}")
        return self.up(z_q)

    def forward(self, features: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """features (B, N, F) -> (projected (B, N, O), QuantizerOutput): the stage-1 student path."""
        out = self.encode(features)
        return self.project(out.codes), out

    def sync_across_processes(self) -> None:
        """Under multi-process training, count code usage and revive dead codes over every process's tokens
        (the library's ``sync_codebook`` mode, which it only picks when the process group exists as it is
        built): each process then keeps the same codebook. Called by training once the group is up."""
        cb = self.vq._codebook  # the library exposes these only on its Codebook module
        cb.use_ddp, cb.all_reduce_fn, cb.replace_sample_fn = True, dist.all_reduce, sample_vectors_distributed
        self._synced = True

    def _all_processes_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the processes that train together (``sync_across_processes``), else ``x``."""
        if getattr(self, "_synced", False) and dist.is_initialized():
            dist.all_reduce(x)
        return x

    @torch.no_grad()
    def usage(self) -> dict[str, float]:
        """Per-codebook usage from the EMA of code frequencies: fraction of codes in recent use (not
        dead), perplexity exp(H) (K means perfectly uniform) and dead-code count."""
        K = self.cfg.codebook_size
        p = self.usage_ema.float()  # (G, K)
        dead = p < self.cfg.dead_code_threshold / K  # (G, K)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))  # (G,)
        stats: dict[str, float] = {}
        for g in range(p.size(0)):
            stats[f"cb{g}/used_frac"] = 1.0 - dead[g].float().mean().item()
            stats[f"cb{g}/perplexity"] = perplexity[g].item()
            stats[f"cb{g}/dead"] = float(dead[g].sum().item())
        stats["used_frac"] = 1.0 - dead.float().mean().item()
        stats["perplexity"] = perplexity.mean().item()
        stats["dead"] = float(dead.sum().item())
        # Codes assigned at least once in the last SEEN_WINDOW steps: the EMA threshold above (3% of uniform)
        # calls a code alive long after it stopped being used, so this is the figure to read for collapse.
        recent = (self.last_seen >= 0) & (self.last_seen >= self.steps - SEEN_WINDOW)  # (G, K)
        for g in range(p.size(0)):
            stats[f"cb{g}/used_recently"] = float(recent[g].sum().item())
        stats["used_recently_frac"] = recent.float().mean().item()
        return stats

    # -- internals -----------------------------------------------------------------------------------

    def _vq_loss(self, z: Tensor, q: Tensor) -> LossBreakdown:
        """LatentUM L_vq = MSE(q, sg(z)) + beta * MSE(sg(q), z) - lambda * H(p_bar), averaged over codebooks.

        p_bar is the batch-averaged soft assignment softmax(-||z - e_j||^2) of each codebook; maximising its
        entropy spreads usage over the codebook.
        """
        z, q = z.float(), q.float()
        codebook = F.mse_loss(q, z.detach())
        commit = F.mse_loss(q.detach(), z)
        entropy = self._assignment_entropy(z)
        cfg = self.cfg
        total = codebook + cfg.commitment_weight * commit - cfg.entropy_weight * entropy
        parts = {"codebook": codebook.detach(), "commit": commit.detach(), "entropy": entropy.detach()}
        return LossBreakdown(total, parts)

    def _assignment_entropy(self, z: Tensor) -> Tensor:
        """Mean over codebooks of H(mean over tokens of softmax(-||z_g - e_gj||^2)); fp32, no autocast."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            sq = code_distances(self.vq.codebook, z.flatten(0, 1))  # (M, G, K)
            p_bar = (-sq).softmax(-1).mean(0)  # (G, K)
            return -(p_bar * p_bar.clamp_min(1e-12).log()).sum(-1).mean()

    def _set_dead_code_threshold(self, num_tokens: int) -> None:
        """The library compares an EMA of raw per-batch code counts with a fixed count. LatentUM's rule is
        relative ("below 3% of uniform usage"), so convert it with this batch's uniform count M / K; a
        revived code restarts at uniform usage, as in LatentUM."""
        if self.cfg.dead_code_threshold <= 0:
            return
        if getattr(self, "_synced", False):  # the library counts codes over every process's tokens
            num_tokens = float(self._all_processes_sum(torch.tensor(float(num_tokens), device=self.usage_ema.device)))
        uniform = num_tokens / self.cfg.codebook_size
        cb = self.vq._codebook  # the library exposes these only on its Codebook module
        cb.threshold_ema_dead_code = self.cfg.dead_code_threshold * uniform
        cb.reset_cluster_size = uniform

    @torch.no_grad()
    def _update_usage(self, ids: Tensor) -> None:
        G, K = self.cfg.codebooks, self.cfg.codebook_size
        flat = rearrange(ids, "b n g -> g (b n)")  # (G, M)
        ones = torch.ones_like(flat, dtype=torch.float)
        counts = torch.zeros(G, K, device=ids.device).scatter_add_(1, flat, ones)  # (G, K)
        counts = self._all_processes_sum(counts)
        self.last_seen.masked_fill_(counts > 0, self.steps)
        self.steps += 1
        freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)  # (G, K)
        self.usage_ema.lerp_(freq, 1.0 - USAGE_DECAY)

