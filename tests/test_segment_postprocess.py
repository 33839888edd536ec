import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from _synthetic import touching_disks
from napari_unet.model import ModelConfig, ModelFileError, UNet, activate
from napari_unet.normalize import normalize
from napari_unet.postprocess import PostprocessConfig, instances_from_probs, labels_from_probs
from napari_unet.segment import (
    InferenceConfig,
    Predictor,
    instance_channels,
    normalize_tensor,
    offset_ids,
    segment,
    segment_image,
    segment_plane,
)
from napari_unet.tiling import drain, drive


def _probs_from_labels(labels):
    """Ideal probabilities: interior, a boundary rim, background."""
    from skimage.segmentation import find_boundaries

    rim = find_boundaries(labels, mode="inner") & (labels > 0)
    probs = np.zeros((3, *labels.shape), np.float32)
    probs[0] = labels == 0
    probs[1] = (labels > 0) & ~rim
    probs[2] = rim
    return probs


def test_touching_cells_become_separate_instances():
    _, labels = touching_disks((128, 128))
    out = instances_from_probs(_probs_from_labels(labels))
    assert out.max() == labels.max()
    # Every true cell maps to exactly one predicted instance and vice versa.
    for lab in range(1, labels.max() + 1):
        assert len(np.unique(out[labels == lab])) == 1


def test_min_size_hole_filling_and_semantic():
    labels = np.zeros((40, 40), np.int32)
    labels[5:25, 5:25] = 1
    labels[30:32, 30:32] = 2  # 4 px: too small
    probs = _probs_from_labels(labels)
    probs[:, 14, 14] = [1, 0, 0]  # a hole
    out = instances_from_probs(probs, PostprocessConfig(min_size=10, min_seed_size=1))
    assert out.max() == 1 and out[14, 14] == 1
    sem = labels_from_probs(probs, PostprocessConfig(mode="semantic"))
    assert sem.dtype == np.uint8 and set(np.unique(sem)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="mode"):
        labels_from_probs(probs, PostprocessConfig(mode="blobs"))


@pytest.fixture(scope="module")
def model():
    from napari_unet.train import Trainer, TrainingPair
    from test_train import _config, _small_model

    image, labels = touching_disks((192, 192))
    from napari_unet.targets import instances_to_annotation

    t = Trainer(_small_model(), [TrainingPair(image, instances_to_annotation(labels))],
                _config(steps=80))
    for _ in t.run():
        pass
    return t.model


def test_stack_plane_by_plane_with_unique_ids_and_dask_zarr(model, tmp_path):
    planes = [touching_disks((96, 128), seed=s) for s in range(4)]
    stack = np.stack([p[0] for p in planes]).reshape(2, 2, 96, 128)  # T, Z, Y, X
    lazy = da.from_array(stack, chunks=(1, 1, 96, 128))
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=stack.shape,
                          chunks=(1, 1, 96, 128), dtype="int32")
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    progress = []
    gen = segment_image(lazy, predictor, out=out)
    while True:
        try:
            progress.append(next(gen))
        except StopIteration:
            break
    assert progress[-1].fraction == pytest.approx(1.0)
    result = out[:]
    assert result.shape == stack.shape and result.dtype == np.int32
    ids = [set(np.unique(result[t, z])) - {0} for t in range(2) for z in range(2)]
    assert all(len(s) >= 8 for s in ids)
    assert not set.intersection(*ids[:2])  # ids are unique across planes
    # Same result as segmenting one plane alone (up to the id offset).
    alone = segment(stack[1, 0], model, tile=64, overlap=32, device="cpu")
    np.testing.assert_array_equal(result[1, 0] > 0, alone > 0)


def test_channel_axis_and_channel_mismatch(model):
    img, _ = touching_disks((64, 64))
    two = np.stack([img, img], axis=0)  # C, Y, X
    with pytest.raises(ModelFileError, match="expects 1 channel"):
        segment(two, model, channel_axis=0, device="cpu")
    with pytest.raises(ValueError, match="channel axis must come before"):
        segment(np.stack([img, img], -1), model, channel_axis=2, device="cpu")
    with pytest.raises(ValueError, match="two spatial axes"):
        segment(np.zeros(10), model)
    one = segment(img[None], model, channel_axis=0, tile=64, overlap=32, device="cpu")
    assert one.shape == (64, 64)


def test_nan_input_and_cancel(model):
    img = np.ones((3, 64, 64), np.float32)
    img[1, 5, 5] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        segment(img, model, device="cpu")
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    calls = []
    out = drain(segment_image(np.ones((5, 64, 64)), predictor,
                              cancel=lambda: calls.append(1) or len(calls) > 3))
    assert out.shape == (5, 64, 64)


@pytest.mark.parametrize("precision", ["bf16"])
def test_fast_precision_keeps_accuracy_on_real_nuclei(precision):
    """channels_last + reduced-precision autocast (what ``auto`` picks on AMX CPUs and GPUs)
    segments the real sample as well as plain fp32."""
    from napari_unet.evaluate import evaluate_pair
    from napari_unet.model import bundled_model_path, load_model
    from napari_unet.sample import load_sample

    if not bundled_model_path().is_file():
        pytest.skip("bundled model not built")
    image, _, truth = load_sample()
    model = load_model()
    ref = segment(image, model, device="cpu", precision="fp32")
    fast = segment(image, model, device="cpu", precision=precision)
    agree = evaluate_pair(fast, ref)
    assert agree["ap"] > 0.9 and agree["pixel_iou"] > 0.97, agree
    ap_ref, ap_fast = evaluate_pair(ref, truth)["ap"], evaluate_pair(fast, truth)["ap"]
    assert abs(ap_fast - ap_ref) < 0.03, (ap_ref, ap_fast)


# ---- pipelined stack segmenter, per-plane function, host copies, device normalisation ----


def _serial_reference(stack, predictor, post):
    """Plane by plane with full float32 maps and post-processing in this thread (the path
    before pipelining), ids offset in plane order."""
    out, offset = np.zeros(stack.shape, np.int32), 0
    for i, plane in enumerate(stack):
        labels = labels_from_probs(predictor.predict(plane), post)
        if post.mode == "instances":
            labels, offset = offset_ids(labels, offset)
        out[i] = labels
    return out


@pytest.mark.parametrize("mode", ["instances", "semantic"])
def test_pipelined_stack_equals_serial_path(model, mode):
    stack = np.stack([touching_disks((96, 128), seed=s)[0] for s in range(5)])
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    post = PostprocessConfig(mode=mode)
    ref = _serial_reference(stack, predictor, post)
    assert ref.max() > (4 if mode == "instances" else 1)
    for workers in (0, 1, 3):
        out = drain(segment_image(stack, predictor, postprocess=post, workers=workers))
        np.testing.assert_array_equal(out, ref)
    probs = np.zeros((3, *stack.shape), np.float32)
    out = drain(segment_image(stack, predictor, postprocess=post, probabilities_out=probs,
                              workers=2))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_allclose(probs[:, 2], predictor.predict(stack[2]), atol=1e-6)


def test_stack_post_processed_on_the_device_equals_host_path(model):
    """post_device="device" (torch, here on the CPU): the device half hands back finished
    labels, equal to the scikit-image path's on these planes, ids unique over the stack."""
    stack = np.stack([touching_disks((96, 128), seed=s)[0] for s in range(4)])
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    ref = _serial_reference(stack, predictor, PostprocessConfig())
    assert ref.max() > 8
    for workers in (0, 2):
        out = drain(segment_image(stack, predictor, workers=workers,
                                  postprocess=PostprocessConfig(post_device="device")))
        np.testing.assert_array_equal(out, ref)


def test_pipelined_stack_in_a_process_pool(model):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stack = np.stack([touching_disks((64, 96), seed=s)[0] for s in range(3)])
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    ref = _serial_reference(stack, predictor, PostprocessConfig())
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        out = drain(segment_image(stack, predictor, executor=ex, workers=2))
        assert ex.submit(abs, -1).result() == 1  # the caller's pool stays open
    np.testing.assert_array_equal(out, ref)


def test_half_precision_host_maps_keep_labels_identical():
    """Instance post-processing gets P(interior) in float16 and P(background) in float32:
    labels identical to full float32 maps on real nuclei."""
    from napari_unet.model import load_model
    from napari_unet.sample import load_sample

    image = load_sample()[0]
    big = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    predictor = Predictor(load_model(), InferenceConfig(device="cpu"))
    for plane in (image, big):
        ref = labels_from_probs(predictor.predict(plane), PostprocessConfig())
        assert ref.max() > 20
        np.testing.assert_array_equal(drain(segment_plane(plane, predictor)), ref)
    maps = drain(predictor.predict_iter(image, channels=instance_channels(
        predictor.model_config, predictor.n_outputs)))
    assert maps[0].dtype == np.float32 and maps[1].dtype == np.float16 and 2 not in maps


def test_segment_plane_maps_and_cancel(model):
    img, _ = touching_disks((96, 96))
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    labels, maps = drain(segment_plane(img, predictor, return_maps=True))
    assert maps.shape == (3, 96, 96) and maps.dtype == np.float32
    np.testing.assert_array_equal(labels, instances_from_probs(maps))
    steps = []
    gen = segment_plane(img, predictor, cancel=lambda: len(steps) >= 1)
    assert drive(gen, steps.append) is None and len(steps) == 1


def test_cancel_keeps_every_inferred_plane(model):
    stack = np.stack([touching_disks((64, 64), seed=s)[0] for s in range(6)])
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, batch_size=1,
                                                 device="cpu"))
    seen = []

    def cancel():
        return len({p.plane for p in seen}) > 3  # while plane 3 is inferred

    gen = segment_image(stack, predictor, cancel=cancel, workers=2)
    out = drive(gen, seen.append)
    ref = _serial_reference(stack[:3], predictor, PostprocessConfig())
    np.testing.assert_array_equal(out[:3], ref)
    assert not out[3:].any()


def test_offset_ids():
    a = np.array([[0, 1], [2, 2]])
    out, nxt = offset_ids(a, 5)
    assert out.dtype == np.int32 and out.tolist() == [[0, 6], [7, 7]] and nxt == 7
    empty, same = offset_ids(np.zeros((2, 2), np.int32), 7)
    assert same == 7 and not empty.any()
    with pytest.raises(ValueError, match="int32"):
        offset_ids(a, 2**31 - 2)


def test_maps_from_logits_extra_channel_and_predictor_outputs(model):
    """A model with an extra (distance) output: softmax over the classes, sigmoid for the
    extra channel; instance post-processing gets it copied back too."""
    import copy
    import dataclasses

    config = dataclasses.replace(model.config, distance=True)
    logits = torch.randn(2, 4, 8, 8)
    maps = activate(config, logits)
    np.testing.assert_allclose(maps[:, :3].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(maps[:, 3], torch.sigmoid(logits[:, 3]), atol=1e-6)
    four = copy.deepcopy(model)
    four.config = config
    four.head = torch.nn.Conv2d(four.head.in_channels, 4, 1)
    predictor = Predictor(four, InferenceConfig(tile=64, overlap=32, device="cpu"))
    assert predictor.n_outputs == 4
    assert set(instance_channels(four.config, 4)) == {0, 1, 3}
    img, _ = touching_disks((64, 64))
    assert predictor.predict(img).shape == (4, 64, 64)
    labels = drain(segment_plane(img, predictor))
    assert labels.shape == (64, 64)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.uint32])
def test_device_normalisation_matches_host(dtype):
    rng = np.random.default_rng(0)
    for shape in [(1, 50, 70), (2, 1100, 1000)]:  # the second is subsampled
        high = 250 if dtype == np.uint8 else 60000
        img = rng.integers(0, high, shape).astype(dtype)
        if dtype == np.int16:
            img -= 20000
        ref = normalize(img)
        host = Predictor.__new__(Predictor)
        host.device = torch.device("cpu")
        dev = normalize_tensor(Predictor.upload(host, img), (1.0, 99.8)).numpy()
        np.testing.assert_allclose(dev, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        normalize_tensor(torch.tensor([1.0, float("nan")]), (1.0, 99.8))


def test_predictor_device_normalisation_path(model, monkeypatch):
    from napari_unet import segment as seg

    img, _ = touching_disks((80, 80))
    predictor = Predictor(model, InferenceConfig(tile=64, overlap=32, device="cpu"))
    ref = predictor.predict(img)
    predictor.normalize_on_device = True  # what CUDA/MPS do: staged upload, device percentiles
    monkeypatch.setattr(seg, "_STAGE_ON_CPU", True)
    for _ in range(2):  # the second plane reuses the staging buffer
        np.testing.assert_allclose(predictor.predict(img), ref, atol=1e-5)


def test_auto_tiling_defaults_and_explicit_values_win(model):
    from napari_unet.device import CPU_BATCH, CPU_TILE, auto_tiling

    cpu = torch.device("cpu")
    assert auto_tiling(cpu, 16) == (CPU_TILE, CPU_BATCH)
    assert auto_tiling(cpu, 16, 128, 2) == (128, 2)
    p = Predictor(model, InferenceConfig(device="cpu"))
    assert (p.tile, p.batch_size) == (CPU_TILE, CPU_BATCH)
    p = Predictor(model, InferenceConfig(tile=64, batch_size=7, device="cpu"))
    assert (p.tile, p.batch_size) == (64, 7)


def test_staged_upload_reuses_its_buffer(model, monkeypatch):
    """CUDA's upload path (one reused staging buffer, bits of the plane's own dtype), run
    unpinned on the CPU: exact values for each dtype, the buffer grows only when needed."""
    from napari_unet import segment as seg

    monkeypatch.setattr(seg, "_STAGE_ON_CPU", True)
    predictor = Predictor(model, InferenceConfig(device="cpu"))
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 65535, (1, 40, 50)).astype(np.uint16),
              rng.random((1, 20, 30)) > 0.5,
              rng.normal(size=(2, 30, 30)),
              rng.integers(0, 2**32 - 1, (1, 10, 10), dtype=np.uint64).astype(">u4")]
    sizes = []
    for plane in planes:
        got = predictor.upload(plane).numpy()
        np.testing.assert_array_equal(got, plane.astype(np.float32))
        sizes.append(predictor._pinned.numel())
    assert sizes[1] == sizes[0] and sizes[2] > sizes[0]  # reused, then grown


def test_flip_averaging_is_the_mean_of_four_mirrored_passes_and_mirror_equivariant():
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=2, base_channels=4))
    x = torch.rand(2, 1, 32, 32)
    plain = Predictor(model, InferenceConfig(device="cpu", precision="fp32"))
    tta = Predictor(model, InferenceConfig(device="cpu", precision="fp32", tta=True))
    manual = sum(plain(x.flip(d)).flip(d) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    torch.testing.assert_close(tta(x), manual)
    for dims in ((-1,), (-2,), (-2, -1)):
        torch.testing.assert_close(tta(x.flip(dims)), tta(x).flip(dims), atol=1e-5, rtol=1e-5)
    # An untrained net is not mirror-symmetric: the averaging is what makes it so.
    assert not torch.allclose(plain(x.flip(-1)), plain(x).flip(-1), atol=1e-3)
    # Probabilities stay probabilities; channels select after averaging.
    torch.testing.assert_close(tta(x).sum(1), torch.ones(2, 32, 32))
    torch.testing.assert_close(tta(x, channels=[1]), tta(x)[:, [1]])
