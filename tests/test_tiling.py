import numpy as np
import pytest
import torch

from napari_unet import tiling
from napari_unet.model import ModelConfig, UNet
from napari_unet.tiling import blend_window, drain, sliding_window_iter, sliding_window_predict


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


def _reference(image, predictor, *, tile, overlap, margin, batch_size, blend, divisor):
    """The host-side tiling as it was before device-resident tiling (kept only here)."""
    from napari_unet.tiling import _positions

    _, h, w = image.shape
    ph = -(-(h + 2 * margin) // divisor) * divisor
    pw = -(-(w + 2 * margin) // divisor) * divisor
    th, tw = min(tile, ph), min(tile, pw)
    pad = ((0, 0), (margin, ph - h - margin), (margin, pw - w - margin))
    padded = np.pad(image, pad, mode="symmetric" if min(h, w) < 2 else "reflect")
    step = tile - overlap
    ys, xs = _positions(ph, th, step), _positions(pw, tw, step)
    ramp = max(overlap - 2 * margin, 0)
    window = torch.from_numpy(
        np.outer(blend_window(th, margin, ramp, blend), blend_window(tw, margin, ramp, blend)))
    corners = [(y, x) for y in ys for x in xs]
    acc = None
    wsum = torch.zeros((ph, pw))
    src = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        out = predictor(torch.stack([src[:, y : y + th, x : x + tw] for y, x in chunk])).float()
        if acc is None:
            acc = torch.zeros((out.shape[1], ph, pw))
        for (y, x), o in zip(chunk, out, strict=True):
            acc[:, y : y + th, x : x + tw] += o * window
            wsum[y : y + th, x : x + tw] += window
    crop = (slice(margin, margin + h), slice(margin, margin + w))
    return (acc[:, crop[0], crop[1]] / wsum[crop].clamp_min(1e-12)).numpy()


@pytest.mark.parametrize(
    ("shape", "channels", "tile", "overlap", "batch", "blend"),
    [((200, 300), 1, 64, 32, 3, "cosine"), ((97, 131), 2, 64, 48, 4, "linear"),
     ((1, 50), 1, 128, 32, 2, "constant"), ((300, 64), 1, 96, 32, 5, "cosine"),
     ((5, 5), 3, 64, 32, 1, "cosine")],
)
@pytest.mark.parametrize("index_add", [False, True])
def test_device_resident_tiling_equals_host_reference(shape, channels, tile, overlap, batch,
                                                       blend, index_add, monkeypatch):
    # index_add: the accelerators' accumulate (one index_add_ per batch), run on the CPU.
    monkeypatch.setattr(tiling, "_INDEX_ADD_ON_CPU", index_add)
    torch.manual_seed(0)
    net = UNet(ModelConfig(depth=3, base_channels=4, in_channels=channels)).eval()

    @torch.no_grad()
    def predict(x):
        return torch.softmax(net(x), 1)

    image = np.random.default_rng(3).random((channels, *shape), np.float32)
    kw = dict(tile=tile, overlap=overlap, margin=16, batch_size=batch, blend=blend, divisor=4)
    ref = _reference(image, predict, **kw)
    out = sliding_window_predict(image, predict, **kw)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # A tensor in gives a tensor out (left on the device), equal to the numpy path;
    # a second call reuses the cached geometry.
    t = drain(sliding_window_iter(torch.from_numpy(image), predict, **kw))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)


def test_progress_counts_batches():
    _, predict = _net(depth=2)
    image = np.zeros((1, 100, 100), np.float32)
    steps = list(_iter_progress(sliding_window_iter(image, predict, tile=48, overlap=32,
                                                    margin=16, batch_size=4, divisor=2)))
    total = steps[0][1]
    assert [d for d, _ in steps] == [min(i + 4, total) for i in range(0, total, 4)]


def _iter_progress(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return
