"""The official LatentUM checkpoint layout loads (issue #29, item 5), tested on a tiny look-alike written here to
the layout of reference §1-§3 and §7, key by key: ``internvl.vision_model.*`` (original InternViT names),
``internvl.mlp1.*``, ``internvl.language_model.*`` with the generation expert's ``*_vision`` twins,
``internvl.visual_projector.*``, ``internvl.ar_head.*``, ``quantizer.*``; a config.json with ``internvl_config``
(``vision_config``, ``llm_config``, ``downsample_ratio``), ``head`` and ``mixture_mode``; the InternVL tokenizer
with ``<img>``, ``</img>`` and ``<IMG_CONTEXT>``. The LLM and the tower come from the real ``transformers``
classes, so where a tensor lands is checked by computing with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    InternVLVisionConfig,
    InternVLVisionModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from latentum.api import LatentUM
from latentum.checkpoint import load_decoder_folder, load_official_folder
from latentum.cli import main
from latentum.model.towers import internvit_to_original

WORDS = ["a", "red", "circle", "left", "of", "blue", "square", "photo", "two", "what", "is", "this", "?", "."]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
D, LAYERS, G, K, CODE, TOWER = 64, 2, 2, 16, 8, 32
VISION = dict(hidden_size=TOWER, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=14,
              image_size=56, qkv_bias=True, qk_normalization=False, layer_norm_eps=1e-6, norm_type="layer_norm",
              drop_path_rate=0.0, use_flash_attn=False)
F = TOWER * 4  # pixel shuffle 0.5: 4 x 4 patches -> 2 x 2 tokens of 4 * TOWER


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random norms, biases and layer scales, so a tensor that lands in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "lambda" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0 if name.endswith(".bias") else 1))
    return module


def _linear(state: dict, key: str, d_out: int, d_in: int, g: torch.Generator, bias: bool = True) -> None:
    state[key + ".weight"] = torch.randn(d_out, d_in, generator=g) * 0.1
    if bias:
        state[key + ".bias"] = torch.randn(d_out, generator=g) * 0.1


def _official_state(llm: Qwen3ForCausalLM, gen_llm: Qwen3ForCausalLM, tower: InternVLVisionModel) -> dict:
    """The look-alike's tensors, named as the reference names them."""
    g = torch.Generator().manual_seed(3)
    state = {f"internvl.language_model.{k}": v for k, v in llm.state_dict().items()}
    for k, v in gen_llm.state_dict().items():  # the generation expert's twins of each layer
        if ".layers." in k and "layernorm" not in k:
            k = k.replace("self_attn.q_proj", "self_attn.q_proj_vision").replace("self_attn.k_proj",
                                                                                "self_attn.k_proj_vision")
            k = k.replace("self_attn.v_proj", "self_attn.v_proj_vision").replace("self_attn.o_proj",
                                                                                "self_attn.o_proj_vision")
            k = k.replace("self_attn.q_norm", "self_attn.q_norm_vision").replace("self_attn.k_norm",
                                                                                "self_attn.k_norm_vision")
            k = k.replace(".mlp.", ".mlp_vision.")
            state[f"internvl.language_model.{k}"] = v
    state.update({f"internvl.vision_model.{k}": v for k, v in internvit_to_original(tower.state_dict()).items()})
    state["internvl.mlp1.0.weight"], state["internvl.mlp1.0.bias"] = torch.rand(F, generator=g) + 0.5, \
        torch.randn(F, generator=g) * 0.1
    _linear(state, "internvl.mlp1.1", D, F, g)
    _linear(state, "internvl.mlp1.3", D, D, g)
    _linear(state, "internvl.visual_projector.0", D, G * CODE, g)
    _linear(state, "internvl.visual_projector.2", D, D, g)
    _linear(state, "quantizer.down_proj.0", 96, F, g)
    _linear(state, "quantizer.down_proj.2", G * CODE, 96, g)
    _linear(state, "quantizer.up_proj.0", 80, G * CODE, g)
    _linear(state, "quantizer.up_proj.2", D, 80, g)
    for c in range(G):
        state[f"quantizer.codebooks.{c}.weight"] = torch.randn(K, CODE, generator=g)
    for c in range(G - 1):
        state[f"internvl.ar_head.embeddings.{c}.weight"] = torch.randn(K, D, generator=g) * 0.1
    for i in range(2):
        p = f"internvl.ar_head.layers.{i}."
        for norm, width in (("norm1", D), ("norm2", D), ("attn.q_norm", D // 4), ("attn.k_norm", D // 4)):
            state[f"{p}{norm}.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
        _linear(state, p + "attn.qkv", 3 * D, D, g, bias=False)
        _linear(state, p + "attn.proj", D, D, g)
        _linear(state, p + "mlp.fc1", 4 * D, D, g)
        _linear(state, p + "mlp.fc2", D, 4 * D, g)
    state["internvl.ar_head.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    _linear(state, "internvl.ar_head.head", K, D, g)
    return {k: v.contiguous() for k, v in state.items()}


def _qwen3(seed: int) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=32, hidden_size=D, intermediate_size=96, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                      max_position_embeddings=512, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _random_(Qwen3ForCausalLM(cfg), seed).eval()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder, und LM, gen-twin LM, tower, state) of a tiny official-layout LatentUM folder."""
    folder = tmp_path_factory.mktemp("latentum-base-tiny")
    llm, gen_llm = _qwen3(0), _qwen3(1)
    vcfg = InternVLVisionConfig(hidden_size=TOWER, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                patch_size=[14, 14], image_size=[56, 56], attention_bias=True, use_qk_norm=False,
                                layer_norm_eps=1e-6)
    torch.manual_seed(2)
    tower = _random_(InternVLVisionModel(vcfg), 2).eval()
    state = _official_state(llm, gen_llm, tower)
    save_file(state, str(folder / "model.safetensors"))
    config = {"base_model_name_or_path": "OpenGVLab/InternVL3_5-4B", "llm_hidden_size": D, "mixture_mode": "mot",
              "embedding_dim": G * CODE, "image_size": 56, "num_image_tokens": 4, "max_num_patches": 12,
              "image_token": "<image>",
              "internvl_config": {"vision_config": VISION, "llm_config": {"model_type": "qwen3", **{
                  k: v for k, v in llm.config.to_dict().items() if k != "model_type"}}, "downsample_ratio": 0.5,
                  "select_layer": -1, "ps_version": "v2", "template": "internvl2_5"},
              "head": {"num_codebooks": G, "num_layers": 2, "hidden_size": D, "num_embeddings": K, "num_heads": 4,
                       "mlp_ratio": 4},
              "quantizer": {"type": "MLP", "vq_type": "multi_vq", "num_codebooks": G, "codebook_size": K}}
    (folder / "config.json").write_text(json.dumps(config))
    _tokenizer().save_pretrained(folder)
    return folder, llm, gen_llm, tower, state


def test_every_tensor_lands_where_it_belongs(official):
    folder, llm, gen_llm, tower, state = official
    api = LatentUM.from_pretrained(folder)
    m = api.model
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())
    bb = m.backbone.layers[1]
    llm_layer, gen_layer = llm.model.layers[1], gen_llm.model.layers[1]
    assert torch.equal(bb.branches[0].q_proj.weight, llm_layer.self_attn.q_proj.weight)
    assert torch.equal(bb.branches[1].q_proj.weight, gen_layer.self_attn.q_proj.weight)
    assert torch.equal(bb.branches[1].k_norm.weight, gen_layer.self_attn.k_norm.weight)
    assert torch.equal(bb.branches[1].ffn.down.weight, gen_layer.mlp.down_proj.weight)
    assert torch.equal(bb.input_norm.weight, llm_layer.input_layernorm.weight)  # shared norms: the und LM's
    assert torch.equal(m.backbone.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(m.feature_projector[3].bias, state["internvl.mlp1.3.bias"])
    assert torch.equal(m.visual_projector.net[2].weight, state["internvl.visual_projector.2.weight"])
    assert torch.equal(m.quantizer.codes_from_ids(torch.tensor([[[3, 5]]]))[0, 0, CODE:],
                       state["quantizer.codebooks.1.weight"][5])
    assert torch.equal(m.head.blocks[1].mlp[2].bias, state["internvl.ar_head.layers.1.mlp.fc2.bias"])
    assert m.cfg.encoder.kind == "internvit" and m.cfg.encoder.grid == 2 and m.cfg.encoder.feature_dim == F
    assert not m.cfg.cell_positions and m.cfg.head.depth_rope


@torch.no_grad()
def test_each_branch_computes_what_its_language_model_computes(official):
    """All tokens on the und branch: the und LM's logits. All on the gen branch: the logits of an LM holding the
    ``*_vision`` twins with the shared norms, embedding and head (LatentUM §3)."""
    folder, llm, gen_llm, _, _ = official
    m = LatentUM.from_pretrained(folder).model.backbone
    ids = torch.randint(6, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7)[None].expand(2, -1)
    shared = {k: v for k, v in llm.state_dict().items() if "layernorm" in k or "embed" in k or "lm_head" in k
              or k == "model.norm.weight"}
    gen_llm = _qwen3(1)
    gen_llm.load_state_dict({**gen_llm.state_dict(), **shared})
    for gen, ref in ((False, llm), (True, gen_llm)):
        out = m(m.embed(ids), torch.full((2, 7), gen), pos)
        assert (m.logits(out.hidden) - ref(input_ids=ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_the_tower_sees_what_the_internvit_sees(official):
    folder, _, _, tower, _ = official
    m = LatentUM.from_pretrained(folder).model
    pixels = torch.randn(2, 3, 56, 56)
    got = m.encoder(pixels)  # (2, 4, F)
    ref = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (2, 16, TOWER), CLS dropped
    grid = ref.reshape(2, 4, 4, TOWER)
    shuffled = grid.reshape(2, 4, 2, 2 * TOWER).permute(0, 2, 1, 3).reshape(2, 2, 2, 4 * TOWER).permute(0, 2, 1, 3)
    assert (got - shuffled.reshape(2, 4, F)).abs().max() <= 1e-4


def test_it_generates_and_answers(official):
    folder = official[0]
    api = LatentUM.from_pretrained(folder)
    assert api.tokenizer.image_id == api.tokenizer.token_to_id("<IMG_CONTEXT>")
    prompts = ["a photo of a red circle", "two blue square"]
    latents, again = api.generate_images(prompts, seed=0), api.generate_images(prompts, seed=0)
    assert [x.ids.shape for x in latents] == [(4, G)] * 2
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(latents, again))
    image = torch.randint(0, 256, (40, 70, 3), dtype=torch.uint8).numpy()
    assert isinstance(api.answer(image, "what is this ?", seed=0), str)


def test_it_loads_in_another_dtype(official):
    api = LatentUM.from_pretrained(official[0], dtype=torch.bfloat16)
    assert {p.dtype for p in api.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        LatentUM.from_pretrained(official[0], dtype="bf16")


def test_convert_writes_a_latentum_folder_with_the_same_weights(official, tmp_path, capsys):
    folder = official[0]
    assert main(["convert", str(folder), str(tmp_path / "ours")]) == 0
    a, b = load_official_folder(folder)[0], LatentUM.from_pretrained(tmp_path / "ours").model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["origin"]["converted_from"] == str(folder)


def _broken(folder, tmp_path, change) -> str:
    from safetensors.torch import load_file

    (tmp_path / "b").mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "b" / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        LatentUM.from_pretrained(tmp_path / "b")
    return str(e.value)


def test_a_missing_key_is_named(official, tmp_path):
    key = "internvl.language_model.model.layers.1.mlp_vision.up_proj.weight"
    assert key in _broken(official[0], tmp_path, lambda s: s.pop(key))


def test_an_unexpected_key_is_named(official, tmp_path):
    msg = _broken(official[0], tmp_path, lambda s: s.update({"internvl.extra.weight": torch.zeros(1)}))
    assert "internvl.extra.weight" in msg and "unexpected" in msg


def test_a_shape_mismatch_names_the_key_and_the_expected_shape(official, tmp_path):
    key = "internvl.visual_projector.2.bias"
    msg = _broken(official[0], tmp_path, lambda s: s.update({key: torch.zeros(D + 1)}))
    assert key in msg and f"({D},)" in msg


def test_a_tokenizer_without_the_image_tokens_is_refused(official, tmp_path):
    folder = official[0]
    (tmp_path / "b").mkdir()
    for f in folder.iterdir():
        (tmp_path / "b" / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] != "<IMG_CONTEXT>"]
    config["model"]["vocab"].pop("<IMG_CONTEXT>")
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        LatentUM.from_pretrained(tmp_path / "b")


def test_the_official_pixel_decoder_folder_names_the_weights_it_needs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sd3_5_path": "/models/sd3.5-medium", "context_dim": 256,
                                                      "image_size": 448, "ref_mode": "none"}))
    with pytest.raises(ValueError, match="SD3.5-Medium.*sd3_5_path='/models/sd3.5-medium'"):
        load_decoder_folder(tmp_path)
