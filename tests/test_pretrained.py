"""A latentum model from a pretrained ``transformers`` InternVL (issue #29, items 2-4), end to end on a tiny random
one: ``latentum convert`` reads the local folder, the model sees images and text exactly as the VLM does, and the
``mbaq`` stage trains the quantizer against that frozen VLM through the same code path as the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config

from latentum.api import LatentUM
from latentum.cli import main
from latentum.train.config import parse_recipe
from latentum.train.run import train_leg

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, as with Qwen's) with the InternVL specials and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["how many holes are there", "the red circle is left of the blue square"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(folder, transformers model) of a tiny random InternVL: 112 px, patch 14, pixel shuffle -> 4 x 4 tokens."""
    folder = tmp_path_factory.mktemp("internvl-tiny")
    tok = _tokenizer()
    text = Qwen2Config(vocab_size=len(tok) + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=[112, 112], patch_size=[14, 14], attention_bias=True, use_qk_norm=False)
    cfg = InternVLConfig(vision_config=vision, text_config=text.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    torch.manual_seed(0)
    hf = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms, biases and layer scales, so a missed mapping shows
        for name, p in hf.named_parameters():
            if "norm" in name or "lambda" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (0 if name.endswith(".bias") else 1))
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def converted(vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "model"
    assert main(["convert", str(vlm[0]), str(out), "--quantizer", "codebooks=2", "codebook_size=16", "code_dim=8",
                 "hidden_dim=64", "up_hidden_dim=0", "projector_hidden_dim=0", "--head", "depth=1", "heads=2"]) == 0
    return out


@torch.no_grad()
def test_the_model_sees_what_the_vlm_sees(vlm, converted):
    folder, hf = vlm
    api = LatentUM.from_pretrained(converted)
    m = api.model
    assert m.cfg.encoder.kind == "internvit" and m.cfg.encoder.grid == 4 and not m.cfg.cell_positions
    images = np.random.default_rng(0).integers(0, 256, (2, 90, 130, 3), dtype=np.uint8)  # any size: resized
    pixels = m.encoder.preprocess(images)
    want = hf.model.get_image_features(pixel_values=pixels)
    want = getattr(want, "pooler_output", want)
    want = torch.stack(list(want)) if isinstance(want, (list, tuple)) else want
    got = m.feature_projector(m.encoder(pixels))  # (2, 16, D): what input_embeddings fills image slots with
    assert (got - want.reshape(got.shape)).abs().max() <= 1e-4
    ids = torch.tensor([api.tokenizer.encode("how many holes are there")])
    out = m.backbone(m.backbone.embed(ids), torch.zeros_like(ids, dtype=torch.bool), torch.arange(ids.size(1))[None])
    assert (m.backbone.logits(out.hidden) - hf(input_ids=ids).logits).abs().max() <= 1e-4


def test_stage_one_trains_the_quantizer_against_the_frozen_vlm(converted, tmp_path):
    recipe = parse_recipe({"name": "internvl-mbaq", "legs": [{
        "name": "mbaq", "stage": "mbaq", "init_from": str(converted), "steps": 2, "batch_size": 2, "log_every": 1,
        "precision": "32-true", "worlds": {"frozenlake": {"map_sizes": [3, 4]}},
        "tasks": {"vsp_hole": 1, "shapes_qa": 1}}]})
    export = train_leg(recipe, "mbaq", tmp_path, progress=False)
    before, after = LatentUM.from_pretrained(converted).model, LatentUM.from_pretrained(export).model
    sb, sa = before.state_dict(), after.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], sa[k])}
    assert any(k.startswith("quantizer.down.") for k in changed) and any(k.startswith("quantizer.up.") for k in changed)
    assert all(k.startswith("quantizer.") for k in changed)  # the VLM (tower, projector, LM) stays frozen
    losses = (tmp_path / "mbaq" / "logs").rglob("metrics.csv")
    assert any("kl" in f.read_text().splitlines()[0] for f in losses)
    assert json.loads((export / "config.json").read_text())["model"]["encoder"]["kind"] == "internvit"


def test_a_folder_of_another_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
