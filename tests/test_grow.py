"""A model grown by a codebook (``model.grow``): old ids, and what an image whose new ids are 0 becomes downstream,
stay as they were; the grown model saves and loads like any other."""

import dataclasses

import numpy as np
import pytest
import torch

from latentum.checkpoint import load_model_folder, save_model_folder
from latentum.model.grow import grow_codebooks


@pytest.fixture
def pair(untrained_model):
    model, tok = load_model_folder(untrained_model)
    with torch.no_grad():  # codebooks far apart, as trained ones are, so the code search is not a coin toss
        model.quantizer.vq._codebook.embed.normal_(generator=torch.Generator().manual_seed(0))
    grown = grow_codebooks(model, 1).eval()
    return model, grown, tok


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def test_growing_adds_a_codebook_and_keeps_every_old_id(pair):
    model, grown, _ = pair
    q0, q = model.cfg.quantizer, grown.cfg.quantizer
    assert (q.codebooks, q.grown_codebooks, q.base_codebooks) == (q0.codebooks + 1, 1, q0.codebooks)
    assert model.cfg.quantizer.grown_codebooks == 0  # the model grown from is untouched
    old, new = model.image_ids(_images()), grown.image_ids(_images())
    assert new.shape == (*old.shape[:2], old.shape[2] + 1)
    assert torch.equal(new[..., :-1], old)
    assert torch.count_nonzero(grown.quantizer.vq.codebook[-1, 0]) == 0  # code 0 of the new codebook: zero


def test_an_image_whose_new_ids_are_zero_reads_and_projects_as_before(pair):
    model, grown, _ = pair
    ids = model.image_ids(_images())  # (I, N, G0)
    padded = torch.cat([ids, torch.zeros_like(ids[..., :1])], -1)
    D0 = model.cfg.quantizer.dim
    for key in ("quantizer.up.0.weight", "visual_projector.net.0.weight"):  # they start at zero
        assert torch.count_nonzero(grown.state_dict()[key][:, D0:]) == 0
    with torch.no_grad():  # as if trained: the new columns read the new chunk
        for linear in (grown.quantizer.up[0], grown.visual_projector.net[0]):
            linear.weight[:, D0:] = torch.randn_like(linear.weight[:, D0:])
        torch.testing.assert_close(grown.latent_embeddings(padded), model.latent_embeddings(ids), rtol=0, atol=1e-6)
        old = model.quantizer.project(model.quantizer.codes_from_ids(ids))
        torch.testing.assert_close(grown.quantizer.project(grown.quantizer.codes_from_ids(padded)), old,
                                   rtol=0, atol=1e-6)
        other = padded.clone()
        other[..., -1] = 1  # any other new code does change the reading
        assert not torch.allclose(grown.latent_embeddings(other), model.latent_embeddings(ids))


def test_the_depth_head_keeps_its_old_depths(pair):
    model, grown, _ = pair
    h = torch.randn(5, model.cfg.backbone.dim, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, model.cfg.quantizer.codebook_size, (5, model.cfg.quantizer.codebooks + 1))
    with torch.no_grad():
        old, new = model.head(h, ids[:, :-1]), grown.head(h, ids)
    assert new.shape[1] == old.shape[1] + 1
    torch.testing.assert_close(new[:, :-1], old, rtol=0, atol=1e-6)


def test_a_grown_model_saves_and_loads_bit_identical(pair, tmp_path):
    _, grown, tok = pair
    loaded = load_model_folder(save_model_folder(grown, tok, tmp_path / "grown"))[0]
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(grown.cfg)
    a, b = grown.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.image_ids(_images()), grown.image_ids(_images()))


def test_grown_codebooks_must_leave_one_old_and_growing_needs_one_new():
    from latentum.config import QuantizerConfig

    with pytest.raises(ValueError, match="grown_codebooks"):
        QuantizerConfig(codebooks=2, grown_codebooks=2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        grow_codebooks(None, 0)


def test_a_model_grows_once(pair):
    with pytest.raises(ValueError, match="already grew 1 codebook"):
        grow_codebooks(pair[1], 1)


def test_a_decoder_grows_to_a_longer_code_vector_with_its_weights_and_new_inputs_silent(tmp_path):
    from latentum.checkpoint import save_decoder_folder
    from latentum.config import DecoderConfig, QuantizerConfig
    from latentum.model.decoder import PixelDecoder
    from latentum.train.systems import _trained_decoder

    cfg = DecoderConfig(resolution=16, channels=[8, 16], layers_per_block=1, cond_channels=4, summary=8)
    torch.manual_seed(0)
    old = PixelDecoder(cfg, code_dim=8, grid=4)
    q = QuantizerConfig(codebooks=3, code_dim=4, grown_codebooks=1)
    grown = _trained_decoder(str(save_decoder_folder(old, tmp_path / "dec")), cfg, q, grid=4)
    a, b = old.state_dict(), grown.state_dict()
    assert grown.code_dim == 12 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith(("cond.", "summary.")))  # the UNet as trained
    for key in ("cond.1.weight", "summary.1.weight"):
        assert torch.equal(b[key][:, :8], a[key]) and torch.count_nonzero(b[key][:, 8:]) == 0
    unrelated = QuantizerConfig(codebooks=3, code_dim=4), QuantizerConfig(codebooks=4, code_dim=4, grown_codebooks=1)
    for other in unrelated:
        with pytest.raises(ValueError, match="differs from the recipe's decoder"):  # not grown from the decoder's
            _trained_decoder(str(tmp_path / "dec"), cfg, other, grid=4)


def test_the_shipped_planner_grown_by_a_codebook_plans_as_before():
    """Nothing trained after growing: thoughts of the grown model carry a third id its visual projector does not
    read yet, so every plan (moves, looks, the old ids of each thought) is the shipped model's."""
    from pathlib import Path

    from latentum import LatentUM
    from latentum.apps.vsp import entry
    from latentum.apps.vsp.evaluate import eval_maps
    from latentum.worlds import frozenlake as fl

    api = LatentUM.from_pretrained(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny")
    grown = LatentUM(grow_codebooks(api.model, 1), api.tokenizer)
    maps = [m for level in (4, 6, 8) for m in eval_maps(level, 2, seed=5)]
    images = [fl.render(m, style=style) for m, style in zip(maps, ["gymnasium", "classic"] * 3)]
    for a, b in zip(entry.plan_batch(api, images), entry.plan_batch(grown, images)):
        assert (a.actions, a.looks, a.done) == (b.actions, b.looks, b.done)
        assert all(x.ids.equal(y.ids[..., :-1]) for x, y in zip(a.thoughts, b.thoughts))
        assert all(y.ids.size(-1) == 3 for y in b.thoughts)
