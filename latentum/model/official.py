"""The official LatentUM checkpoint layout <-> latentum's model (issue #29, item 5).

An official model folder (LatentUM-Base, reference §7) holds one ``model.safetensors`` whose keys sit under
``internvl.`` (the InternVL3.5 chat model with the generation expert's ``*_vision`` parameters, the
``visual_projector`` and the ``ar_head``) or ``quantizer.`` (MBAQ), and a ``config.json`` with nested
``internvl_config`` (``vision_config``, ``llm_config``, ``downsample_ratio``), ``head`` and ``quantizer``.
This module turns that config into a ``ModelConfig`` and that state dict into ours, tensor by tensor, and back.

What the reference fixes and what is read here: the module tree (``vision_model``, ``mlp1``,
``language_model`` with ``q_proj_vision``-style twins, ``visual_projector``, ``ar_head``, ``quantizer``), the
``head`` config field names and every shape. What it does not give, the attribute names inside ``ar_head`` and
``quantizer``, follow the reference's description of those modules; they are written once, in ``HEAD_KEYS`` and
``QUANTIZER_KEYS``, so a file that names them otherwise is one table away. Sizes are read from the tensors
themselves where a config field could disagree (MBAQ's widths and codebooks), so a wrong guess fails loudly
(``official_state_to_ours`` refuses any key it does not place and any tensor it leaves unset).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from transformers import Qwen3Config

from latentum.config import BackboneConfig, HeadConfig, ModelConfig, QuantizerConfig
from latentum.model.hf import HF_LAYER_NAMES, backbone_config_from_hf
from latentum.model.towers import (
    TOWER_PREFIX,
    encoder_config_from_internvit,
    internvit_from_original,
    internvit_to_original,
)

LLM = "internvl.language_model."
VISION = "internvl.vision_model."
GEN_SUFFIX = "_vision"
"""The generation expert's twin of an LLM module: ``self_attn.q_proj`` -> ``self_attn.q_proj_vision``,
``mlp`` -> ``mlp_vision`` (reference §3)."""

HEAD_KEYS = {"embeddings.{g}": "embeds.{g}", "layers.{i}.norm1": "blocks.{i}.norm1", "layers.{i}.attn.qkv":
             "blocks.{i}.qkv", "layers.{i}.attn.q_norm": "blocks.{i}.q_norm", "layers.{i}.attn.k_norm":
             "blocks.{i}.k_norm", "layers.{i}.attn.proj": "blocks.{i}.proj", "layers.{i}.norm2": "blocks.{i}.norm2",
             "layers.{i}.mlp.fc1": "blocks.{i}.mlp.0", "layers.{i}.mlp.fc2": "blocks.{i}.mlp.2",
             "norm": "norm", "head": "out"}
"""``internvl.ar_head.<official>`` -> ``head.<ours>`` (module paths; weights and biases follow)."""

QUANTIZER_KEYS = {"down_proj.0": "down.0", "down_proj.2": "down.2", "up_proj.0": "up.0", "up_proj.2": "up.2"}
CODEBOOK_KEY = "quantizer.codebooks.{g}.weight"
"""Codebook g of MBAQ, (K, d); ours stacks the G tables in ``quantizer.vq._codebook.embed`` (G, K, d)."""
OURS_CODEBOOK = "quantizer.vq._codebook.embed"


def fresh_statistics(codebook: Tensor) -> dict[str, Tensor]:
    """Our running statistics (code usage, the library's dead-code counters), as a new model starts them: they
    are not weights, so an official file does not hold them. ``codebook`` (G, K, d)."""
    G, K, _ = codebook.shape
    return {"quantizer.usage_ema": torch.full((G, K), 1.0 / K), "quantizer.vq._codebook.initted": torch.tensor(True),
            "quantizer.vq._codebook.cluster_size": torch.ones(G, K),
            "quantizer.vq._codebook.embed_avg": codebook.detach().clone().float()}


def _need(meta: Mapping, key: str, where: str):
    if not isinstance(meta, Mapping) or key not in meta:
        raise ValueError(f"{where}: missing {key!r} (an official LatentUM folder has it)")
    return meta[key]


def is_official_config(meta: Mapping) -> bool:
    """Whether a config.json dict is an official LatentUM one (``internvl_config`` + ``mixture_mode``)."""
    return "internvl_config" in meta and "mixture_mode" in meta


def official_model_config(meta: Mapping, state: Mapping[str, Tensor], where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an official folder: the tower and the LLM from ``internvl_config``, the AR head from
    ``head``, MBAQ's sizes from its tensors (``state`` may hold meta tensors: only shapes are read)."""
    if meta.get("mixture_mode") != "mot":
        raise ValueError(f"{where}: mixture_mode must be 'mot' (per-layer twins), got {meta.get('mixture_mode')!r}")
    internvl = _need(meta, "internvl_config", where)
    llm = dict(_need(internvl, "llm_config", f"{where} internvl_config"))
    if llm.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"{where}: internvl_config.llm_config.model_type must be 'qwen3', got {llm['model_type']!r}")
    llm.pop("architectures", None)
    backbone = backbone_config_from_hf(Qwen3Config(**{k: v for k, v in llm.items() if k != "model_type"}))
    backbone.tie_embeddings = LLM + "lm_head.weight" not in state
    for field, want in (("select_layer", -1), ("ps_version", "v2")):
        if internvl.get(field, want) != want:
            raise ValueError(f"{where}: internvl_config.{field} must be {want!r} (LatentUM-Base), "
                             f"got {internvl[field]!r}")
    encoder = encoder_config_from_internvit(_need(internvl, "vision_config", f"{where} internvl_config"),
                                            float(internvl.get("downsample_ratio", 0.5)))
    head = _need(meta, "head", where)
    quantizer = _quantizer_config(state, where)
    for field, want in (("hidden_size", backbone.dim), ("num_codebooks", quantizer.codebooks),
                        ("num_embeddings", quantizer.codebook_size)):
        if field in head and head[field] != want:
            raise ValueError(f"{where}: head.{field} is {head[field]}, the weights give {want}")
    head_cfg = HeadConfig(depth=int(_need(head, "num_layers", f"{where} head")),
                          heads=int(_need(head, "num_heads", f"{where} head")),
                          mlp_ratio=int(head.get("mlp_ratio", 4)), depth_rope=True, final_norm_eps=1e-5)
    if meta.get("num_image_tokens", encoder.num_tokens) != encoder.num_tokens:
        raise ValueError(f"{where}: num_image_tokens is {meta['num_image_tokens']}, the tower gives "
                         f"{encoder.num_tokens}")
    return ModelConfig(encoder=encoder, quantizer=quantizer, backbone=backbone,
                       head=head_cfg, cell_positions=False)


def _quantizer_config(state: Mapping[str, Tensor], where: str) -> QuantizerConfig:
    shape = lambda key: tuple(_need(state, key, "model.safetensors").shape)  # noqa: E731
    G = sum(1 for k in state if k.startswith("quantizer.codebooks.") and k.endswith(".weight"))
    if G == 0:
        raise ValueError(f"model.safetensors: no MBAQ codebooks (expected {CODEBOOK_KEY.format(g=0)!r} ...)")
    K, d = shape(CODEBOOK_KEY.format(g=0))
    return QuantizerConfig(codebooks=G, codebook_size=K, code_dim=d,
                           hidden_dim=shape("quantizer.down_proj.0.weight")[0],
                           up_hidden_dim=shape("quantizer.up_proj.0.weight")[0],
                           projector_hidden_dim=shape("internvl.visual_projector.0.weight")[0],
                           dead_code_threshold=0.03, norm_latents=False)


def _llm_pairs(cfg: BackboneConfig) -> dict[str, str]:
    """Official LLM keys -> ours (both branches)."""
    pairs = {LLM + "model.embed_tokens.weight": "backbone.embedding.weight",
             LLM + "model.norm.weight": "backbone.norm.weight"}
    if not cfg.tie_embeddings:
        pairs[LLM + "lm_head.weight"] = "backbone.lm_head.weight"
    for i in range(cfg.depth):
        src, dst = f"{LLM}model.layers.{i}.", f"backbone.layers.{i}."
        pairs[src + "input_layernorm.weight"] = dst + "input_norm.weight"
        pairs[src + "post_attention_layernorm.weight"] = dst + "post_attn_norm.weight"
        for hf_name, ours in HF_LAYER_NAMES.items():
            if ours.endswith("_norm") and not cfg.qk_norm:
                continue
            module, leaf = hf_name.split(".")  # e.g. self_attn, q_proj
            twins = {0: hf_name, 1: f"{module}.{leaf}{GEN_SUFFIX}" if module == "self_attn"
                     else f"{module}{GEN_SUFFIX}.{leaf}"}
            biased = cfg.attention_bias and ours in ("q_proj", "k_proj", "v_proj")
            for kind in ("weight", "bias") if biased else ("weight",):
                for branch, name in twins.items():
                    pairs[f"{src}{name}.{kind}"] = f"{dst}branches.{branch}.{ours}.{kind}"
    return pairs


def _module_pairs(cfg: ModelConfig) -> dict[str, str]:
    """Official keys -> ours for everything but the vision tower and the codebooks."""
    pairs = _llm_pairs(cfg.backbone)
    for i in (0, 1, 3):
        for kind in ("weight", "bias"):
            pairs[f"internvl.mlp1.{i}.{kind}"] = f"feature_projector.{i}.{kind}"
    for i in (0, 2):
        for kind in ("weight", "bias"):
            pairs[f"internvl.visual_projector.{i}.{kind}"] = f"visual_projector.net.{i}.{kind}"
            for official, ours in QUANTIZER_KEYS.items():
                pairs[f"quantizer.{official}.{kind}"] = f"quantizer.{ours}.{kind}"
    G = cfg.quantizer.codebooks
    for official, ours in HEAD_KEYS.items():
        for i in range(cfg.head.depth) if "{i}" in official else [None]:
            for g in range(G - 1) if "{g}" in official else [None]:
                src, dst = official.format(i=i, g=g), ours.format(i=i, g=g)
                leaves = ("weight",) if "norm" in src or "qkv" in src or "embeddings" in src else ("weight", "bias")
                for kind in leaves:
                    pairs[f"internvl.ar_head.{src}.{kind}"] = f"head.{dst}.{kind}"
    return pairs


def official_state_to_ours(state: Mapping[str, Tensor], cfg: ModelConfig, ours: Mapping[str, Tensor],
                           where: str = "model.safetensors") -> dict[str, Tensor]:
    """An official state dict -> a full state dict for ``LatentUMModel(cfg)``, whose own state ``ours`` gives the
    keys and shapes (meta tensors do). Every official key must be placed and every tensor of ours set, each with
    its shape; else a ValueError naming the key and the expected shape."""
    out: dict[str, Tensor] = {}
    pairs = _module_pairs(cfg)
    for src, dst in pairs.items():
        out[dst] = _need(state, src, where)
    books = [_need(state, CODEBOOK_KEY.format(g=g), where) for g in range(cfg.quantizer.codebooks)]
    for g, book in enumerate(books):
        if book.shape != books[0].shape:
            raise ValueError(f"{where}: {CODEBOOK_KEY.format(g=g)!r} has shape {tuple(book.shape)}, codebook 0 "
                             f"has {tuple(books[0].shape)}; every codebook must have the same")
    out[OURS_CODEBOOK] = torch.stack(books)
    vision = {k[len(VISION):]: v for k, v in state.items() if k.startswith(VISION)}
    out.update({TOWER_PREFIX + k: v for k, v in internvit_from_original(vision).items()})
    out.update(fresh_statistics(out[OURS_CODEBOOK]))
    if cfg.backbone.tie_embeddings:
        out["backbone.lm_head.weight"] = out["backbone.embedding.weight"]
    placed = set(pairs) | {k for k in state if k.startswith(VISION)} | \
        {CODEBOOK_KEY.format(g=g) for g in range(cfg.quantizer.codebooks)}
    unexpected = sorted(set(state) - placed)
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) has no place in "
                         "the model of config.json")
    for key, want in ours.items():
        if key not in out:
            raise ValueError(f"{where}: no tensor for {key!r} of shape {tuple(want.shape)}")
        if tuple(out[key].shape) != tuple(want.shape):
            raise ValueError(f"{where}: {_source(key, pairs)!r} has shape {tuple(out[key].shape)}, the model of "
                             f"config.json expects {tuple(want.shape)}")
    return out


def ours_to_official_state(ours: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The inverse of ``official_state_to_ours`` (statistics dropped): writes a model in the official layout."""
    if cfg.quantizer.grown_codebooks:
        raise ValueError("the official layout has no place for grown codebooks (quantizer.grown_codebooks = "
                         f"{cfg.quantizer.grown_codebooks}): their head would be lost")
    out = {src: ours[dst] for src, dst in _module_pairs(cfg).items()}
    for g in range(cfg.quantizer.codebooks):
        out[CODEBOOK_KEY.format(g=g)] = ours[OURS_CODEBOOK][g]
    tower = {k[len(TOWER_PREFIX):]: v for k, v in ours.items() if k.startswith(TOWER_PREFIX)}
    out.update({VISION + k: v for k, v in internvit_to_original(tower).items()})
    return {k: v.contiguous() for k, v in out.items()}


def _source(key: str, pairs: Mapping[str, str]) -> str:
    return next((src for src, dst in pairs.items() if dst == key), key)
