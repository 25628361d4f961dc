"""Models from pretrained ``transformers`` weights (issue #29): a MoME backbone from a causal LM (Qwen2, Qwen3,
Llama), and a whole latentum model from an InternVL VLM (``model_from_hf_vlm``).

LatentUM's initialisation: the understanding branch takes the LM's weights unchanged and the generation branch
starts as their copy; the embedding, the norms, RoPE and the head are shared. Every option the LM needs (q/k/v
biases, per-head q/k norms, a tied head, grouped-query attention, an explicit head width, RoPE theta and
scaling, RMSNorm eps) is read from its config, never assumed. With every token on the understanding branch the
backbone computes what the LM computes (tests/test_hf.py: logits within 1e-4 in fp32, with and without the KV
cache, left-padded batches).
"""

from __future__ import annotations

from torch import nn

from latentum.config import BackboneConfig, EncoderConfig, HeadConfig, ModelConfig, QuantizerConfig
from latentum.model.backbone import MoMEBackbone
from latentum.model.latentum import LatentUMModel
from latentum.model.towers import TOWER_PREFIX, encoder_config_from_internvit

FAMILIES = ("qwen2", "qwen3", "llama")
"""``model_type``s of the language models this maps."""


def backbone_config_from_hf(hf_config) -> BackboneConfig:
    """A ``transformers`` LM config -> the BackboneConfig of the same network."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"hf_config: model_type must be one of {FAMILIES}, got {kind!r}")
    c = hf_config
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = float(rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") == "default":
        rope = {}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return BackboneConfig(
        vocab_size=c.vocab_size, dim=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads or c.num_attention_heads, ffn_hidden=c.intermediate_size,
        rope_theta=theta, norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings,
        head_size=head_dim if head_dim != c.hidden_size // c.num_attention_heads else 0,
        attention_bias=bool(getattr(c, "attention_bias", kind == "qwen2")), qk_norm=kind == "qwen3",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), rope_scaling=rope or None)


HF_LAYER_NAMES = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                  "self_attn.o_proj": "o_proj", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
                  "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up", "mlp.down_proj": "ffn.down"}
"""A decoder layer's modules in ``transformers`` -> in a backbone branch."""


def hf_state_to_backbone(state: dict, cfg: BackboneConfig) -> dict:
    """An HF causal LM's state dict -> the backbone's, both branches holding the LM's layer weights."""
    out = {"embedding.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
           "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"])}
    for i in range(cfg.depth):
        src = f"model.layers.{i}."
        out[f"layers.{i}.input_norm.weight"] = state[src + "input_layernorm.weight"]
        out[f"layers.{i}.post_attn_norm.weight"] = state[src + "post_attention_layernorm.weight"]
        for hf_name, ours in HF_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{src}{hf_name}.{kind}"
                if key in state:
                    for branch in (0, 1):  # und takes the LM; gen starts as its copy (LatentUM §3)
                        out[f"layers.{i}.branches.{branch}.{ours}.{kind}"] = state[key]
    return out


def backbone_from_hf(hf_model: nn.Module) -> MoMEBackbone:
    """A MoME backbone holding a ``transformers`` causal LM (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
    ``LlamaForCausalLM``): the LM in the understanding branch, its copy in the generation branch."""
    cfg = backbone_config_from_hf(hf_model.config)
    backbone = MoMEBackbone(cfg)
    state = hf_state_to_backbone(hf_model.state_dict(), cfg)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]:
        raise ValueError(f"hf_model: its weights do not fit the backbone of its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return backbone.to(next(hf_model.parameters()).dtype)


def encoder_config_from_hf_internvl(config) -> EncoderConfig:
    """A ``transformers`` ``InternVLConfig`` -> the EncoderConfig of its tower (InternViT with pixel shuffle)."""
    if config.vision_feature_layer != -1 or config.vision_feature_select_strategy != "default":
        raise ValueError(f"hf_vlm.config: vision_feature_layer must be -1 and vision_feature_select_strategy "
                         f"'default' (InternVL3.5 takes the last layer's patches), got "
                         f"{config.vision_feature_layer!r}, {config.vision_feature_select_strategy!r}")
    if config.projector_hidden_act != "gelu":
        raise ValueError(f"hf_vlm.config.projector_hidden_act must be 'gelu', got {config.projector_hidden_act!r}")
    v = config.vision_config.to_dict()
    original = {**v, "qkv_bias": v["attention_bias"], "qk_normalization": v["use_qk_norm"]}
    return encoder_config_from_internvit(original, config.downsample_ratio)


def model_from_hf_vlm(hf_vlm: nn.Module, quantizer: QuantizerConfig, head: HeadConfig) -> LatentUMModel:
    """A latentum model around a pretrained ``transformers`` ``InternVLForConditionalGeneration``: its InternViT
    tower, its projector (``mlp1``) and its LM (Qwen2, Qwen3 or Llama; the generation branch a copy) unchanged,
    with a new MBAQ (``quantizer``), AR head (``head``) and visual projector, LatentUM's stage-0 state. Stage 1
    (``mbaq``) then trains the quantizer against this frozen VLM exactly as for the tiny model."""
    if type(hf_vlm).__name__ != "InternVLForConditionalGeneration":
        raise ValueError(f"hf_vlm must be a transformers InternVLForConditionalGeneration, got {type(hf_vlm).__name__}")
    c = hf_vlm.config
    cfg = ModelConfig(encoder=encoder_config_from_hf_internvl(c), quantizer=quantizer,
                      backbone=backbone_config_from_hf(c.text_config), head=head, cell_positions=False)
    model = LatentUMModel(cfg)
    state = hf_vlm.state_dict()
    lm = {("model." + k[len("model.language_model."):]): v for k, v in state.items()
          if k.startswith("model.language_model.")}
    if "lm_head.weight" in state:  # absent when tied to the embedding
        lm["lm_head.weight"] = state["lm_head.weight"]
    ours = {f"backbone.{k}": v for k, v in hf_state_to_backbone(lm, cfg.backbone).items()}
    ours.update({TOWER_PREFIX + k[len("model.vision_tower."):]: v for k, v in state.items()
                 if k.startswith("model.vision_tower.")})
    for hf_name, i in (("layer_norm", 0), ("linear_1", 1), ("linear_2", 3)):
        for kind in ("weight", "bias"):
            ours[f"feature_projector.{i}.{kind}"] = state[f"model.multi_modal_projector.{hf_name}.{kind}"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    fresh = ("quantizer.", "head.", "visual_projector.")
    tied = "backbone.lm_head.weight" if cfg.backbone.tie_embeddings else None
    left = [k for k in missing if not k.startswith(fresh) and k != tied]
    if unexpected or left:
        raise ValueError(f"hf_vlm: its weights do not fit the model of its config (missing {left[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(next(hf_vlm.parameters()).dtype)
