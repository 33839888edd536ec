import numpy as np
import pytest
import torch

from napari_unet.model import ModelConfig, UNet
from napari_unet.tiling import blend_window, sliding_window_predict


def _net(depth=2, seed=0):
    torch.manual_seed(seed)
    net = UNet(ModelConfig(depth=depth, base_channels=4)).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)

    @torch.no_grad()
    def predict(x):
        return torch.softmax(net(x), 1)

    return net, predict


def _whole(predict, image, margin, divisor):
    c, h, w = image.shape
    ph = -(-(h + 2 * margin) // divisor) * divisor
    pw = -(-(w + 2 * margin) // divisor) * divisor
    padded = np.pad(image, ((0, 0), (margin, ph - h - margin), (margin, pw - w - margin)),
                    mode="reflect")
    out = predict(torch.from_numpy(padded)[None].float())[0].numpy()
    return out[:, margin : margin + h, margin : margin + w]


@pytest.mark.parametrize("shape", [(200, 300), (97, 131)])
def test_tiled_equals_whole_image_prediction(shape):
    # Depth 2: receptive-field radius 12 px, below the 16 px margin, so tiles are exact.
    _, predict = _net(depth=2)
    image = np.random.default_rng(0).random((1, *shape), np.float32)
    tiled = sliding_window_predict(image, predict, tile=64, overlap=40, margin=16,
                                   batch_size=3, divisor=2)
    whole = _whole(predict, image, 16, 2)
    assert tiled.shape == (3, *shape)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_image_smaller_than_tile_and_single_pixel_rows():
    _, predict = _net(depth=3)
    for shape in [(20, 30), (1, 50), (5, 5)]:
        image = np.random.default_rng(1).random((1, *shape), np.float32)
        out = sliding_window_predict(image, predict, tile=128, overlap=32, divisor=4)
        assert out.shape == (3, *shape)
        np.testing.assert_allclose(out.sum(0), 1, atol=1e-5)


def test_no_seams_with_deep_model():
    # Depth 4's receptive field exceeds the margin: tiles differ from whole-image
    # prediction only slightly, and blending leaves no step along tile borders.
    _, predict = _net(depth=4)
    image = np.random.default_rng(2).random((1, 256, 256), np.float32)
    tiled = sliding_window_predict(image, predict, tile=128, overlap=64, margin=16, divisor=8)
    whole = _whole(predict, image, 16, 8)
    assert np.abs(tiled - whole).max() < 0.05
    assert np.abs(tiled - whole).mean() < 0.005


def test_blend_window():
    w = blend_window(64, margin=8, ramp=16)
    assert (w[:8] == 0).all() and (w[-8:] == 0).all()
    assert (w[24:40] == 1).all()
    assert np.all(np.diff(w[8:24]) > 0)
    with pytest.raises(ValueError):
        blend_window(64, 8, 16, mode="gauss")


def test_bad_tiling_arguments():
    _, predict = _net()
    image = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(image, predict, tile=64, overlap=16, margin=16)
    with pytest.raises(ValueError, match="multiples"):
        sliding_window_predict(image, predict, tile=60, overlap=32, margin=16, divisor=8)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        sliding_window_predict(image[0], predict)
