import numpy as np
import pytest
import torch

from latentum.config import EncoderConfig
from latentum.model.encoder import VisionEncoder

CFG = EncoderConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return VisionEncoder(CFG).eval()


def test_forward_shape_one_feature_per_patch(enc):
    imgs = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    feats = enc(enc.preprocess(imgs))
    assert feats.shape == (2, CFG.num_tokens, CFG.width) == (2, 16, 16)
    assert enc.feature_dim == CFG.width
    assert torch.isfinite(feats).all()


def test_preprocess_range_layout_and_tensor_input(enc):
    imgs = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    imgs[0, :, :, 0] = 255  # red channel full, others zero
    x = enc.preprocess(imgs)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert (x[:, 0] == 1).all() and (x[:, 1:] == -1).all()
    assert torch.equal(enc.preprocess(torch.from_numpy(imgs)), x)


def test_tokens_are_raster_ordered_patches(enc):
    """Changing one patch changes that token most (ViT attention mixes the rest only a little)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 8:16, 16:24] = 255 - b[0, 8:16, 16:24]  # patch row 1, col 2 -> token 1 * 4 + 2
    with torch.no_grad():
        da = (enc(enc.preprocess(a)) - enc(enc.preprocess(b))).norm(dim=-1)[0]  # (N,)
    assert da.argmax().item() == 6


@pytest.mark.parametrize("bad", [np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 32, 32, 3), np.float32),
                                 np.zeros((32, 32, 3), np.uint8)])
def test_preprocess_rejects_bad_images(enc, bad):
    with pytest.raises(ValueError, match="images"):
        enc.preprocess(bad)


def test_forward_rejects_wrong_size(enc):
    with pytest.raises(ValueError, match="pixels"):
        enc(torch.zeros(1, 3, 16, 16))
