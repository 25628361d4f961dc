import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentum.config import DecoderConfig
from latentum.model.decoder import PixelDecoder

CFG = DecoderConfig(resolution=16, channels=[8, 16], layers_per_block=1, cond_channels=4, train_timesteps=100,
                    inference_steps=3)
PLAIN = DecoderConfig(**{**CFG.__dict__, "styles": []})  # unconditioned, like decoders saved before styles
GRID, CODE = 4, 6


def make(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return PixelDecoder(cfg, code_dim=CODE, grid=GRID)


def data(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, torch.randn(b, GRID * GRID, CODE, generator=g)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_loss_finite_and_backward(kind):
    cfg = DecoderConfig(**{**CFG.__dict__, "prediction_type": kind})
    dec = make(cfg)
    out = dec.loss(*data())
    assert torch.isfinite(out.total) and out.total.dim() == 0
    out.total.backward()
    assert dec.cond[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dec.unet.parameters() if p.requires_grad)


def test_render_shape_dtype_and_seeded_determinism():
    dec = make().eval()
    _, codes = data()
    a = dec.render(codes, generator=torch.Generator().manual_seed(0))
    b = dec.render(codes, generator=torch.Generator().manual_seed(0))
    c = dec.render(codes, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_codes_condition_the_output():
    dec = make().eval()
    _, codes = data()
    with torch.no_grad():
        dec.cond[-1].weight.mul_(50)  # make the (random-init) conditioning path visible
    a = dec.render(codes, generator=torch.Generator().manual_seed(0))
    b = dec.render(-codes, generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(a, b)


def test_cond_map_lays_tokens_out_in_raster_order():
    dec = make()
    codes = torch.zeros(1, GRID * GRID, CODE)
    codes[0, 1 * GRID + 2] = torch.arange(CODE).float()  # token at row 1, col 2
    with torch.no_grad():
        dec.cond[-1].bias.zero_()
        m = dec.cond_map(codes)[0].abs().sum(0)  # (R, R)
    cell = 16 // GRID
    assert m[cell:2 * cell, 2 * cell:3 * cell].min() > 0
    m[cell:2 * cell, 2 * cell:3 * cell] = 0
    assert m.sum() == 0


def test_save_load_bit_identical(tmp_path):
    dec = make().eval()
    dec.save_pretrained(tmp_path / "dec")
    back = PixelDecoder.from_pretrained(tmp_path / "dec").eval()
    assert back.cfg == dec.cfg and (back.code_dim, back.grid) == (CODE, GRID)
    sd, sd2 = dec.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    _, codes = data()
    g = lambda: torch.Generator().manual_seed(0)
    assert np.array_equal(dec.render(codes, generator=g()), back.render(codes, generator=g()))


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        PixelDecoder.from_pretrained(tmp_path)


def test_overfits_two_images():
    dec = make()
    images, codes = data()
    g = lambda: torch.Generator().manual_seed(123)
    with torch.no_grad():
        before = dec.loss(images.repeat(8, 1, 1, 1), codes.repeat(8, 1, 1), generator=g()).total
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        dec.loss(images.repeat(2, 1, 1, 1), codes.repeat(2, 1, 1)).total.backward()
        opt.step()
    with torch.no_grad():
        after = dec.loss(images.repeat(8, 1, 1, 1), codes.repeat(8, 1, 1), generator=g()).total
    assert after < 0.7 * before, (before.item(), after.item())


def test_bad_inputs():
    dec = make()
    images, codes = data()
    with pytest.raises(ValueError, match="codes"):
        dec.loss(images, codes[:, :-1])
    with pytest.raises(ValueError, match="images"):
        dec.loss(images[:, :, :8], codes)
    with pytest.raises(ValueError, match="grid"):
        PixelDecoder(CFG, code_dim=CODE, grid=5)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def loud_styles(dec):
    """Scale the (random-init) style embedding up so its effect on a few-step render is visible."""
    with torch.no_grad():
        dec.unet.class_embedding.weight.mul_(20)
    return dec


def test_style_labels_map_names_to_indices():
    dec = make()
    assert dec.conditioned and CFG.styles == ["none", "gymnasium", "classic"]
    assert dec.style_labels(None, 2).tolist() == [0, 0]
    assert dec.style_labels("classic", 3).tolist() == [2, 2, 2]
    assert dec.style_labels(["gymnasium", None, "none"], 3).tolist() == [1, 0, 0]
    assert dec.style_labels(["classic"], 1).dtype == torch.long


@pytest.mark.parametrize("style, match", [("classik", "style.*classik"), (["gymnasium", "nope"], "style.*nope"),
                                          (["classic"], "style.*2")])
def test_unknown_style_names_the_argument(style, match):
    with pytest.raises(ValueError, match=match):
        make().style_labels(style, 2)


def test_unknown_style_names_a_custom_argument():
    with pytest.raises(ValueError, match="batch styles"):
        make().style_labels(["sepia", None], 2, argument="batch styles")
    with pytest.raises(TypeError, match="style"):
        make().style_labels(3, 2)


def test_style_conditioned_loss_and_render_shapes():
    dec = make()
    images, codes = data()
    out = dec.loss(images, codes, dec.style_labels(["gymnasium", "classic"], 2))
    assert torch.isfinite(out.total) and out.total.dim() == 0
    out.total.backward()
    assert dec.unet.class_embedding.weight.grad[1:].abs().sum() > 0  # the two labels used get gradient
    assert dec.unet.class_embedding.weight.grad[0].abs().sum() == 0
    px = dec.eval().render(codes, dec.style_labels("classic", 2), generator=seeded())
    assert px.shape == (2, 16, 16, 3) and px.dtype == np.uint8


def test_styles_change_the_render_and_seeds_are_deterministic():
    dec = loud_styles(make()).eval()
    _, codes = data()
    gym, classic = dec.style_labels("gymnasium", 2), dec.style_labels("classic", 2)
    a = dec.render(codes, gym, generator=seeded())
    assert np.array_equal(a, dec.render(codes, gym, generator=seeded()))
    assert not np.array_equal(a, dec.render(codes, classic, generator=seeded()))
    # None is the unknown style, label 0
    assert np.array_equal(dec.render(codes, generator=seeded()),
                          dec.render(codes, dec.style_labels(None, 2), generator=seeded()))


def test_bad_style_labels():
    dec, plain = make(), make(PLAIN)
    images, codes = data()
    with pytest.raises(ValueError, match="styles"):
        dec.loss(images, codes, torch.tensor([0, 3]))  # out of range
    with pytest.raises(ValueError, match="styles"):
        dec.loss(images, codes, torch.tensor([0.0, 1.0]))  # not long
    with pytest.raises(ValueError, match="styles"):
        dec.render(codes, torch.tensor([1]))  # wrong batch
    with pytest.raises(ValueError, match="no style conditioning"):
        plain.render(codes, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="styles"):
        DecoderConfig(styles=["gymnasium", "classic"])  # index 0 must be "none"
    with pytest.raises(ValueError, match="styles"):
        DecoderConfig(styles=["none", "classic", "classic"])
    with pytest.raises(ValueError, match="style_dropout"):
        DecoderConfig(style_dropout=1.5)


def test_save_load_bit_identical_with_styles(tmp_path):
    dec = loud_styles(make()).eval()
    dec.save_pretrained(tmp_path / "dec")
    back = PixelDecoder.from_pretrained(tmp_path / "dec").eval()
    assert back.cfg == dec.cfg and back.conditioned
    sd, sd2 = dec.state_dict(), back.state_dict()
    assert "unet.class_embedding.weight" in sd and sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    _, codes = data()
    for style in (None, "gymnasium", ["classic", "none"]):
        labels = dec.style_labels(style, 2)
        assert np.array_equal(dec.render(codes, labels, generator=seeded()),
                              back.render(codes, back.style_labels(style, 2), generator=seeded()))


def test_old_format_folder_loads_unconditioned_and_renders_as_before(tmp_path):
    """A config.json from before style conditioning has no "styles": it must build the UNet it was trained as
    (no class embedding), load strictly, ignore ``style`` names (still checked) and render the same pixels."""
    plain = make(PLAIN).eval()
    assert not plain.conditioned and plain.unet.class_embedding is None
    plain.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("styles", "style_dropout"):  # write the folder exactly as the old code did
        del meta["decoder"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta, indent=2))
    back = PixelDecoder.from_pretrained(tmp_path / "old").eval()
    assert back.cfg.styles == [] and back.unet.class_embedding is None
    assert back.state_dict().keys() == plain.state_dict().keys()
    assert back.style_labels("classic", 2) is None and back.style_labels(None, 2) is None
    with pytest.raises(ValueError, match="style"):
        back.style_labels("classik", 2)
    _, codes = data()
    ref = plain.render(codes, generator=seeded())
    assert np.array_equal(back.render(codes, generator=seeded()), ref)
    # the pre-change call path: the diffusers UNet called without class labels, as the old predict did
    x = torch.randn(2, 3 + CFG.cond_channels, 16, 16)
    t = torch.tensor([5, 50])
    with torch.no_grad():
        assert torch.equal(back.predict(x[:, :3], t, x[:, 3:]), back.unet(x, t).sample)
    back.save_pretrained(tmp_path / "again")  # re-saved, it stays unconditioned
    assert PixelDecoder.from_pretrained(tmp_path / "again").cfg.styles == []


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny" / "decoder"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped decoder")
def test_shipped_old_format_decoder_loads_unconditioned():
    assert "styles" not in json.loads((SHIPPED / "config.json").read_text())["decoder"]
    dec = PixelDecoder.from_pretrained(SHIPPED)  # strict load: no class embedding expected or found
    assert not dec.conditioned and dec.unet.class_embedding is None


def _debug_model():
    import copy

    from latentum.config import load_recipe
    from latentum.data.worlds import default_tokenizer
    from latentum.model.latentum import LatentUMModel

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"))
    cfg = copy.deepcopy(recipe.model)
    cfg.backbone.vocab_size = default_tokenizer().vocab_size
    torch.manual_seed(0)
    return LatentUMModel(cfg), recipe.decoder


def test_decoder_system_feeds_each_images_style():
    from latentum.config import TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    pixels = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8)
    styles = ["gymnasium", None, "classic"]  # None: a Shapes image
    keep = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "style_dropout": 0.0}), TrainConfig())
    assert keep._style_labels(styles, 3).tolist() == [1, 0, 2]
    drop = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "style_dropout": 1.0}), TrainConfig())
    assert drop._style_labels(styles, 3).tolist() == [0, 0, 0]
    out = keep.losses((pixels, styles))
    assert torch.isfinite(out.total)
    with pytest.raises(ValueError, match="batch styles"):
        keep.losses((pixels, ["gymnasium", "sepia", None]))
    with pytest.warns(UserWarning, match="no styles"):  # a stream without styles trains "none" only
        assert torch.isfinite(keep.losses(pixels).total)


def test_api_render_takes_a_style(untrained_model, tmp_path):
    import shutil

    from latentum.api import LatentImage, LatentUM

    folder = tmp_path / "model"
    shutil.copytree(untrained_model, folder)
    api = LatentUM.from_pretrained(folder)
    _, dcfg = _debug_model()
    torch.manual_seed(0)
    q = api.config.quantizer
    loud_styles(PixelDecoder(dcfg, code_dim=q.dim, grid=api.config.encoder.grid)).save_pretrained(folder / "decoder")
    api = LatentUM.from_pretrained(folder)
    ids = torch.randint(0, q.codebook_size, (2, 9, q.codebooks))  # two 3x3 thoughts
    gym = api.render_ids(ids, style="gymnasium", seed=0)
    assert np.array_equal(gym, api.render_ids(ids, style=["gymnasium", "gymnasium"], seed=0))
    assert not np.array_equal(gym, api.render_ids(ids, style="classic", seed=0))
    mixed = api.render_ids(ids, style=["gymnasium", "classic"], seed=0)
    assert mixed.shape == gym.shape
    image = api.render(LatentImage(ids[0]), style="classic")
    assert image.size == (dcfg.resolution, dcfg.resolution)
    for bad in ("classik", ["gymnasium"]):
        with pytest.raises(ValueError, match="style"):
            api.render_ids(ids, style=bad)
