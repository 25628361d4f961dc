"""A MoME backbone built from a ``transformers`` LM computes what the LM computes (issue #29, item 1): with
every token on the understanding branch the logits equal the ``transformers`` forward of the same weights
(fp32, max abs diff <= 1e-4) for Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, an explicit head width, a
tied head) and Llama (a llama3-scaled RoPE), at batch 2 with left padding, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from latentum.model.hf import backbone_config_from_hf, backbone_from_hf

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZES, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SIZES, head_dim=32, tie_word_embeddings=True)),
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}
B, T, PAD = 2, 9, 3  # row 1 is left-padded by PAD tokens


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    cls, config = FAMILIES[request.param]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():  # random norms and biases, so a missed mapping shows
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")) or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (0 if name.endswith(".bias") else 1))
    return request.param, hf, backbone_from_hf(hf).eval()


def inputs():
    ids = torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def reference(hf, ids, mask, positions) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)


def test_the_config_carries_each_familys_options(pair):
    family, hf, backbone = pair
    cfg = backbone_config_from_hf(hf.config)
    assert cfg.attention_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.tie_embeddings == (family == "qwen3") and (cfg.head_dim == 32) == (family == "qwen3")
    assert (cfg.rope_scaling or {}).get("rope_type") == ("llama3" if family == "llama" else None)
    assert cfg.kv_heads == 2 and cfg.vocab_size == 97
    gen, und = list(backbone.branch_parameters("gen")), list(backbone.branch_parameters("und"))
    assert all(torch.equal(a, b) for a, b in zip(gen, und))  # the gen branch starts as the LM's copy


@torch.no_grad()
def test_und_logits_equal_the_transformers_forward(pair):
    _, hf, backbone = pair
    ids, mask, positions = inputs()
    want = reference(hf, ids, mask, positions)
    out = backbone(backbone.embed(ids), torch.zeros(B, T, dtype=torch.bool), positions, key_valid=mask.bool())
    got = backbone.logits(out.hidden)
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-4


@torch.no_grad()
def test_cached_decoding_equals_the_transformers_forward(pair):
    """Prefill 5 tokens into the KV cache, then one token per step: every step's logits equal the reference."""
    _, hf, backbone = pair
    ids, mask, positions = inputs()
    want = reference(hf, ids, mask, positions)
    cache = backbone.new_cache(B, T)
    prefix = 5
    gen = torch.zeros(B, T, dtype=torch.bool)
    out = backbone(backbone.embed(ids[:, :prefix]), gen[:, :prefix], positions[:, :prefix], cache=cache,
                   key_valid=mask[:, :prefix].bool())
    steps = [backbone.logits(out.hidden)]
    for t in range(prefix, T):
        out = backbone(backbone.embed(ids[:, t:t + 1]), gen[:, t:t + 1], positions[:, t:t + 1], cache=cache,
                       key_valid=mask[:, t:t + 1].bool())
        steps.append(backbone.logits(out.hidden))
    got = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-4


def test_another_model_type_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type must be one of"):
        backbone_config_from_hf(GPT2Config())


def test_a_4b_model_of_latentums_shapes_builds_on_the_meta_device():
    """LatentUM-Base's shapes (reference §1-§4: InternViT-300M with pixel shuffle and mlp1, Qwen3-4B with an untied
    head, the generation branch, an 8 x 2048 MBAQ with 256-dim codes (16384-wide down, 10240-wide up), a 3-layer
    AR head with depth RoPE, a 2560-wide visual projector) built on the meta device, no memory. Each part comes
    out at the reference's figure and the whole within 1% of its ~8.7B (docs/pretrained.md has the sums)."""
    from latentum.config import EncoderConfig, HeadConfig, ModelConfig, QuantizerConfig
    from latentum.model.latentum import LatentUMModel

    qwen3_4b = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                           max_position_embeddings=40960, tie_word_embeddings=False)
    cfg = ModelConfig(encoder=EncoderConfig(kind="internvit", image_size=448, patch_size=14, width=1024, depth=24,
                                            heads=16, ffn_hidden=4096, pixel_shuffle=0.5),
                      quantizer=QuantizerConfig(codebooks=8, codebook_size=2048, code_dim=32, hidden_dim=16384,
                                                up_hidden_dim=10240, projector_hidden_dim=2560),
                      backbone=backbone_config_from_hf(qwen3_4b),
                      head=HeadConfig(depth=3, heads=32, depth_rope=True, final_norm_eps=1e-5), cell_positions=False)
    with torch.device("meta"):
        model = LatentUMModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    gen = count(model.backbone.branch_parameters("gen"))
    assert abs(gen / 36 - 101e6) / 101e6 < 0.01 and abs(gen - 3.6e9) / 3.6e9 < 0.02
    assert abs(count(model.head.parameters()) - 0.28e9) / 0.28e9 < 0.02
    assert abs(count(model.visual_projector.parameters()) - 7e6) / 7e6 < 0.05
    assert abs(count(model.quantizer.parameters()) - 0.1e9) / 0.1e9 < 0.02
    assert abs(count(model.encoder.parameters()) - 0.30e9) / 0.30e9 < 0.02  # InternViT-300M's size
    vlm = count(model.encoder.parameters()) + count(model.feature_projector.parameters()) + \
        count(model.backbone.parameters()) - gen
    assert abs(vlm - 4.7e9) / 4.7e9 < 0.01  # InternVL3.5-4B
    total = count(model.parameters())
    assert abs(total - 8.7e9) / 8.7e9 < 0.01, total
