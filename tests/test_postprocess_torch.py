"""The torch instance post-processing (postprocess_torch) against the scikit-image reference,
on CPU torch: each step, synthetic and real maps, edge cases, and its wiring into segment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential

from _synthetic import touching_disks
from napari_unet import segment as segment_mod
from napari_unet.evaluate import match_instances
from napari_unet.postprocess import PostprocessConfig, instances_from_probs
from napari_unet.postprocess_torch import (
    connected_components,
    gaussian_smooth,
    instances_from_probs_torch,
    resolve_post_device,
)
from napari_unet.segment import InferenceConfig, Predictor, infer_plane, segment_image
from napari_unet.tiling import drain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _both(probs: np.ndarray, config: PostprocessConfig | None = None):
    ref = instances_from_probs(probs, config)
    got = instances_from_probs_torch(torch.from_numpy(probs), config)
    assert got.dtype == np.int32 and got.shape == ref.shape
    return ref, got


def _soft_probs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Continuous, noisy probabilities like a network's: P(interior) ramps up from each
    cell's rim (so the watershed floods real slopes), P(background) is blurred."""
    rng = np.random.default_rng(seed)
    inner = (labels > 0) & ~find_boundaries(labels, mode="inner")
    interior = np.clip(ndi.distance_transform_edt(inner) / 4, 0, 1) * 0.9
    interior += rng.random(labels.shape) * 0.05 * inner
    background = np.clip(ndi.gaussian_filter((labels == 0).astype(float), 0.7), 0, 1)
    background = np.minimum(background, 1 - interior)
    return np.stack([background, interior, 1 - background - interior]).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 7.0])
def test_gaussian_matches_scipy_reflect(sigma):
    rng = np.random.default_rng(1)
    for shape in ((37, 53), (3, 5), (1, 9)):  # radius beyond the plane: reflected again
        x = rng.random(shape).astype(np.float32)
        np.testing.assert_allclose(gaussian_smooth(torch.from_numpy(x), sigma).numpy(),
                                   ndi.gaussian_filter(x, sigma), atol=1e-6)


def test_connected_components_match_ndimage_numbering():
    rng = np.random.default_rng(2)
    snake = np.zeros((31, 31), bool)
    snake[::4] = True
    for k, row in enumerate(range(0, 27, 4)):  # joined at alternate ends: one long path
        snake[row : row + 5, -1 if k % 2 == 0 else 0] = True
    for mask in (rng.random((120, 90)) > 0.45, snake, np.ones((7, 4), bool),
                 np.zeros((5, 5), bool), rng.random((1, 40)) > 0.5):
        ref, n = ndi.label(mask)
        got = connected_components(torch.from_numpy(mask)).numpy()
        np.testing.assert_array_equal(relabel_sequential(got)[0], ref)
        assert got.max() <= mask.size and (got[mask] > 0).all()
    assert ndi.label(snake)[1] == 1


@pytest.mark.parametrize("soft", [False, True])
def test_touching_disks_identical_to_reference(soft):
    _, labels = touching_disks((160, 200), seed=3)
    probs = _soft_probs(labels) if soft else np.stack(
        [labels == 0, (labels > 0) & ~find_boundaries(labels, mode="inner"),
         find_boundaries(labels, mode="inner") & (labels > 0)]).astype(np.float32)
    ref, got = _both(probs)
    assert got.max() == ref.max() == labels.max()
    np.testing.assert_array_equal(got, ref)


def test_distance_channel_seeds():
    _, labels = touching_disks((128, 160), seed=4)
    probs = _soft_probs(labels)
    dist = ndi.distance_transform_edt(labels > 0)
    dist = (dist / max(dist.max(), 1)).astype(np.float32)
    probs4 = np.concatenate([probs, dist[None]])
    for seeds in ("auto", "distance", "interior"):
        ref, got = _both(probs4, PostprocessConfig(seeds=seeds))
        assert match_instances(got, ref, 0.9)["ap"] >= 0.95 and got.max() == ref.max()
    with pytest.raises(ValueError, match="distance output"):
        instances_from_probs_torch(torch.from_numpy(probs), PostprocessConfig(seeds="mix"))
    with pytest.raises(ValueError, match="expected"):
        instances_from_probs_torch(torch.zeros(2, 4, 4))


def test_edge_cases_empty_full_single_pixels_min_size_and_holes():
    empty = np.zeros((3, 20, 30), np.float32)
    empty[0] = 1
    assert not _both(empty)[1].any()
    full = np.zeros((3, 20, 30), np.float32)
    full[1] = 1
    ref, got = _both(full)
    assert got.max() == 1 and (got == 1).all()
    np.testing.assert_array_equal(got, ref)
    dots = np.zeros((3, 15, 15), np.float32)
    dots[0] = 1
    for y, x in ((2, 2), (2, 9), (10, 5), (14, 14)):
        dots[:, y, x] = [0, 1, 0]
    for cfg, n in ((PostprocessConfig(min_size=0, min_seed_size=0, smooth_sigma=0), 4),
                   (PostprocessConfig(min_size=2, min_seed_size=0, smooth_sigma=0), 0)):
        ref, got = _both(dots, cfg)
        assert got.max() == n
        np.testing.assert_array_equal(got, ref)
    # A nucleus with a hole that holds a small object (kept) and a small object dropped
    # by min_size inside it (filled), the same as the reference.
    labels = np.zeros((60, 60), np.int32)
    labels[5:45, 5:45] = 1
    labels[15:30, 15:30] = 0
    labels[19:26, 19:26] = 2
    labels[50:53, 50:53] = 3
    probs = np.stack([labels == 0, labels > 0, np.zeros_like(labels)]).astype(np.float32)
    ref, got = _both(probs, PostprocessConfig(min_size=20, smooth_sigma=0))
    assert got.max() == 2 and got[16, 16] == 1 and got[22, 22] == 2
    np.testing.assert_array_equal(got, ref)
    ref, got = _both(probs, PostprocessConfig(min_size=20, smooth_sigma=0, fill_holes=False))
    assert got[16, 16] == 0
    np.testing.assert_array_equal(got, ref)


def test_real_crop_matches_reference_and_is_deterministic():
    from napari_unet.model import load_model
    from napari_unet.sample import load_sample

    image = load_sample()[0]
    probs = Predictor(load_model(), InferenceConfig(device="cpu")).predict(image)
    ref, got = _both(probs)
    assert ref.max() > 20
    assert match_instances(got, ref, 0.9)["ap"] >= 0.95 and got.max() == ref.max()
    again = instances_from_probs_torch(torch.from_numpy(probs))
    np.testing.assert_array_equal(got, again)


def test_post_device_setting_and_segment_wiring(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_post_device("auto", cpu) and resolve_post_device("auto", cuda)
    assert resolve_post_device("device", cpu) and not resolve_post_device("cpu", cuda)
    with pytest.raises(ValueError, match="post_device"):
        resolve_post_device("gpu", cpu)
    from napari_unet.model import load_model
    from napari_unet.sample import load_sample

    stack = np.stack([load_sample()[0], load_sample()[0][::-1]])
    predictor = Predictor(load_model(), InferenceConfig(device="cpu"))
    host, dev = PostprocessConfig(), PostprocessConfig(post_device="device")
    ref = drain(segment_image(stack, predictor, postprocess=host))
    inferred = drain(infer_plane(stack[0], predictor, dev))
    assert inferred.maps is None and inferred.labels.dtype == np.int32
    assert drain(infer_plane(stack[0], predictor, host)).labels is None
    for workers in (0, 2):
        out = drain(segment_image(stack, predictor, postprocess=dev, workers=workers))
        assert match_instances(out[1], ref[1], 0.9)["ap"] >= 0.95
        assert out.max() == ref.max()
    sem = PostprocessConfig(mode="semantic", post_device="device")
    semantic = PostprocessConfig(mode="semantic")
    np.testing.assert_array_equal(drain(segment_image(stack, predictor, postprocess=sem)),
                                  drain(segment_image(stack, predictor, postprocess=semantic)))

    # A backend lacking an operation: auto falls back to the host for good, "device" says so.
    def missing(*args, **kwargs):
        raise NotImplementedError("not on this backend")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("no memory left")

    monkeypatch.setattr(segment_mod, "resolve_post_device", lambda setting, device: True)
    monkeypatch.setattr(segment_mod, "instances_from_maps", out_of_memory)
    np.testing.assert_array_equal(drain(segment_image(stack, predictor, postprocess=host)),
                                  ref)  # auto: those planes on the host, the next tried again
    assert not predictor.post_device_failed
    monkeypatch.setattr(segment_mod, "instances_from_maps", missing)
    with pytest.raises(NotImplementedError):
        drain(segment_image(stack, predictor, postprocess=dev))
    out = drain(segment_image(stack, predictor, postprocess=host))
    np.testing.assert_array_equal(out, ref)
    assert predictor.post_device_failed


def test_cli_and_forms_offer_post_device():
    from napari_unet.cli import build_parser

    sub = build_parser()
    args = sub.parse_args(["segment", "x.tif", "--post-device", "device"])
    assert args.post_device == "device"
