import numpy as np
import pytest
import torch

from latentum.config import DecoderConfig
from latentum.model.decoder import PixelDecoder

CFG = DecoderConfig(resolution=16, channels=[8, 16], layers_per_block=1, cond_channels=4, train_timesteps=100,
                    inference_steps=3)
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
