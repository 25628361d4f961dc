"""Growing a trained model by codebooks: new codes beside the old ones, so a new world's images can say what the
old codes cannot, while every old image keeps its codes and everything downstream reads it as before.

Legend: G0 codebooks before, G after, K codebook size, d code_dim, h projector hidden width, D backbone width.

What is kept, by construction:
- the first G0 ids of every image: the down-projection, its norm and the first G0 codebooks are copied and the new
  chunks of z come from a head of their own (``MBAQ.grown``), so the code search of the old chunks is unchanged;
- an image whose new ids are 0 is embedded as before: code 0 of each new codebook is the zero vector and the new
  input columns of the up-projection and the visual projector start at zero, so it adds nothing;
- the depth head's first G0 depths: it is causal over depth and its new depth only appends a step (a new embedding
  for id G0 - 1 fed back, a new depth position).

What training must do: pull the old world's new-chunk latents to code 0 (``KeepCodesConfig`` does, for a quantizer
with grown codebooks), and teach the depth head to say 0 at the new depths for the old world's images. Until a
stage-2 leg has, a grown model's thoughts about the old world carry arbitrary new ids: harmless while the visual
projector's new columns are zero (the same plans, ``tests/test_grow.py``), but drafts from encoded boards (new ids
0) then disagree with the thoughts at the new depth, so planning runs without their shortcut.

Tensors that grow (their old values kept in the leading slice): the codebooks (G0, K, d) -> (G, K, d) and their
statistics (G0, K), the up-projection's and visual projector's first weights (h, G0 * d) -> (h, G * d) and the
depth head's positions (G0, D) -> (G, D); new: the grown codebooks' head (features -> (G - G0) * d) and the depth
head's embedding of id G0 - 1.
"""

from __future__ import annotations

import copy

import torch

from latentum.model.decoder import PixelDecoder
from latentum.model.latentum import LatentUMModel

NEW_INPUT_COLUMNS = ("quantizer.up.0.weight", "visual_projector.net.0.weight")
"""Linear weights (h, G * d) whose inputs are the code vector: their columns for the new chunks start at zero."""
DECODER_INPUT_COLUMNS = ("cond.1.weight", "summary.1.weight")
"""The pixel decoder's Linear weights over the code vector."""
CODEBOOK = "quantizer.vq._codebook.embed"
"""(G, K, d) codebooks of vector-quantize-pytorch."""


@torch.no_grad()
def grow_codebooks(model: LatentUMModel, n: int) -> LatentUMModel:
    """A new model with ``n`` codebooks more (``quantizer.grown_codebooks = n``), every weight of ``model`` copied
    into it (see the module docstring for what that keeps). Parts that are new start as a fresh model's do; a
    tensor that grew keeps ``model``'s values in its leading slice. ``model`` itself is not changed."""
    if n < 1:
        raise ValueError(f"grow_codebooks: n must be >= 1, got {n}")
    if model.cfg.quantizer.grown_codebooks:
        raise ValueError(f"grow_codebooks: the model's quantizer already grew {model.cfg.quantizer.grown_codebooks} "
                         "codebook(s); grow it once, by every codebook it needs")
    cfg = copy.deepcopy(model.cfg)
    q = cfg.quantizer
    G0, d = q.codebooks, q.code_dim
    q.codebooks, q.grown_codebooks = G0 + n, n
    grown = LatentUMModel(cfg)
    _copy_into(grown, model.state_dict(), {key: G0 * d for key in NEW_INPUT_COLUMNS})
    grown.state_dict()[CODEBOOK][G0:, 0] = 0
    weight = model.backbone.lm_head.weight
    return grown.to(device=weight.device, dtype=weight.dtype).train(model.training)


@torch.no_grad()
def grow_decoder(decoder: PixelDecoder, code_dim: int) -> PixelDecoder:
    """A pixel decoder for a code vector grown to ``code_dim`` (a model grown by codebooks), ``decoder``'s weights
    copied in and the new inputs' columns at zero: a warm start for the decoder of the grown model (its LayerNorms
    over the code vector do see the new entries, so it does not render exactly as before)."""
    if code_dim < decoder.code_dim:
        raise ValueError(f"grow_decoder: code_dim must be >= the decoder's {decoder.code_dim}, got {code_dim}")
    grown = PixelDecoder(decoder.cfg, code_dim=code_dim, grid=decoder.grid)
    _copy_into(grown, decoder.state_dict(), {key: decoder.code_dim for key in DECODER_INPUT_COLUMNS})
    return grown.to(next(decoder.parameters()).device)


def _copy_into(module: torch.nn.Module, old: dict[str, torch.Tensor], zero_from: dict[str, int]) -> None:
    """Copy the state ``old`` into ``module``'s leading slices; columns ``zero_from[key]:`` of a weight start at 0."""
    new = module.state_dict()
    if lost := sorted(set(old) - set(new)):
        raise ValueError(f"grow: the grown model has no place for {lost[:3]} (a model with adapters: merge them "
                         "first)")
    for key, value in new.items():
        if key in old:
            value[_leading(old[key].shape, value.shape, key)] = old[key]
    for key, start in zero_from.items():
        new[key][:, start:] = 0


def _leading(old: torch.Size, new: torch.Size, key: str) -> tuple[slice, ...]:
    """The slice of a tensor of shape ``new`` that holds one of shape ``old``: its leading part in every dim."""
    if len(old) != len(new) or any(a > b for a, b in zip(old, new)):
        raise ValueError(f"grow: {key} of shape {tuple(old)} does not fit in {tuple(new)}")
    return tuple(slice(0, s) for s in old)
