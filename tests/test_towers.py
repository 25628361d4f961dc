"""The pretrained vision towers (issue #29, item 2) against ``transformers``' own pipelines, fp32, tiny configs.

Every comparison randomises norms, biases, layer scales and position embeddings first, so a weight that lands in
the wrong place (or a wrong activation, eps or CLS handling) shows up as a feature difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLModel,
    InternVLVisionConfig,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from latentum.config import EncoderConfig
from latentum.model.encoder import VisionEncoder
from latentum.model.towers import (
    TOWER_PREFIX,
    InternViTTower,
    SiglipTower,
    build_encoder,
    encoder_config_from_internvit,
    internvit_from_original,
    internvit_to_original,
    pixel_shuffle,
)

TOL = 1e-4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere: matrices ~ N(0, 0.1), vectors (biases, layer scales) ~ N(0, 0.5), norm weights
    ~ 1 + N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise * (0.5 if p.dim() == 1 else 0.1))
    return module.eval()


def _pixels(cfg: EncoderConfig, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _internvit_cfg(size: int, qk_norm: bool = False) -> EncoderConfig:
    """A large LayerNorm eps, so a tower that ignores it shows; 1e-6 with q/k norms, whose eps transformers fixes
    at 1e-6 (``encoder_config_from_internvit`` refuses any other)."""
    return EncoderConfig(kind="internvit", image_size=size, patch_size=14, width=32, depth=2, heads=4,
                         ffn_hidden=48, pixel_shuffle=0.5, norm_eps=1e-6 if qk_norm else 1e-2, qkv_bias=True,
                         qk_norm=qk_norm)


# --- interface ------------------------------------------------------------------------------------------------

def test_build_encoder_picks_the_kind_and_reports_shapes():
    assert type(build_encoder(EncoderConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2))) is \
        VisionEncoder
    sig = build_encoder(EncoderConfig(kind="siglip", image_size=32, patch_size=16, width=32, depth=1, heads=2))
    ivt = build_encoder(_internvit_cfg(56))
    assert type(sig) is SiglipTower and type(ivt) is InternViTTower
    assert (sig.num_tokens, sig.feature_dim) == (4, 32) and (ivt.num_tokens, ivt.feature_dim) == (4, 128)
    assert all(k.startswith("tower.") for k in ivt.state_dict()) and TOWER_PREFIX == "encoder.tower."
    with torch.no_grad():
        assert ivt(ivt.preprocess(_images((3, 20, 31, 3), 0))).shape == (3, 4, 128)
    with pytest.raises(ValueError, match=r"pixels must be a float tensor of shape \(B, 3, 56, 56\)"):
        ivt(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="qkv_bias must be True"):
        SiglipTower(EncoderConfig(kind="siglip", image_size=32, patch_size=16, width=32, depth=1, heads=2,
                                  qkv_bias=False))


# --- SigLIP ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,ratio", [(32, 1.0), (48, 1.0), (64, 0.5)])
def test_siglip_tower_equals_siglip_vision_model(size, ratio):
    cfg = EncoderConfig(kind="siglip", image_size=size, patch_size=16, width=32, depth=2, heads=4, ffn_hidden=48,
                        pixel_shuffle=ratio, norm_eps=1e-2)
    tower = _randomise_(SiglipTower(cfg), seed=size)
    ref = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=size,
        patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-2, vision_use_head=False)).eval()
    ref.load_state_dict({k.removeprefix("tower."): v for k, v in tower.state_dict().items()}, strict=True)
    pixels = _pixels(cfg, seed=1)
    with torch.no_grad():
        got = tower(pixels)
        want = ref(pixel_values=pixels).last_hidden_state  # (B, P*P, C)
    P = size // 16
    want = pixel_shuffle(want.reshape(2, P, P, 32), ratio).reshape(2, cfg.num_tokens, cfg.feature_dim)
    assert got.shape == (2, cfg.num_tokens, cfg.feature_dim)
    assert (got - want).abs().max() <= TOL


# --- InternViT ------------------------------------------------------------------------------------------------

def _internvl(cfg: EncoderConfig, text_dim: int = 24) -> InternVLModel:
    """transformers' InternVL (tiny Qwen2 LM) around a vision tower of ``cfg``, built from its own configs."""
    vision = InternVLVisionConfig(hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                                  num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_hidden,
                                  attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm, layer_norm_eps=cfg.norm_eps,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = dict(model_type="qwen2", hidden_size=text_dim, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=32, vocab_size=64)
    return InternVLModel(InternVLConfig(vision_config=vision, text_config=text,
                                        downsample_ratio=cfg.pixel_shuffle)).eval()


@pytest.mark.parametrize("size", [28, 56])
def test_internvit_tower_equals_get_image_features(size):
    """Features == what InternVLModel.get_image_features hands its projector (patch grid 2x2 -> 1x1, 4x4 -> 2x2);
    the model's feature_projector (LayerNorm, Linear, GELU, Linear) loaded from the projector reproduces it end to
    end."""
    cfg = _internvit_cfg(size)
    tower = _randomise_(InternViTTower(cfg), seed=size)
    vlm = _randomise_(_internvl(cfg), seed=100 + size)
    vlm.vision_tower.load_state_dict({k.removeprefix("tower."): v for k, v in tower.state_dict().items()},
                                     strict=True)
    seen = []
    vlm.multi_modal_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    pixels = _pixels(cfg, seed=2)
    with torch.no_grad():
        got = tower(pixels)
        projected = vlm.get_image_features(pixel_values=pixels).pooler_output  # (B, N, D)
    assert got.shape == (2, cfg.num_tokens, cfg.feature_dim) == seen[0].shape
    assert (got - seen[0]).abs().max() <= TOL

    F, D = cfg.feature_dim, 24
    projector = nn.Sequential(nn.LayerNorm(F), nn.Linear(F, D), nn.GELU(), nn.Linear(D, D))
    mapping = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
    projector.load_state_dict({f"{mapping[k.split('.')[0]]}.{k.split('.')[1]}": v
                               for k, v in vlm.multi_modal_projector.state_dict().items()}, strict=True)
    with torch.no_grad():
        assert (projector(got) - projected).abs().max() <= TOL


def test_pixel_shuffle_matches_internvl():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)  # (B, h, w, C)
    y = pixel_shuffle(x, 0.5)  # (2, 2, 2, 12)
    # token (i, j) = the 2x2 block's patches in raster order: (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    assert torch.equal(y[1, 1, 0], torch.cat([x[1, 2, 0], x[1, 2, 1], x[1, 3, 0], x[1, 3, 1]]))
    assert torch.equal(y[0, 0, 1], torch.cat([x[0, 0, 2], x[0, 0, 3], x[0, 1, 2], x[0, 1, 3]]))
    for shape in [(2, 4, 4, 3), (1, 4, 6, 8), (3, 8, 2, 5)]:
        x = torch.randn(shape)
        assert torch.equal(pixel_shuffle(x, 0.5), InternVLModel.pixel_shuffle(None, x, 0.5))
    assert torch.equal(pixel_shuffle(x, 1.0), x)
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_shuffle(torch.zeros(1, 3, 4, 2), 0.5)


# --- preprocessing --------------------------------------------------------------------------------------------

def test_preprocess_is_the_towers_own_image_processor():
    siglip = SiglipTower(EncoderConfig(kind="siglip", image_size=32, patch_size=16, width=32, depth=1, heads=2))
    internvit = InternViTTower(_internvit_cfg(28))
    references = [(siglip, SiglipImageProcessor(size={"height": 32, "width": 32})),
                  (internvit, GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=False,
                                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD))]
    images = _images((3, 37, 23, 3), seed=3)  # odd, non-square
    for tower, processor in references:
        want = processor(images=list(images), input_data_format="channels_last", return_tensors="pt")
        got = tower.preprocess(images)
        assert got.shape == want["pixel_values"].shape and got.dtype == torch.float32
        assert torch.equal(got, want["pixel_values"])
        assert torch.equal(tower.preprocess(torch.from_numpy(images)), got)
        assert torch.equal(tower.preprocess([images[0], images[1][:20, :30]])[0], got[0])  # mixed sizes

    # The normalisation itself, on an image already at the tower's size: (x / 255 - mean) / std.
    for tower, mean, std in [(siglip, (0.5,) * 3, (0.5,) * 3), (internvit, IMAGENET_MEAN, IMAGENET_STD)]:
        S = tower.cfg.image_size
        image = _images((1, S, S, 3), seed=4)
        x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
        want = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        assert (tower.preprocess(image) - want).abs().max() <= 1e-5
    assert internvit.preprocess([]).shape == (0, 3, 28, 28)
    with pytest.raises(ValueError, match=r"images\[0\] must be uint8"):
        internvit.preprocess(images.astype(np.float32))


# --- the original InternViT layout ----------------------------------------------------------------------------

def _original_internvit(state: dict, pixels: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """The original remote-code InternViT forward, written out over its own keys: last layer, (B, 1 + P*P, C)."""
    C, H, eps = cfg.width, cfg.heads, cfg.norm_eps
    x = Fn.conv2d(pixels, state["embeddings.patch_embedding.weight"], state["embeddings.patch_embedding.bias"],
                  stride=cfg.patch_size).flatten(2).transpose(1, 2)  # (B, P*P, C)
    x = torch.cat([state["embeddings.class_embedding"].expand(len(x), -1, -1), x], dim=1)
    x = x + state["embeddings.position_embedding"]
    B, T, _ = x.shape
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w
    for i in range(cfg.depth):
        p = lambda name: state.get(f"encoder.layers.{i}.{name}")  # noqa: B023
        h = Fn.layer_norm(x, (C,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = Fn.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, T, 3, C).unbind(2)
        if cfg.qk_norm:
            q, k = rms(q, p("attn.q_norm.weight")), rms(k, p("attn.k_norm.weight"))
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        a = Fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + Fn.linear(a, p("attn.proj.weight"), p("attn.proj.bias")) * p("ls1")
        h = Fn.layer_norm(x, (C,), p("norm2.weight"), p("norm2.bias"), eps)
        h = Fn.linear(Fn.gelu(Fn.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                      p("mlp.fc2.bias"))
        x = x + h * p("ls2")
    return x


@pytest.mark.parametrize("qk_norm", [False, True])
def test_original_layout_round_trip_and_features(qk_norm):
    cfg = _internvit_cfg(56, qk_norm=qk_norm)
    tower = _randomise_(InternViTTower(cfg), seed=5)
    hf = {k.removeprefix("tower."): v for k, v in tower.state_dict().items()}
    original = internvit_to_original(hf)
    assert "encoder.layers.1.attn.qkv.weight" in original and "encoder.layers.1.ls2" in original
    assert ("encoder.layers.0.attn.q_norm.weight" in original) == qk_norm
    back = internvit_from_original(original)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)

    fresh = InternViTTower(cfg).eval()
    fresh.tower.load_state_dict(internvit_from_original(original), strict=True)
    pixels = _pixels(cfg, seed=6)
    with torch.no_grad():
        ref = _original_internvit(original, pixels, cfg)[:, 1:]  # (B, 16, C), CLS dropped
        want = pixel_shuffle(ref.reshape(2, 4, 4, cfg.width), 0.5).reshape(2, 4, cfg.feature_dim)
        assert (fresh(pixels) - want).abs().max() <= TOL
        assert torch.equal(fresh(pixels), tower(pixels))


def test_original_layout_errors_name_the_key():
    hf = {k.removeprefix("tower."): v for k, v in InternViTTower(_internvit_cfg(28)).state_dict().items()}
    original = internvit_to_original(hf)
    for state, convert, key in [(original, internvit_from_original, "encoder.layers.1.ls1"),
                                (original, internvit_from_original, "encoder.layers.0.norm2.bias"),
                                (original, internvit_from_original, "embeddings.class_embedding"),
                                (hf, internvit_to_original, "encoder.layer.1.attention.v_proj.bias")]:
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            convert({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unknown key 'encoder.layers.0.attn.extra'"):
        internvit_from_original({**original, "encoder.layers.0.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown key 'encoder.layer.0.lambda_3'"):
        internvit_to_original({**hf, "encoder.layer.0.lambda_3": torch.zeros(1)})


def test_encoder_config_from_internvit_300m():
    """InternVL3.5's vision_config -> the 300M tower: 0.30B parameters, 16 x 16 tokens of 4096 (reference §1)."""
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  patch_size=14, image_size=448, qkv_bias=True, qk_normalization=False, layer_norm_eps=1e-6,
                  norm_type="layer_norm", hidden_act="gelu", drop_path_rate=0.1, use_flash_attn=True)
    cfg = encoder_config_from_internvit(vision, 0.5)
    assert cfg == EncoderConfig(kind="internvit", image_size=448, patch_size=14, width=1024, depth=24, heads=16,
                                ffn_hidden=4096, pixel_shuffle=0.5, norm_eps=1e-6, qkv_bias=True, qk_norm=False)
    assert (cfg.grid, cfg.feature_dim, cfg.num_tokens) == (16, 4096, 256)
    with torch.device("meta"):
        tower = build_encoder(cfg)
    assert sum(p.numel() for p in tower.parameters()) == 304_012_288
    for field, value, match in [("norm_type", "rms_norm", "norm_type must be 'layer_norm'"),
                                ("hidden_act", "relu", "hidden_act must be 'gelu'"),
                                ("image_size", [448, 224], "image_size must be square")]:
        with pytest.raises(ValueError, match=match):
            encoder_config_from_internvit({**vision, field: value}, 0.5)
    with pytest.raises(ValueError, match="vision_config.qkv_bias is missing"):
        encoder_config_from_internvit({k: v for k, v in vision.items() if k != "qkv_bias"}, 0.5)
    with pytest.raises(ValueError, match="pixel_shuffle"):
        encoder_config_from_internvit(vision, 0.25)
