"""Pretrained VLM vision towers from ``transformers`` (issue #29, item 2): SigLIP and InternViT.

``build_encoder`` picks the encoder of ``EncoderConfig.kind``: our from-scratch timm ViT (``model.encoder``),
``SiglipTower`` (``transformers.SiglipVisionModel``) or ``InternViTTower`` (``transformers.InternVLVisionModel``,
the HF-native InternViT). All three share one interface: attributes ``cfg``, ``feature_dim``, ``num_tokens``;
``forward(pixels (B, 3, S, S)) -> (B, N, F)``; ``preprocess(uint8 images) -> pixels`` on the module's device.

The InternViT tower returns exactly what ``InternVLModel.get_image_features`` hands its projector (LatentUM §1-§2:
MBAQ quantizes these features, before ``mlp1``): the last layer's patch tokens, CLS dropped, pixel shuffled. The
projector itself is the model's ``feature_projector``, not part of the tower.

Also here: the ORIGINAL InternViT remote-code key layout (``vision_model.*`` of an InternVL chat checkpoint)
to and from ``InternVLVisionModel``'s keys, and its ``vision_config`` -> ``EncoderConfig``.

Legend: B batch, S image side (``image_size``), P patches per side (S / patch_size), C tower width, r pixel-shuffle
ratio, s = 1 / r, g token-grid side (P * r), N tokens (g * g, raster order), F features per token (C / r**2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import (
    GotOcr2ImageProcessor,
    InternVLVisionConfig,
    InternVLVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
)

from latentum.config import EncoderConfig
from latentum.model.encoder import VisionEncoder

TOWER_ATTR = "tower"
"""Attribute of ``SiglipTower`` / ``InternViTTower`` holding the ``transformers`` model."""
TOWER_PREFIX = f"encoder.{TOWER_ATTR}."
"""Where the ``transformers`` tower's own state-dict keys sit in ``LatentUMModel`` (``model.encoder.tower``)."""


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The vision encoder of ``cfg.kind``: "vit" (ours), "siglip" or "internvit" (``transformers`` towers)."""
    if cfg.kind == "vit":
        return VisionEncoder(cfg)
    if cfg.kind == "siglip":
        return SiglipTower(cfg)
    if cfg.kind == "internvit":
        return InternViTTower(cfg)
    raise ValueError(f"encoder.kind must be 'vit', 'siglip' or 'internvit', got {cfg.kind!r}")


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """InternVL's "v2" pixel shuffle (``InternVLModel.pixel_shuffle``): (B, h, w, C) -> (B, h*r, w*r, C / r**2).

    Each s x s block of patches becomes one token whose features are the block's patches in raster order:
    out[b, i, j] = concat(x[b, s*i + di, s*j + dj] for di in range(s) for dj in range(s)).
    """
    s = round(1 / ratio) if ratio > 0 else 0
    if s < 1 or s * ratio != 1:
        raise ValueError(f"pixel_shuffle ratio must be 1 / n for a whole n, got {ratio}")
    if x.dim() != 4 or x.shape[1] % s or x.shape[2] % s:
        raise ValueError(f"pixel_shuffle needs x of shape (B, h, w, C) with h and w divisible by {s}, "
                         f"got {tuple(x.shape)}")
    return rearrange(x, "b (i di) (j dj) c -> b i j (di dj c)", di=s, dj=s)


class _HFTower(nn.Module):
    """A ``transformers`` vision model under ``self.tower`` and its image processor: the shared interface."""

    def __init__(self, cfg: EncoderConfig, tower: nn.Module, processor):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = cfg.feature_dim
        self.num_tokens = cfg.num_tokens
        self.tower = tower  # TOWER_ATTR
        self.processor = processor  # the tower's own preprocessing (a transformers image processor)

    def _patch_tokens(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, S, S) -> the last layer's patch tokens (B, P*P, C), raster order, no CLS."""
        raise NotImplementedError

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, S, S) from :meth:`preprocess` -> features (B, N, F), pixel shuffled by ``cfg``."""
        S = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S) or not pixels.is_floating_point():
            raise ValueError(f"pixels must be a float tensor of shape (B, 3, {S}, {S}), got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")
        x = self._patch_tokens(pixels)  # (B, P*P, C)
        x = rearrange(x, "b (h w) c -> b h w c", h=S // self.cfg.patch_size)  # (B, P, P, C)
        x = pixel_shuffle(x, self.cfg.pixel_shuffle)  # (B, g, g, F)
        return rearrange(x, "b h w f -> b (h w) f")

    def preprocess(self, images: np.ndarray | Tensor | Sequence[np.ndarray | Tensor]) -> Tensor:
        """uint8 images (B, H, W, 3), or a list of (H, W, 3) of any sizes -> float pixels (B, 3, S, S) on the
        tower's device, by the tower's own ``transformers`` image processor (resize to S, rescale, normalise)."""
        if isinstance(images, (np.ndarray, Tensor)):
            if images.ndim != 4:
                raise ValueError(f"images must be uint8 of shape (B, H, W, 3), got {images.dtype} "
                                 f"{tuple(images.shape)}")
            images = list(images)
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a numpy array, a tensor or a list of them, got {type(images).__name__}")
        batch = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                im = torch.from_numpy(np.ascontiguousarray(im))
            if not isinstance(im, Tensor):
                raise TypeError(f"images[{i}] must be a numpy array or torch tensor, got {type(im).__name__}")
            if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[-1] != 3 or 0 in im.shape:
                raise ValueError(f"images[{i}] must be uint8 of shape (H, W, 3), got {im.dtype} {tuple(im.shape)}")
            batch.append(im)
        device = next(self.parameters()).device
        if not batch:
            S = self.cfg.image_size
            return torch.zeros(0, 3, S, S, device=device)
        out = self.processor(images=batch, return_tensors="pt", input_data_format="channels_last", device=device)
        return out["pixel_values"]  # (B, 3, S, S) float32


class SiglipTower(_HFTower):
    """``transformers.SiglipVisionModel`` (no pooling head): features are ``last_hidden_state`` (post-LayerNorm),
    optionally pixel shuffled; preprocessing is ``SiglipImageProcessor`` (bicubic resize, mean = std = 0.5)."""

    def __init__(self, cfg: EncoderConfig):
        if not cfg.qkv_bias or cfg.qk_norm:
            raise ValueError(f"encoder kind 'siglip' has q/k/v biases and no q/k norms: qkv_bias must be True and "
                             f"qk_norm False, got {cfg.qkv_bias} and {cfg.qk_norm}")
        config = SiglipVisionConfig(
            hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg.norm_eps, vision_use_head=False,
        )
        size = {"height": cfg.image_size, "width": cfg.image_size}
        processor = SiglipImageProcessor(size=size, resample=PILImageResampling.BICUBIC,
                                         image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
        super().__init__(cfg, SiglipVisionModel(config), processor)

    def _patch_tokens(self, pixels: Tensor) -> Tensor:
        return self.tower(pixel_values=pixels).last_hidden_state  # (B, P*P, C): SigLIP has no CLS


class InternViTTower(_HFTower):
    """``transformers.InternVLVisionModel`` (InternViT): last layer, CLS dropped, pixel shuffled, as
    ``InternVLModel.get_image_features`` feeds its projector; preprocessing is InternVL's
    ``GotOcr2ImageProcessor`` with one tile (``crop_to_patches`` off, as LatentUM runs it) and ImageNet mean/std."""

    def __init__(self, cfg: EncoderConfig):
        config = InternVLVisionConfig(
            hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_hidden, attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm,
            hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=cfg.norm_eps,
            image_size=cfg.image_size, patch_size=cfg.patch_size,
            use_mean_pooling=True,  # no final LayerNorm: the original InternViT has none
        )
        size = {"height": cfg.image_size, "width": cfg.image_size}
        processor = GotOcr2ImageProcessor(size=size, resample=PILImageResampling.BICUBIC, crop_to_patches=False,
                                          image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
        super().__init__(cfg, InternVLVisionModel(config), processor)

    def _patch_tokens(self, pixels: Tensor) -> Tensor:
        return self.tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, 1 + P*P, C) -> drop CLS


# --- the original InternViT (InternVL remote code) ------------------------------------------------------------

_INTERNVIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "image_size", "qkv_bias", "qk_normalization", "norm_type")
"""Fields an original ``vision_config`` must carry: the remote code's defaults are InternViT-6B's, so a missing one
is an error rather than a guess."""


def encoder_config_from_internvit(vision_config: Mapping, downsample_ratio: float) -> EncoderConfig:
    """An original InternVL chat config's ``vision_config`` (remote-code ``InternVisionConfig`` fields) and its
    ``downsample_ratio`` -> ``EncoderConfig(kind="internvit")``. Training-only fields (``drop_path_rate``,
    ``dropout``, ``use_flash_attn``, ...) are ignored; an unsupported value is a ValueError naming the field."""
    v = vision_config
    for name in _INTERNVIT_FIELDS:
        if name not in v:
            raise ValueError(f"vision_config.{name} is missing (InternVisionConfig field)")
    if v["norm_type"] != "layer_norm":
        raise ValueError(f"vision_config.norm_type must be 'layer_norm' (InternViT-300M), got {v['norm_type']!r}: "
                         "RMSNorm towers (InternViT-6B) are not supported")
    if v.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vision_config.hidden_act must be 'gelu', got {v['hidden_act']!r}")
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"vision_config.num_channels must be 3, got {v['num_channels']!r}")
    eps = float(v.get("layer_norm_eps", 1e-6))
    if v["qk_normalization"] and eps != 1e-6:
        # The original q/k RMSNorms take layer_norm_eps; InternVLVisionModel's always use 1e-6.
        raise ValueError(f"vision_config.layer_norm_eps must be 1e-6 with qk_normalization, got {eps}")
    return EncoderConfig(
        kind="internvit", image_size=_side(v, "image_size"), patch_size=_side(v, "patch_size"),
        width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
        ffn_hidden=int(v["intermediate_size"]), pixel_shuffle=float(downsample_ratio), norm_eps=eps,
        qkv_bias=bool(v["qkv_bias"]), qk_norm=bool(v["qk_normalization"]),
    )


def _side(v: Mapping, name: str) -> int:
    side = v[name]
    if isinstance(side, (list, tuple)):
        if len(side) != 2 or side[0] != side[1]:
            raise ValueError(f"vision_config.{name} must be square, got {side!r}")
        side = side[0]
    return int(side)


_EMBED_KEYS = {  # original -> InternVLVisionModel, outside the layers
    "embeddings.class_embedding": "embeddings.cls_token",  # (1, 1, C)
    "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",  # (C, 3, p, p)
    "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
    "embeddings.position_embedding": "embeddings.position_embeddings",  # (1, 1 + P*P, C)
}
_LAYER_KEYS = {  # per layer: original suffix -> InternVLVisionModel suffixes (the fused qkv splits in three)
    "norm1.weight": ("layernorm_before.weight",),
    "norm1.bias": ("layernorm_before.bias",),
    "attn.qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
    "attn.qkv.bias": ("attention.q_proj.bias", "attention.k_proj.bias", "attention.v_proj.bias"),
    "attn.q_norm.weight": ("attention.q_norm.weight",),
    "attn.k_norm.weight": ("attention.k_norm.weight",),
    "attn.proj.weight": ("attention.projection_layer.weight",),
    "attn.proj.bias": ("attention.projection_layer.bias",),
    "ls1": ("lambda_1",),
    "ls2": ("lambda_2",),
    "norm2.weight": ("layernorm_after.weight",),
    "norm2.bias": ("layernorm_after.bias",),
    "mlp.fc1.weight": ("mlp.fc1.weight",),
    "mlp.fc1.bias": ("mlp.fc1.bias",),
    "mlp.fc2.weight": ("mlp.fc2.weight",),
    "mlp.fc2.bias": ("mlp.fc2.bias",),
}
_OPTIONAL_GROUPS = (("norm1.bias", "norm2.bias"), ("attn.qkv.bias",), ("attn.q_norm.weight", "attn.k_norm.weight"))
"""Per-layer keys that depend on the config (LayerNorm vs RMSNorm, qkv_bias, qk_normalization): one key of a
group in any layer makes the whole group required in every layer."""
_ORIG_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def _layer_keys(depth: int, suffixes: Sequence[str], hf: bool) -> list[str]:
    """Every key of the layout (original or HF) for ``depth`` layers carrying the original ``suffixes``."""
    if hf:
        keys = list(_EMBED_KEYS.values())
        keys += [f"encoder.layer.{i}.{h}" for i in range(depth) for s in suffixes for h in _LAYER_KEYS[s]]
    else:
        keys = list(_EMBED_KEYS)
        keys += [f"encoder.layers.{i}.{s}" for i in range(depth) for s in suffixes]
    return keys


def _expected_keys(state: Mapping[str, Tensor], hf: bool) -> list[str]:
    """Parse every key of ``state`` (ValueError on an unknown one) and list the keys the layout must have."""
    to_suffix = {h: s for s, hs in _LAYER_KEYS.items() for h in hs} if hf else {s: s for s in _LAYER_KEYS}
    embed = set(_EMBED_KEYS.values()) if hf else set(_EMBED_KEYS)
    pattern = _HF_LAYER if hf else _ORIG_LAYER
    depth, seen = 0, set()
    for key in state:
        if key in embed:
            continue
        m = pattern.fullmatch(key)
        if m is None or m.group(2) not in to_suffix:
            layout = "InternVLVisionModel" if hf else "original InternViT"
            raise ValueError(f"unknown key {key!r} in an {layout} state dict")
        depth = max(depth, int(m.group(1)) + 1)
        seen.add(to_suffix[m.group(2)])
    optional = {s for group in _OPTIONAL_GROUPS for s in group}
    used = {s for group in _OPTIONAL_GROUPS if seen & set(group) for s in group}
    suffixes = [s for s in _LAYER_KEYS if s not in optional or s in used]
    return _layer_keys(depth, suffixes, hf)


def _check_complete(state: Mapping[str, Tensor], expected: Sequence[str]) -> None:
    for key in expected:
        if key not in state:
            raise ValueError(f"missing key {key!r} in an InternViT state dict")


def internvit_from_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original InternViT keys (``vision_model.`` stripped) -> ``InternVLVisionModel`` state dict; the fused
    ``attn.qkv`` rows [q; k; v] split into ``q_proj``, ``k_proj``, ``v_proj``. Unknown or missing key: ValueError."""
    _check_complete(state, _expected_keys(state, hf=False))
    out = {hf: state[orig] for orig, hf in _EMBED_KEYS.items()}
    for key, value in state.items():
        m = _ORIG_LAYER.fullmatch(key)
        if m is None:
            continue
        names = _LAYER_KEYS[m.group(2)]
        parts = value.chunk(3, dim=0) if len(names) == 3 else (value,)  # (3C, ...) -> 3 x (C, ...)
        for name, part in zip(names, parts, strict=True):
            # clone: three views of one storage would not save to safetensors
            out[f"encoder.layer.{m.group(1)}.{name}"] = part.clone() if len(names) == 3 else part
    return out


def internvit_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``InternVLVisionModel`` state dict -> original InternViT keys (without ``vision_model.``): the inverse of
    :func:`internvit_from_original`, q/k/v fused back into ``attn.qkv``. Unknown or missing key: ValueError."""
    expected = _expected_keys(state, hf=True)
    _check_complete(state, expected)
    out = {orig: state[hf] for orig, hf in _EMBED_KEYS.items()}
    depth = sum(1 for k in expected if k.endswith(".lambda_1"))
    for i in range(depth):
        for suffix, names in _LAYER_KEYS.items():
            parts = [state.get(f"encoder.layer.{i}.{name}") for name in names]
            if parts[0] is not None:
                out[f"encoder.layers.{i}.{suffix}"] = torch.cat(parts) if len(parts) == 3 else parts[0]
    return out
