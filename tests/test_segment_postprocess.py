import dask.array as da
import numpy as np
import pytest
import zarr

from _synthetic import touching_disks
from napari_unet.model import ModelFileError
from napari_unet.postprocess import PostprocessConfig, instances_from_probs, labels_from_probs
from napari_unet.segment import InferenceConfig, Predictor, segment, segment_image
from napari_unet.tiling import drain


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
