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
REF = DecoderConfig(**{**CFG.__dict__, "reference": True})  # conditioned on a reference image's codes too
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
        (dec.style_embed if dec.cfg.summary else dec.unet.class_embedding).weight.mul_(20)
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
    for key in ("styles", "style_dropout", "reference"):  # write the folder exactly as the old code did
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
def test_shipped_decoder_draws_in_a_style_given_a_reference():
    """The shipped decoder (configs/tiny_decoder.yaml) is conditioned on both: MBAQ codes carry neither the look
    nor which "person" cell is the player."""
    saved = json.loads((SHIPPED / "config.json").read_text())["decoder"]
    assert saved["reference"] and {"gymnasium", "classic"} <= set(saved["styles"])
    dec = PixelDecoder.from_pretrained(SHIPPED)  # strict load
    assert dec.conditioned and dec.unet.config.in_channels == 3 + 2 * dec.cfg.cond_channels


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


# --- reference conditioning: a thought is drawn given the map it started from --------------------------------


def loud_cond(dec):
    """Scale the (random-init) code projection up so the conditioning map's effect on a render is visible."""
    with torch.no_grad():
        dec.cond[-1].weight.mul_(50)
    return dec


def test_reference_widens_the_conditioning_map_and_trains():
    dec = make(REF)
    assert dec.unet.config.in_channels == 3 + 2 * REF.cond_channels
    assert dec.state_dict().keys() == make().state_dict().keys()  # one projection serves both code grids
    images, codes = data()
    _, other = data(seed=1)
    assert dec.cond_map(codes, other).shape == (2, 2 * REF.cond_channels, 16, 16)
    out = dec.loss(images, codes, reference=other)
    assert torch.isfinite(out.total) and out.total.dim() == 0
    out.total.backward()
    assert dec.unet.conv_in.weight.grad[:, 3 + REF.cond_channels:].abs().sum() > 0  # the reference's channels


def test_cond_map_stacks_the_codes_map_then_the_references():
    dec = make(REF)
    _, codes = data()
    _, other = data(seed=1)
    both = dec.cond_map(codes, other)
    C = REF.cond_channels
    assert torch.equal(both[:, :C], dec.cond_map(codes)[:, :C])
    assert torch.equal(both[:, C:], dec.cond_map(other)[:, :C])


def test_reference_changes_the_render_and_none_is_the_image_itself():
    dec = loud_cond(make(REF)).eval()
    _, codes = data()
    _, other = data(seed=1)
    own = dec.render(codes, generator=seeded())
    assert np.array_equal(own, dec.render(codes, reference=codes, generator=seeded()))
    assert np.array_equal(own, dec.render(codes, reference=codes.clone(), generator=seeded()))
    assert not np.array_equal(own, dec.render(codes, reference=other, generator=seeded()))
    styled = dec.render(codes, dec.style_labels("classic", 2), other, generator=seeded())
    assert np.array_equal(styled, dec.render(codes, dec.style_labels("classic", 2), other, generator=seeded()))


def test_bad_references():
    dec, plain = make(REF), make()
    images, codes = data()
    with pytest.raises(ValueError, match="reference.*same shape"):
        dec.loss(images, codes, reference=codes[:1])
    with pytest.raises(ValueError, match="reference.*same shape"):
        dec.render(codes, reference=codes[:, :-1])
    with pytest.raises(ValueError, match="reference: this decoder has no reference"):
        plain.render(codes, reference=codes)
    with pytest.raises(ValueError, match="decoder.reference"):
        DecoderConfig(reference="yes")


def test_save_load_bit_identical_with_reference(tmp_path):
    dec = loud_styles(loud_cond(make(REF))).eval()
    dec.save_pretrained(tmp_path / "dec")
    assert json.loads((tmp_path / "dec" / "config.json").read_text())["decoder"]["reference"] is True
    back = PixelDecoder.from_pretrained(tmp_path / "dec").eval()
    assert back.cfg == dec.cfg and back.cfg.reference
    sd, sd2 = dec.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    _, codes = data()
    _, other = data(seed=1)
    for ref in (None, other):
        labels = dec.style_labels(["gymnasium", "classic"], 2)
        assert np.array_equal(dec.render(codes, labels, ref, generator=seeded()),
                              back.render(codes, labels, ref, generator=seeded()))


def test_style_era_folder_without_reference_loads_and_renders_as_before(tmp_path):
    """A folder saved with styles but before references (no "reference" key) builds the 3 + Cc channel UNet it
    was trained as, loads strictly and renders the same pixels."""
    dec = loud_styles(make()).eval()
    dec.save_pretrained(tmp_path / "styled")
    meta = json.loads((tmp_path / "styled" / "config.json").read_text())
    del meta["decoder"]["reference"]
    (tmp_path / "styled" / "config.json").write_text(json.dumps(meta, indent=2))
    back = PixelDecoder.from_pretrained(tmp_path / "styled").eval()
    assert not back.cfg.reference and back.unet.config.in_channels == 3 + CFG.cond_channels
    _, codes = data()
    labels = dec.style_labels("classic", 2)
    assert np.array_equal(back.render(codes, labels, generator=seeded()), dec.render(codes, labels, generator=seeded()))


def test_decoder_system_encodes_each_images_reference(monkeypatch):
    from latentum.config import TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8, generator=g)
    refs = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8, generator=g)
    system = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "reference": True}), TrainConfig())
    seen = []
    real = PixelDecoder.loss
    monkeypatch.setattr(PixelDecoder, "loss", lambda self, *a, **k: seen.append(a) or real(self, *a, **k))
    assert torch.isfinite(system.losses((pixels, ["gymnasium", None, "classic"], refs)).total)
    with torch.no_grad():
        want = model.quantizer.codes_from_ids(model.image_ids(refs)).float()
    assert torch.allclose(seen[-1][3], want)
    with pytest.warns(UserWarning, match="no references"):  # the two-part form: each image its own reference
        assert torch.isfinite(system.losses((pixels, ["gymnasium", None, "classic"])).total)
    assert seen[-1][3] is None
    with pytest.raises(ValueError, match="batch references"):
        system.losses((pixels, [None] * 3, refs[:, :8]))
    with pytest.raises(ValueError, match="decoder batch"):
        system.losses((pixels,))
    plain = DecoderSystem(model, dcfg, TrainConfig())  # no reference: the stream's references are not encoded
    assert torch.isfinite(plain.losses((pixels, [None] * 3, refs)).total) and seen[-1][3] is None


def test_referenced_images_pair_each_plan_board_with_its_input_map():
    from latentum.data import frozenlake as fl
    from latentum.data.shapes import t2i_sample
    from latentum.data.vsp import plan_sample
    from latentum.train.data import ImageStream

    rng = np.random.default_rng(0)
    plan = plan_sample(rng, 4, "classic", canvas=64)
    out = ImageStream.referenced(plan)
    user = [x for x in plan.user if isinstance(x, np.ndarray)]
    assert len(out) == len(plan.images) > 2 and len(user) == 1
    assert all(im is want for (im, _, _), want in zip(out, plan.images))
    assert all(style == "classic" and ref is user[0] for _, style, ref in out)
    m = plan.meta["map"]
    assert np.array_equal(user[0], fl.render_canvas(m, m.player, "classic", canvas=64))  # the player on the start
    shapes = t2i_sample(rng, canvas=64)
    assert [(im is ref, style) for im, style, ref in ImageStream.referenced(shapes)] == [(True, None)]


@pytest.mark.parametrize("tasks", [{"vsp_plan": 1, "vsp_walk_look": 1}, {"shapes_t2i": 1}])
def test_image_stream_yields_aligned_pixels_styles_and_references(tasks):
    """Every FrozenLake image comes with the input map of its own board (same holes and goal, the player on the
    start, drawn in the same style); a Shapes image is its own reference."""
    from latentum.config import TrainConfig
    from latentum.data import frozenlake as fl
    from latentum.train.data import ImageStream

    size, side = 3, 64
    stream = iter(ImageStream(TrainConfig(batch_size=5, tasks=tasks, map_sizes=[size]), canvas=side))
    moved = 0
    for _ in range(3):
        pixels, styles, refs = next(stream)
        assert pixels.shape == refs.shape == (5, side, side, 3) and pixels.dtype == refs.dtype == torch.uint8
        assert len(styles) == 5
        for px, style, ref in zip(pixels.numpy(), styles, refs.numpy()):
            if "shapes_t2i" in tasks:
                assert style is None and np.array_equal(px, ref)
                continue
            start = fl.read_canvas(ref, size, style)
            m = fl.LakeMap(size, start.holes, start.player, start.goal)
            assert np.array_equal(ref, fl.render_canvas(m, m.player, style, canvas=side))
            board = fl.read_canvas(px, size, style)
            assert (board.holes, board.goal) == (m.holes, m.goal)
            moved += not np.array_equal(px, ref)
    assert moved > 0 or "shapes_t2i" in tasks


def test_api_render_takes_a_reference(untrained_model, tmp_path):
    import shutil

    from latentum.api import LatentImage, LatentUM

    folder = tmp_path / "model"
    shutil.copytree(untrained_model, folder)
    _, dcfg = _debug_model()
    q = LatentUM.from_pretrained(folder).config.quantizer
    grid = LatentUM.from_pretrained(folder).config.encoder.grid
    torch.manual_seed(0)
    loud_cond(PixelDecoder(DecoderConfig(**{**dcfg.__dict__, "reference": True}), q.dim, grid)).save_pretrained(
        folder / "decoder")
    api = LatentUM.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, q.codebook_size, (2, 9, q.codebooks), generator=g)  # two 3x3 thoughts
    ref = torch.randint(0, q.codebook_size, (9, q.codebooks), generator=g)  # their 3x3 input map
    own = api.render_ids(ids, style="classic")
    assert np.array_equal(own, api.render_ids(ids, style="classic", reference=ids))  # None = the image itself
    assert np.array_equal(own, api.render_ids(ids, style="classic", reference=[None, None]))
    given = api.render_ids(ids, style="classic", reference=ref)
    assert not np.array_equal(own, given)
    assert np.array_equal(given, api.render_ids(ids, style="classic", reference=torch.stack([ref, ref])))
    assert np.array_equal(given, api.render_ids(ids, style="classic", reference=[ref, ref]))
    mixed = api.render_ids(ids, style="classic", reference=[ref, None])
    assert np.array_equal(mixed[0], given[0]) and np.array_equal(mixed[1], own[1])
    images = api.render([LatentImage(ids[0]), LatentImage(ids[1])], style="classic", reference=LatentImage(ref))
    assert all(np.array_equal(np.asarray(im), px) for im, px in zip(images, given))
    one = api.render(LatentImage(ids[0]), style="classic", reference=[LatentImage(ref)])
    assert np.array_equal(np.asarray(one), given[0])
    for bad, match in [(ref[:4], r"reference\[0\].*same grid"), (ref.float(), r"reference\[0\].*same grid"),
                       ([ref], "one per image")]:
        with pytest.raises(ValueError, match=match):
            api.render_ids(ids, reference=bad)
    for bad, match in [("map", "reference"), ([ref, "x"], r"reference\[1\]")]:
        with pytest.raises(TypeError, match=match):
            api.render_ids(ids, reference=bad)
    with pytest.raises(TypeError, match=r"reference\[0\]"):
        api.render(LatentImage(ids[0]), reference=[ref])  # ids where a LatentImage belongs
    with pytest.raises(TypeError, match="reference"):
        api.render(LatentImage(ids[0]), reference=ref)


def test_api_reference_is_checked_and_ignored_without_reference_conditioning(untrained_model, tmp_path):
    import shutil

    from latentum.api import LatentUM

    folder = tmp_path / "model"
    shutil.copytree(untrained_model, folder)
    _, dcfg = _debug_model()
    api = LatentUM.from_pretrained(folder)
    q = api.config.quantizer
    torch.manual_seed(0)
    loud_cond(PixelDecoder(dcfg, q.dim, api.config.encoder.grid)).save_pretrained(folder / "decoder")
    api = LatentUM.from_pretrained(folder)
    ids = torch.randint(0, q.codebook_size, (2, 9, q.codebooks))
    ref = torch.randint(0, q.codebook_size, (9, q.codebooks))
    assert np.array_equal(api.render_ids(ids), api.render_ids(ids, reference=ref))
    with pytest.raises(ValueError, match="reference"):
        api.render_ids(ids, reference=ref[:4])


def test_weighted_loss_is_the_mse_under_uniform_weights_and_is_checked():
    dec = make()
    x, codes = data()
    plain = dec.loss(x, codes, generator=torch.Generator().manual_seed(0))
    ones = dec.loss(x, codes, generator=torch.Generator().manual_seed(0), weight=torch.full((2, 1, 16, 16), 3.0))
    assert torch.allclose(plain.total, ones.total) and torch.allclose(ones.parts["mse"], plain.total)
    weight = torch.zeros(2, 1, 16, 16)
    weight[0] = 1.0  # only the first image counts: the second can be anything
    both = dec.loss(x, codes, generator=torch.Generator().manual_seed(0), weight=weight)
    other = dec.loss(torch.stack([x[0], -x[1]]), codes, generator=torch.Generator().manual_seed(0), weight=weight)
    assert torch.allclose(both.total, other.total) and not torch.allclose(both.parts["mse"], other.parts["mse"])
    for bad in (torch.ones(2, 16, 16), torch.ones(2, 1, 8, 8), -torch.ones(2, 1, 16, 16)):
        with pytest.raises(ValueError, match="weight must be"):
            dec.loss(x, codes, weight=bad)


def test_changed_cells_marks_the_cells_that_differ_from_the_reference():
    from latentum.train.systems import changed_cells

    refs = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    pixels = refs.clone()
    pixels[0, 9, 30, 1] = 7  # one pixel of cell (1, 7) on a 4x4 grid of 8 px cells
    mask = changed_cells(pixels, refs, grid=4, resolution=16)  # (2, 1, 16, 16): 4 px per cell
    want = torch.zeros(2, 1, 16, 16)
    want[0, 0, 4:8, 12:16] = 1
    assert torch.equal(mask, want)


def test_decoder_system_weights_changed_cells_and_starts_from_a_trained_decoder(tmp_path, monkeypatch):
    from latentum.config import TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    refs = torch.zeros(2, side, side, 3, dtype=torch.uint8)
    pixels = refs.clone()
    pixels[1, :4, :4] = 255  # the top-left cell changed in the second image
    seen = []
    real = PixelDecoder.loss
    monkeypatch.setattr(PixelDecoder, "loss", lambda self, *a, **k: seen.append(k) or real(self, *a, **k))
    system = DecoderSystem(model, dcfg, TrainConfig(changed_weight=5.0))
    assert torch.isfinite(system.losses((pixels, [None, None], refs)).total)
    w = seen[-1]["weight"]
    cell = dcfg.resolution // model.cfg.encoder.grid
    assert w[0].eq(1).all() and w[1, 0, :cell, :cell].eq(5).all() and w[1].sum() == w[1].numel() + 4 * cell**2
    DecoderSystem(model, dcfg, TrainConfig()).losses((pixels, [None, None], refs))
    assert seen[-1]["weight"] is None  # changed_weight 1: the plain MSE

    system.decoder.save_pretrained(tmp_path / "dec")
    again = DecoderSystem(model, dcfg, TrainConfig(init_decoder=str(tmp_path / "dec")))
    for k, v in system.decoder.state_dict().items():
        assert torch.equal(again.decoder.state_dict()[k], v), k
    other = DecoderConfig(**{**dcfg.__dict__, "cond_channels": dcfg.cond_channels + 1})
    with pytest.raises(ValueError, match="init_decoder"):
        DecoderSystem(model, other, TrainConfig(init_decoder=str(tmp_path / "dec")))


SUM = DecoderConfig(**{**REF.__dict__, "summary": 8})  # a summary of the whole code grid as well


def loud_summary(dec):
    """Give the zero-initialised summary projection weights, as training would."""
    with torch.no_grad():
        dec.summary_out.weight.normal_(0, 1.0)
    return dec


def test_with_summary_renders_the_same_pixels_until_trained():
    dec = loud_styles(loud_cond(make(REF))).eval()
    grown = dec.with_summary(8).eval()
    assert grown.cfg == SUM and grown.unet.class_embedding.__class__.__name__ == "Identity"
    assert torch.equal(grown.style_embed.weight, dec.unet.class_embedding.weight)
    _, codes = data()
    _, other = data(seed=1)
    labels = dec.style_labels(["gymnasium", "classic"], 2)
    assert np.array_equal(dec.render(codes, labels, other, generator=seeded()),
                          grown.render(codes, labels, other, generator=seeded()))
    loud_summary(grown)
    assert not np.array_equal(dec.render(codes, labels, other, generator=seeded()),
                              grown.render(codes, labels, other, generator=seeded()))
    with pytest.raises(ValueError, match="already has a summary"):
        grown.with_summary(8)


def test_summary_sees_every_token_and_not_their_order():
    """The class input is a function of the whole grid: the code of the one token holding a maximum moves it
    wherever that token is, a permutation of the tokens does not (max over tokens)."""
    dec = loud_summary(make(SUM)).eval()
    _, codes = data()
    labels = dec.style_labels("classic", 2)
    base = dec.class_input(labels, codes)
    moved = codes.clone()
    top = dec.summary(codes)[..., 0].argmax(1)  # (B,) the token holding the first feature's maximum
    moved[torch.arange(2), top] *= -1  # that one token only, wherever it is
    assert (dec.class_input(labels, moved) - base).abs().amax(1).gt(1e-4).all()
    perm = codes[:, torch.randperm(codes.size(1))]
    assert torch.allclose(dec.class_input(labels, perm), base, atol=1e-6)
    assert make(REF).class_input(labels, codes) is labels  # no summary: the style labels as they are


def test_summary_trains_and_saves_bit_identical(tmp_path):
    dec = loud_styles(make(SUM))
    images, codes = data()
    loss = dec.loss(images, codes, dec.style_labels("gymnasium", 2), generator=seeded()).total
    loss.backward()
    assert torch.isfinite(loss) and dec.summary_out.weight.grad.abs().sum() > 0
    dec.eval().save_pretrained(tmp_path / "dec")
    back = PixelDecoder.from_pretrained(tmp_path / "dec").eval()
    assert back.cfg == SUM
    sd, sd2 = dec.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    labels = dec.style_labels("classic", 2)
    assert np.array_equal(dec.render(codes, labels, generator=seeded()), back.render(codes, labels, generator=seeded()))
    unstyled = make(DecoderConfig(**{**SUM.__dict__, "styles": []}))
    assert unstyled.style_embed is None and unstyled.class_input(None, codes).shape == (2, 4 * CFG.channels[0])
    with pytest.raises(ValueError, match="decoder.summary"):
        DecoderConfig(summary=-1)


def test_init_decoder_grows_the_recipes_summary(tmp_path):
    from latentum.config import TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    DecoderSystem(model, dcfg, TrainConfig()).decoder.save_pretrained(tmp_path / "dec")
    summed = DecoderConfig(**{**dcfg.__dict__, "summary": 8})
    grown = DecoderSystem(model, summed, TrainConfig(init_decoder=str(tmp_path / "dec"))).decoder
    saved = PixelDecoder.from_pretrained(tmp_path / "dec")
    assert grown.cfg == summed
    for k, v in saved.state_dict().items():
        assert torch.equal(grown.state_dict()[k.replace("unet.class_embedding", "style_embed")], v), k
