"""The pixel decoder (LatentUM §5): the network (``model.decoder``), its loss (``losses.pixels``), the sampling
loop (``generation.render``), its folder (``checkpoint``), stage-3 training (``train.systems.DecoderSystem``,
``train.data.ImageStream``) and ``LatentUM.render``.

One format: every decoder is conditioned on a style, on the codes of a reference image and on a summary of the code
grid; folders saved in an older format are refused, not guessed at.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentum.checkpoint import load_decoder_folder, save_decoder_folder
from latentum.config import DecoderConfig
from latentum.generation.render import sample_pixels
from latentum.losses.pixels import diffusion_loss
from latentum.model.decoder import PixelDecoder, train_scheduler

CFG = DecoderConfig(resolution=16, channels=[8, 16], layers_per_block=1, cond_channels=4, train_timesteps=100,
                    inference_steps=3, styles=["none", "gymnasium", "classic"], summary=8)
GRID, CODE = 4, 6
ROOT = Path(__file__).resolve().parents[1]


def make(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return PixelDecoder(cfg, code_dim=CODE, grid=GRID)


def data(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, torch.randn(b, GRID * GRID, CODE, generator=g)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def loss(dec, images, codes, styles=None, reference=None, generator=None, weight=None):
    return diffusion_loss(dec, train_scheduler(dec.cfg), images, codes, styles, reference, generator=generator,
                          weight=weight)


def render(dec, codes, styles=None, reference=None, seed=0):
    return sample_pixels(dec, codes, styles, reference, generator=seeded(seed))


def loud_cond(dec):
    """Scale the (random-init) code projection up so the conditioning map's effect on a render is visible."""
    with torch.no_grad():
        dec.cond[-1].weight.mul_(50)
    return dec


def loud_styles(dec):
    """Scale the (random-init) style embedding up so its effect on a few-step render is visible."""
    with torch.no_grad():
        dec.style_embed.weight.mul_(20)
    return dec


def loud_summary(dec):
    """Give the zero-initialised summary projection weights, as training would."""
    with torch.no_grad():
        dec.summary_out.weight.normal_(0, 1.0)
    return dec


def same_weights(a, b):
    sd, sd2 = a.state_dict(), b.state_dict()
    return sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# --- the network, its loss and the sampling loop -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_loss_finite_and_backward(kind):
    dec = make(DecoderConfig(**{**CFG.__dict__, "prediction_type": kind}))
    out = loss(dec, *data())
    assert torch.isfinite(out.total) and out.total.dim() == 0 and set(out.parts) == {"mse"}
    out.total.backward()
    assert dec.cond[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dec.parameters() if p.requires_grad)


def test_forward_predicts_an_image_from_one_network_call():
    dec = make()
    images, codes = data()
    cond = dec.cond_map(codes)
    classes = dec.class_input(dec.check_labels(None, 2, codes.device), codes)
    assert cond.shape == (2, 2 * CFG.cond_channels, 16, 16) and classes.shape == (2, 4 * CFG.channels[0])
    assert dec.unet.config.in_channels == 3 + 2 * CFG.cond_channels
    assert dec(images, torch.tensor([3, 50]), cond, classes).shape == images.shape


def test_sample_shape_dtype_and_seeded_determinism():
    dec = make().eval()
    _, codes = data()
    a = render(dec, codes)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(dec, codes)) and not np.array_equal(a, render(dec, codes, seed=1))
    one = sample_pixels(dec, codes, steps=1, generator=seeded())
    assert one.shape == a.shape and not np.array_equal(one, a)  # steps overrides inference_steps


def test_codes_condition_the_output():
    dec = loud_cond(make()).eval()
    _, codes = data()
    assert not np.array_equal(render(dec, codes), render(dec, -codes))


def test_cond_map_lays_tokens_out_in_raster_order():
    dec = make()
    codes = torch.zeros(1, GRID * GRID, CODE)
    codes[0, 1 * GRID + 2] = torch.arange(CODE).float()  # token at row 1, col 2
    with torch.no_grad():
        dec.cond[-1].bias.zero_()
        m = dec.cond_map(codes)[0].abs().sum(0)  # (R, R), codes' and (own) reference's channels together
    cell = 16 // GRID
    assert m[cell:2 * cell, 2 * cell:3 * cell].min() > 0
    m[cell:2 * cell, 2 * cell:3 * cell] = 0
    assert m.sum() == 0


def test_cond_map_stacks_the_codes_map_then_the_references():
    dec = make()
    _, codes = data()
    _, other = data(seed=1)
    both = dec.cond_map(codes, other)
    C = CFG.cond_channels
    assert both.shape == (2, 2 * C, 16, 16)
    assert torch.equal(both[:, :C], dec.cond_map(codes)[:, :C])
    assert torch.equal(both[:, C:], dec.cond_map(other)[:, :C])
    assert torch.equal(dec.cond_map(codes), dec.cond_map(codes, codes))  # None: the image is its own reference


def test_reference_trains_through_its_own_channels():
    dec = make()
    images, codes = data()
    _, other = data(seed=1)
    loss(dec, images, codes, reference=other).total.backward()
    assert dec.unet.conv_in.weight.grad[:, 3 + CFG.cond_channels:].abs().sum() > 0  # the reference's channels


def test_overfits_two_images():
    dec = make()
    images, codes = data()
    with torch.no_grad():
        before = loss(dec, images.repeat(8, 1, 1, 1), codes.repeat(8, 1, 1), generator=seeded(123)).total
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss(dec, images.repeat(2, 1, 1, 1), codes.repeat(2, 1, 1)).total.backward()
        opt.step()
    with torch.no_grad():
        after = loss(dec, images.repeat(8, 1, 1, 1), codes.repeat(8, 1, 1), generator=seeded(123)).total
    assert after < 0.7 * before, (before.item(), after.item())


def test_bad_inputs():
    dec = make()
    images, codes = data()
    with pytest.raises(ValueError, match="codes"):
        loss(dec, images, codes[:, :-1])
    with pytest.raises(ValueError, match="codes batch"):
        loss(dec, images, codes[:1])
    with pytest.raises(ValueError, match="images"):
        loss(dec, images[:, :, :8], codes)
    with pytest.raises(ValueError, match="codes"):
        sample_pixels(dec, codes[0])
    with pytest.raises(ValueError, match="steps"):
        sample_pixels(dec, codes, steps=0)
    with pytest.raises(ValueError, match="grid"):
        PixelDecoder(CFG, code_dim=CODE, grid=5)
    with pytest.raises(ValueError, match="code_dim"):
        PixelDecoder(CFG, code_dim=0, grid=GRID)


def test_bad_references():
    dec = make()
    images, codes = data()
    with pytest.raises(ValueError, match="reference.*same shape"):
        loss(dec, images, codes, reference=codes[:1])
    with pytest.raises(ValueError, match="reference.*same shape"):
        sample_pixels(dec, codes, reference=codes[:, :-1])


def test_reference_changes_the_render_and_none_is_the_image_itself():
    dec = loud_cond(make()).eval()
    _, codes = data()
    _, other = data(seed=1)
    own = render(dec, codes)
    assert np.array_equal(own, render(dec, codes, reference=codes))
    assert np.array_equal(own, render(dec, codes, reference=codes.clone()))
    assert not np.array_equal(own, render(dec, codes, reference=other))
    classic = dec.style_labels("classic", 2)
    assert np.array_equal(render(dec, codes, classic, other), render(dec, codes, classic, other))


def test_weighted_loss_is_the_mse_under_uniform_weights_and_is_checked():
    dec = make()
    x, codes = data()
    plain = loss(dec, x, codes, generator=seeded())
    ones = loss(dec, x, codes, generator=seeded(), weight=torch.full((2, 1, 16, 16), 3.0))
    assert torch.allclose(plain.total, ones.total) and torch.allclose(ones.parts["mse"], plain.total)
    weight = torch.zeros(2, 1, 16, 16)
    weight[0] = 1.0  # only the first image counts: the second can be anything
    both = loss(dec, x, codes, generator=seeded(), weight=weight)
    other = loss(dec, torch.stack([x[0], -x[1]]), codes, generator=seeded(), weight=weight)
    assert torch.allclose(both.total, other.total) and not torch.allclose(both.parts["mse"], other.parts["mse"])
    for bad in (torch.ones(2, 16, 16), torch.ones(2, 1, 8, 8), -torch.ones(2, 1, 16, 16)):
        with pytest.raises(ValueError, match="weight must be"):
            loss(dec, x, codes, weight=bad)


# --- styles --------------------------------------------------------------------------------------------------


def test_style_labels_map_names_to_indices():
    dec = make()
    assert dec.style_labels(None, 2).tolist() == [0, 0]
    assert dec.style_labels("classic", 3).tolist() == [2, 2, 2]
    assert dec.style_labels(["gymnasium", None, "none"], 3).tolist() == [1, 0, 0]
    assert dec.style_labels(("classic",), 1).dtype == torch.long
    assert make(DecoderConfig(**{**CFG.__dict__, "styles": ["none"]})).style_labels(None, 2).tolist() == [0, 0]


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


def test_check_labels():
    dec = make()
    assert dec.check_labels(None, 3, torch.device("cpu")).tolist() == [0, 0, 0]  # None: the unknown style
    labels = torch.tensor([2, 0])
    assert torch.equal(dec.check_labels(labels, 2, torch.device("cpu")), labels)
    for bad in (torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([1])):
        with pytest.raises(ValueError, match="styles"):
            dec.check_labels(bad, 2, torch.device("cpu"))


def test_style_conditioned_loss_trains_the_used_styles_only():
    dec = make()
    images, codes = data()
    out = loss(dec, images, codes, dec.style_labels(["gymnasium", "classic"], 2))
    assert torch.isfinite(out.total) and out.total.dim() == 0
    out.total.backward()
    assert dec.style_embed.weight.grad[1:].abs().sum(1).gt(0).all()  # the two labels used get gradient
    assert dec.style_embed.weight.grad[0].abs().sum() == 0
    px = sample_pixels(dec.eval(), codes, dec.style_labels("classic", 2), generator=seeded())
    assert px.shape == (2, 16, 16, 3) and px.dtype == np.uint8


def test_styles_change_the_render_and_seeds_are_deterministic():
    dec = loud_styles(make()).eval()
    _, codes = data()
    gym, classic = dec.style_labels("gymnasium", 2), dec.style_labels("classic", 2)
    a = render(dec, codes, gym)
    assert np.array_equal(a, render(dec, codes, gym))
    assert not np.array_equal(a, render(dec, codes, classic))
    assert np.array_equal(render(dec, codes), render(dec, codes, dec.style_labels(None, 2)))  # None is label 0


def test_bad_style_labels_in_loss_and_sampling():
    dec = make()
    images, codes = data()
    with pytest.raises(ValueError, match="styles"):
        loss(dec, images, codes, torch.tensor([0, 3]))  # out of range
    with pytest.raises(ValueError, match="styles"):
        loss(dec, images, codes, torch.tensor([0.0, 1.0]))  # not long
    with pytest.raises(ValueError, match="styles"):
        sample_pixels(dec, codes, torch.tensor([1]))  # wrong batch


@pytest.mark.parametrize("kwargs, match", [
    ({"styles": ["gymnasium", "classic"]}, "styles"),  # index 0 must be "none"
    ({"styles": []}, "styles"),  # no unconditioned decoders any more
    ({"styles": ["none", "classic", "classic"]}, "styles"),
    ({"style_dropout": 1.5}, "style_dropout"),
    ({"summary": 0}, "decoder.summary"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"resolution": 18, "channels": [8, 16, 32]}, "resolution"),
])
def test_bad_decoder_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**kwargs)


def test_config_defaults_are_the_one_format():
    cfg = DecoderConfig()
    assert cfg.styles == ["none"] and cfg.summary == 64
    assert not hasattr(cfg, "reference")


# --- the summary of the code grid -------------------------------------------------------------------------------


def test_summary_starts_at_zero():
    """A fresh decoder's class input is the style embedding alone: the summary projection starts at zero."""
    dec = make()
    _, codes = data()
    labels = dec.style_labels(["gymnasium", "classic"], 2)
    assert not dec.summary_out.weight.any() and not dec.summary_out.bias.any()
    assert torch.equal(dec.class_input(labels, codes), dec.style_embed(labels))
    assert torch.equal(dec.class_input(labels, codes), dec.class_input(labels, -codes))


def test_summary_sees_every_token_and_not_their_order():
    """The class input is a function of the whole grid: the code of the one token holding a maximum moves it
    wherever that token is, a permutation of the tokens does not (max over tokens)."""
    dec = loud_summary(make()).eval()
    _, codes = data()
    labels = dec.style_labels("classic", 2)
    base = dec.class_input(labels, codes)
    moved = codes.clone()
    top = dec.summary(codes)[..., 0].argmax(1)  # (B,) the token holding the first feature's maximum
    moved[torch.arange(2), top] *= -1  # that one token only, wherever it is
    assert (dec.class_input(labels, moved) - base).abs().amax(1).gt(1e-4).all()
    perm = codes[:, torch.randperm(codes.size(1))]
    assert torch.allclose(dec.class_input(labels, perm), base, atol=1e-6)


def test_summary_trains():
    dec = loud_styles(make())
    images, codes = data()
    total = loss(dec, images, codes, dec.style_labels("gymnasium", 2), generator=seeded()).total
    total.backward()
    assert torch.isfinite(total) and dec.summary_out.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(dec.summary_out.parameters(), lr=1.0)
    opt.step()  # one step and the summary speaks: the class input now depends on the codes
    labels = dec.style_labels("gymnasium", 2)
    assert not torch.allclose(dec.class_input(labels, codes), dec.class_input(labels, -codes))


# --- the decoder folder -----------------------------------------------------------------------------------------


def test_save_load_bit_identical(tmp_path):
    dec = loud_summary(loud_styles(loud_cond(make()))).eval()
    save_decoder_folder(dec, tmp_path / "dec")
    meta = json.loads((tmp_path / "dec" / "config.json").read_text())
    assert (meta["code_dim"], meta["grid"]) == (CODE, GRID) and "reference" not in meta["decoder"]
    back = load_decoder_folder(tmp_path / "dec")
    assert not back.training and back.cfg == dec.cfg and (back.code_dim, back.grid) == (CODE, GRID)
    assert same_weights(dec, back)
    _, codes = data()
    _, other = data(seed=1)
    for style in (None, "gymnasium", ["classic", "none"]):
        for ref in (None, other):
            labels = dec.style_labels(style, 2)
            assert np.array_equal(render(dec, codes, labels, ref), render(back, codes, labels, ref))


def _old_folder(tmp_path, edit_config, drop_weights=()):
    """A folder as an older format wrote it: this format's folder with ``edit_config`` applied to its decoder
    section and the weights whose names start with ``drop_weights`` removed."""
    folder = tmp_path / "old"
    save_decoder_folder(make(), folder)
    meta = json.loads((folder / "config.json").read_text())
    edit_config(meta["decoder"])
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    if drop_weights:
        weights = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in weights.items() if not k.startswith(drop_weights)}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("reference", [False, True])
def test_old_format_with_a_reference_switch_is_refused_naming_the_config(tmp_path, reference):
    """Decoders saved while reference conditioning was a switch wrote "reference" (false: a 3 + Cc channel UNet;
    true: the shipped decoder before this format): the key no longer exists, so the folder is refused."""
    folder = _old_folder(tmp_path, lambda d: d.update(reference=reference))
    with pytest.raises(ValueError, match="reference") as e:
        load_decoder_folder(folder)
    assert repr(str(folder / "config.json")) in str(e.value)


@pytest.mark.parametrize("config_keys, weights", [
    (("summary",), ("summary",)),  # saved before the summary
    (("styles", "style_dropout", "summary"), ("summary", "style_embed")),  # saved before styles
])
def test_old_format_without_summary_or_styles_is_refused(tmp_path, config_keys, weights):
    """A folder from before the summary (or before styles) is refused as an older format, naming its config,
    never loaded half-initialised."""
    folder = _old_folder(tmp_path, lambda d: [d.pop(k) for k in config_keys], weights)
    with pytest.raises(ValueError, match="older decoder format") as e:
        load_decoder_folder(folder)
    assert repr(str(folder / "config.json")) in str(e.value)


def test_truncated_weights_are_refused_naming_the_file(tmp_path):
    save_decoder_folder(make(), tmp_path / "dec")
    file = tmp_path / "dec" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_decoder_folder(tmp_path / "dec")
    assert repr(str(file)) in str(e.value)


def _edit_json(key, value):
    def edit(folder):
        meta = json.loads((folder / "config.json").read_text())
        meta[key] = value
        (folder / "config.json").write_text(json.dumps(meta))
    return edit


def _set_decoder(**kwargs):
    def edit(folder):
        meta = json.loads((folder / "config.json").read_text())
        meta["decoder"].update(kwargs)
        (folder / "config.json").write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize("breaks, file, match", [
    (lambda f: (f / "config.json").unlink(), None, "no config.json"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    (_edit_json("grid", None), "config.json", "not a pixel decoder config"),
    (_edit_json("format_version", None), "config.json", "older decoder format"),
    (_edit_json("grid", 5), "config.json", "grid"),
    (_set_decoder(styles=["gymnasium"]), "config.json", "styles"),
    (_set_decoder(cond_channels=5), "model.safetensors", "does not fit"),
    (_set_decoder(styles=["none", "gymnasium"]), "model.safetensors", "does not fit"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
])
def test_broken_folders_are_refused_naming_the_file(tmp_path, breaks, file, match):
    folder = tmp_path / "dec"
    save_decoder_folder(make(), folder)
    breaks(folder)
    with pytest.raises(ValueError, match=match) as e:
        load_decoder_folder(folder)
    assert repr(str(folder / file if file else folder)) in str(e.value)


SHIPPED = ROOT / "checkpoints" / "tiny" / "decoder"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped decoder")
def test_shipped_decoder_is_the_current_format_and_draws_in_a_style_given_a_reference():
    """The shipped decoder (configs/recipes/tiny.yaml) is conditioned on both: MBAQ codes carry neither the look
    nor which "person" cell is the player."""
    saved = json.loads((SHIPPED / "config.json").read_text())["decoder"]
    assert {"gymnasium", "classic"} <= set(saved["styles"]) and "reference" not in saved
    dec = load_decoder_folder(SHIPPED)  # strict load
    assert dec.unet.config.in_channels == 3 + 2 * dec.cfg.cond_channels
    assert dec.summary_out.weight.any()  # its summary was trained
    codes = torch.randn(1, dec.grid**2, dec.code_dim, generator=seeded())
    px = sample_pixels(dec, codes, dec.style_labels("classic", 1), steps=1, generator=seeded())
    assert px.shape == (1, dec.cfg.resolution, dec.cfg.resolution, 3)


# --- stage 3: DecoderSystem and ImageStream ---------------------------------------------------------------------


def _debug_model():
    import copy

    from latentum.model.latentum import LatentUMModel
    from latentum.train.config import load_recipe
    from latentum.worlds.registry import default_tokenizer

    recipe = load_recipe(str(ROOT / "configs" / "recipes" / "debug.yaml"))
    cfg = copy.deepcopy(recipe.model)
    cfg.backbone.vocab_size = default_tokenizer().vocab_size
    torch.manual_seed(0)
    return LatentUMModel(cfg), recipe.decoder


def _spy_loss(monkeypatch):
    """Record the arguments DecoderSystem passes to the diffusion loss."""
    import latentum.train.systems as systems

    seen = []
    real = systems.diffusion_loss
    monkeypatch.setattr(systems, "diffusion_loss", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    return seen


def test_decoder_system_feeds_each_images_style():
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    pixels = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8)
    styles = ["gymnasium", None, "classic"]  # None: a Shapes image
    keep = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "style_dropout": 0.0}), TrainConfig())
    assert keep._style_labels(styles, 3).tolist() == [1, 0, 2]
    drop = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "style_dropout": 1.0}), TrainConfig())
    assert drop._style_labels(styles, 3).tolist() == [0, 0, 0]
    assert torch.isfinite(keep.losses((pixels, styles, pixels)).total)
    with pytest.raises(ValueError, match="batch styles"):
        keep.losses((pixels, ["gymnasium", "sepia", None], pixels))


def test_decoder_system_encodes_each_images_reference(monkeypatch):
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8, generator=g)
    refs = torch.randint(0, 256, (3, side, side, 3), dtype=torch.uint8, generator=g)
    system = DecoderSystem(model, DecoderConfig(**{**dcfg.__dict__, "style_dropout": 0.0}), TrainConfig())
    seen = _spy_loss(monkeypatch)
    assert torch.isfinite(system.losses((pixels, ["gymnasium", None, "classic"], refs)).total)
    (decoder, _, x, codes, labels, ref_codes), _ = seen[-1]
    assert decoder is system.decoder and labels.tolist() == [1, 0, 2]
    assert x.shape == (3, 3, dcfg.resolution, dcfg.resolution) and -1 <= x.min() and x.max() <= 1
    with torch.no_grad():
        want = model.quantizer.codes_from_ids(model.image_ids(refs)).float()
        own = model.quantizer.codes_from_ids(model.image_ids(pixels)).float()
    assert torch.allclose(ref_codes, want, atol=1e-5) and torch.allclose(codes, own, atol=1e-5)
    system.losses((pixels, [None] * 3, pixels))  # a Shapes image: its own reference
    (_, _, _, codes, _, ref_codes), _ = seen[-1]
    assert torch.allclose(ref_codes, codes, atol=1e-5)
    with pytest.raises(ValueError, match="batch references"):
        system.losses((pixels, [None] * 3, refs[:, :8]))


def test_changed_cells_marks_the_cells_that_differ_from_the_reference():
    from latentum.train.systems import changed_cells

    refs = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    pixels = refs.clone()
    pixels[0, 9, 30, 1] = 7  # one pixel of cell (1, 7) on a 4x4 grid of 8 px cells
    mask = changed_cells(pixels, refs, grid=4, resolution=16)  # (2, 1, 16, 16): 4 px per cell
    want = torch.zeros(2, 1, 16, 16)
    want[0, 0, 4:8, 12:16] = 1
    assert torch.equal(mask, want)


def test_edge_pixels_mark_a_shapes_outline_and_nothing_flat():
    from latentum.train.systems import edge_pixels

    images = -torch.ones(2, 3, 16, 16)
    images[1, 0, 4:10, 6:12] = 1.0  # a red square in the second image: its outline is rows 4-9, columns 6-11
    edges = edge_pixels(images)  # (2, 1, 16, 16)
    assert edges.shape == (2, 1, 16, 16) and edges[0].eq(0).all()
    want = torch.zeros(16, 16)
    want[2:12, 4:14] = 1  # within 2 px of the colour change, corners included
    want[6:8, 8:10] = 0  # the flat inside of the square, more than 2 px from its edge
    assert torch.equal(edges[1, 0], want)


def test_decoder_system_multiplies_changed_and_edge_weights(monkeypatch):
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.systems import DecoderSystem, edge_pixels

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    refs = torch.zeros(2, side, side, 3, dtype=torch.uint8)
    pixels = refs.clone()
    pixels[1, :4, :4] = 255
    seen = _spy_loss(monkeypatch)
    DecoderSystem(model, dcfg, TrainConfig(edge_weight=3.0)).losses((pixels, [None, None], refs))
    w = seen[-1][1]["weight"]
    x = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1), size=dcfg.resolution,
                                        mode="area")
    assert torch.equal(w, 1 + 2 * edge_pixels(x)) and w[0].eq(1).all() and w[1].eq(3).any()
    DecoderSystem(model, dcfg, TrainConfig(edge_weight=3.0, changed_weight=5.0)).losses((pixels, [None, None], refs))
    both = seen[-1][1]["weight"]
    assert both.max() == 15 and torch.equal(both[0], w[0])
    with pytest.raises(ValueError, match="edge_weight"):
        TrainConfig(edge_weight=0.5)


def test_decoder_system_weights_changed_cells(monkeypatch):
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    side = model.cfg.encoder.image_size
    refs = torch.zeros(2, side, side, 3, dtype=torch.uint8)
    pixels = refs.clone()
    pixels[1, :4, :4] = 255  # the top-left cell changed in the second image
    seen = _spy_loss(monkeypatch)
    system = DecoderSystem(model, dcfg, TrainConfig(changed_weight=5.0))
    assert torch.isfinite(system.losses((pixels, [None, None], refs)).total)
    w = seen[-1][1]["weight"]
    cell = dcfg.resolution // model.cfg.encoder.grid
    assert w[0].eq(1).all() and w[1, 0, :cell, :cell].eq(5).all() and w[1].sum() == w[1].numel() + 4 * cell**2
    DecoderSystem(model, dcfg, TrainConfig()).losses((pixels, [None, None], refs))
    assert seen[-1][1]["weight"] is None  # changed_weight 1: the plain MSE


def test_decoder_system_starts_from_a_trained_decoder_of_the_recipes_config(tmp_path):
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.systems import DecoderSystem

    model, dcfg = _debug_model()
    system = DecoderSystem(model, dcfg, TrainConfig())
    loud_summary(system.decoder)
    save_decoder_folder(system.decoder, tmp_path / "dec")
    again = DecoderSystem(model, dcfg, TrainConfig(init_decoder=str(tmp_path / "dec")))
    assert again.decoder.cfg == dcfg and same_weights(again.decoder, system.decoder)
    for change in ({"cond_channels": dcfg.cond_channels + 1}, {"summary": dcfg.summary + 8},
                   {"styles": ["none", "gymnasium"]}, {"style_dropout": 0.5}):
        other = DecoderConfig(**{**dcfg.__dict__, **change})
        with pytest.raises(ValueError, match="init_decoder"):  # no growing or reshaping: the recipe's decoder only
            DecoderSystem(model, other, TrainConfig(init_decoder=str(tmp_path / "dec")))
    with pytest.raises(ValueError, match="config.json"):
        DecoderSystem(model, dcfg, TrainConfig(init_decoder=str(tmp_path / "nowhere")))
    retarget = DecoderConfig(**{**dcfg.__dict__, "prediction_type": "v_prediction", "inference_steps": 16})
    again = DecoderSystem(model, retarget, TrainConfig(init_decoder=str(tmp_path / "dec")))
    assert again.decoder.cfg == retarget and same_weights(again.decoder, system.decoder)  # a new target, same net


def test_referenced_images_pair_each_plan_board_with_its_input_map():
    from latentum.train.data import ImageStream
    from latentum.worlds import frozenlake as fl
    from latentum.worlds.frozenlake.tasks import plan_sample
    from latentum.worlds.shapes import t2i_sample

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
    from latentum.train.config import DecoderStageConfig as TrainConfig
    from latentum.train.data import ImageStream
    from latentum.worlds import frozenlake as fl

    size, side = 3, 64
    cfg = TrainConfig(batch_size=5, tasks=tasks, worlds={"frozenlake": {"map_sizes": [size]}})
    stream = iter(ImageStream(cfg, canvas=side))
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


# --- LatentUM.render -----------------------------------------------------------------------------------------


def _api_with_decoder(untrained_model, tmp_path, loud):
    """A copy of the untrained model folder with a (made visible) debug-recipe decoder in decoder/."""
    import shutil

    from latentum.api import LatentUM

    folder = tmp_path / "model"
    shutil.copytree(untrained_model, folder)
    cfg = LatentUM.from_pretrained(folder).config
    _, dcfg = _debug_model()
    torch.manual_seed(0)
    save_decoder_folder(loud(PixelDecoder(dcfg, code_dim=cfg.quantizer.dim, grid=cfg.encoder.grid)),
                        folder / "decoder")
    return LatentUM.from_pretrained(folder), dcfg


def test_api_render_takes_a_style(untrained_model, tmp_path):
    from latentum import LatentImage

    api, dcfg = _api_with_decoder(untrained_model, tmp_path, loud_styles)
    assert api._decoder is None  # loaded on first use
    q = api.config.quantizer
    ids = torch.randint(0, q.codebook_size, (2, 9, q.codebooks), generator=seeded())  # two 3x3 thoughts
    gym = api.render_ids(ids, style="gymnasium", seed=0)
    assert isinstance(api._decoder, PixelDecoder) and api.decoder.cfg == dcfg
    assert np.array_equal(gym, api.render_ids(ids, style=["gymnasium", "gymnasium"], seed=0))
    assert not np.array_equal(gym, api.render_ids(ids, style="classic", seed=0))
    assert not np.array_equal(gym, api.render_ids(ids, style="gymnasium", seed=1))
    mixed = api.render_ids(ids, style=["gymnasium", "classic"], seed=0)
    assert mixed.shape == gym.shape and np.array_equal(mixed[0], gym[0])
    image = api.render(LatentImage(ids[0]), style="classic")
    assert image.size == (dcfg.resolution, dcfg.resolution)
    assert np.array_equal(np.asarray(image), api.render_ids(ids[:1], style="classic")[0])
    for bad in ("classik", ["gymnasium"]):
        with pytest.raises(ValueError, match="style"):
            api.render_ids(ids, style=bad)


def test_api_render_takes_a_reference(untrained_model, tmp_path):
    from latentum import LatentImage

    api, _ = _api_with_decoder(untrained_model, tmp_path, loud_cond)
    q = api.config.quantizer
    g = seeded()
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
