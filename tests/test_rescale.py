"""Object size: planes of objects wider than the model's are shrunk, predicted, resized back."""

import numpy as np
import pytest
import torch
from skimage.draw import disk

from napari_unet import rescale
from napari_unet.model import load_model
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.tiling import drain
from napari_unet.train import TrainConfig, Trainer, TrainingPair


def _disks(radius, shape=(384, 384), seed=0):
    """Bright disks of one radius on noise, well apart, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    step = 3 * radius
    k = 1
    for cy in range(step // 2 + 4, shape[0] - radius - 4, step):
        for cx in range(step // 2 + 4, shape[1] - radius - 4, step):
            rr, cc = disk((cy, cx), radius, shape=shape)
            labels[rr, cc] = k
            k += 1
    image = (labels > 0) * 150.0 + rng.normal(30, 8, shape)
    return np.clip(image, 0, None).astype(np.uint16), labels


def _record_windows(*predictors):
    """A list that receives the shape of every plane these predictors' windows run on."""
    calls = []
    for p in predictors:
        def spy(x, wanted, original=p._window):
            calls.append(tuple(x.shape))
            return (yield from original(x, wanted))

        p._window = spy
    return calls


@pytest.fixture(scope="module")
def model():
    m = load_model()
    m.config.object_diameter = 32.0
    return m


def test_sizes_and_scales():
    _, labels = _disks(10)
    assert rescale.median_diameter(labels) == pytest.approx(20, rel=0.05)
    assert rescale.median_diameter(np.zeros((4, 4), np.int32)) is None
    shape = (1000, 1000)
    assert rescale.scale_for(None, 32, shape) == 1.0  # nothing measured
    assert rescale.scale_for(80, None, shape) == 1.0  # the model does not rescale
    assert rescale.scale_for(20, 32, shape) == 1.0  # small objects are never enlarged
    assert rescale.scale_for(64, 32, shape) == 0.5
    assert rescale.scale_for(1000, 32, shape) == rescale.MIN_SCALE
    assert rescale.scale_for(64, 32, (100, 1000)) == 0.64  # the plane stays >= MIN_SIDE


def test_resize_keeps_probabilities_and_means():
    probs = torch.softmax(torch.randn(3, 40, 50), 0)
    big = rescale.resize(probs, (80, 100))
    assert big.shape == (3, 80, 100)
    torch.testing.assert_close(big.sum(0), torch.ones(80, 100))
    flat = torch.full((1, 64, 64), 7.0)
    torch.testing.assert_close(rescale.resize(flat, (32, 32)), torch.full((1, 32, 32), 7.0))


def test_large_objects_are_measured_and_shrunk(model):
    small_img, _ = _disks(8)
    big_img, big_labels = _disks(36)
    predictor = Predictor(model, InferenceConfig(device="cpu"))
    assert predictor.measure_scale(small_img) == 1.0
    scale = predictor.measure_scale(big_img)
    assert 0.3 < scale < 0.6  # 72-px disks to the model's 32 px
    labels = drain(segment_image(big_img, predictor))
    assert labels.shape == big_img.shape
    from napari_unet.evaluate import match_instances

    assert match_instances(labels, big_labels)["ap"] > 0.9
    off = Predictor(model, InferenceConfig(device="cpu", rescale=False))
    assert off.measure_scale(big_img) == 1.0
    given = Predictor(model, InferenceConfig(device="cpu", object_diameter=64))
    calls = _record_windows(given)
    assert given.measure_scale(big_img) == 0.5 and calls == []  # no measuring pass
    drain(given.predict_iter(big_img))
    assert calls == [(1, 192, 192)]
    calls = _record_windows(predictor, predictor.ruler())  # the ruler measures
    wide = np.tile(big_img, (1, 3))  # 384 x 1152: measured on its central 384 x 1024
    drain(predictor.predict_iter(wide))
    assert calls[0] == (1, 192, 512) and 0.3 < calls[1][1] / 384 < 0.6
    assert predictor.measure_diameter(big_img) == pytest.approx(72, rel=0.15)


def test_a_model_without_an_object_size_never_resizes():
    plain = load_model()
    plain.config.object_diameter = None  # as in files written before the option
    big_img, _ = _disks(36)
    assert Predictor(plain, InferenceConfig(device="cpu")).measure_scale(big_img) == 1.0


def test_rescaled_pairs_keep_the_annotation_convention():
    _, labels = _disks(20, shape=(200, 160))
    ann = np.where(labels > 0, labels + 1, 1).astype(np.int32)
    ann[:20] = 0
    ann[10, :] = 1  # a 1-px background stroke on a row nearest neighbour never samples
    complete = np.zeros(labels.shape, bool)
    complete[100:] = True
    pair = TrainingPair(labels.astype(np.float32), ann, complete=complete, name="p")
    half = rescale.rescale_pair(pair, 0.5)
    assert half.image.shape == half.annotation.shape == half.complete.shape == (100, 80)
    assert set(np.unique(half.annotation)) <= set(np.unique(ann))
    assert half.complete.dtype == bool and half.complete[60:].all() and not half.complete[:40].any()
    assert (half.annotation[5] == 1).all()  # nearest neighbour alone would drop it
    assert rescale.rescale_pair(pair, 1.0) is pair


def test_training_sees_objects_at_the_size_segment_will(model):
    img, labels = _disks(36)
    ann = np.where(labels > 0, labels + 1, 1).astype(np.int32)
    pair = TrainingPair(img, ann, name="big")
    trainer = Trainer(model, [pair], TrainConfig(steps=1, device="cpu", tile=64,
                                                 batch_size=1, val_share=0))
    assert "trains on big to 0." in trainer.validation_note
    list(trainer.run())
    tuned = trainer.selected
    assert tuned.config.fit_diameter == pytest.approx(72, rel=0.15)
    assert model.config.fit_diameter is None  # the starting model is left as it was
    # The fine-tuned model resizes every plane by its fit diameter: no measuring pass.
    predictor = Predictor(tuned, InferenceConfig(device="cpu"))
    calls = _record_windows(predictor, predictor.ruler())
    small_img, _ = _disks(8)
    drain(predictor.predict_iter(small_img))
    assert len(calls) == 1 and calls[0][1] < 384  # shrunk by the fit diameter, unmeasured
    assert Predictor(model, InferenceConfig(device="cpu")).measure_scale(small_img) == 1.0
