import time

import numpy as np
import torch

from _synthetic import touching_disks
from napari_unet.augment import AugmentConfig, augment_batch, elastic_deform, elastic_grid
from napari_unet.targets import IGNORE_INDEX, OUTSIDE_CELL


def _aligned_batch():
    _, labels = touching_disks((128, 128))
    target = torch.from_numpy(np.where(labels > 0, 1, 0)).long()[None]
    target[:, :, :10] = IGNORE_INDEX
    target[:, :, 10:20] = OUTSIDE_CELL
    # The image encodes the class exactly, so after warping the two must still agree.
    image = (target.float() * 100.0)[:, None]
    weight = torch.ones_like(target, dtype=torch.float32)
    return image, target, weight


def test_elastic_deformation_keeps_labels_aligned_with_image():
    image, target, weight = _aligned_batch()
    g = torch.Generator().manual_seed(1)
    grid = elastic_grid(1, (128, 128), alpha=10, grid=3, generator=g)
    im2, t2, w2 = elastic_deform(image, target, weight, grid)
    moved = (t2 != target).float().mean()
    assert moved > 0.02  # it really deformed
    inside = t2 != IGNORE_INDEX
    expected = (t2.float() * 100.0)[inside]
    got = im2[:, 0][inside]
    # Bilinear image vs nearest labels differ only on a 1-pixel rim of each edge.
    agree = (torch.abs(got - expected) < 50).float().mean()
    assert agree > 0.97
    assert set(torch.unique(t2).tolist()) == {OUTSIDE_CELL, IGNORE_INDEX, 0, 1}


def test_deformation_is_smooth_and_of_requested_size():
    g = torch.Generator().manual_seed(0)
    grid = elastic_grid(4, (96, 96), alpha=10, grid=3, generator=g)
    base = elastic_grid(4, (96, 96), alpha=0, grid=3)
    disp = (grid - base) * 47.5  # normalised -> pixels
    assert 2 < disp.abs().mean() < 20
    # Neighbouring pixels move almost together (no tearing).
    assert (disp[:, 1:] - disp[:, :-1]).abs().max() < 1.5


def test_augment_batch_shapes_and_label_values():
    image, target, weight = _aligned_batch()
    cfg = AugmentConfig()
    out = augment_batch(image.repeat(3, 1, 1, 1), target.repeat(3, 1, 1),
                        weight.repeat(3, 1, 1), cfg, out_size=64,
                        generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (3, 1, 64, 64) and out[1].shape == (3, 64, 64)
    assert set(torch.unique(out[1]).tolist()) <= {OUTSIDE_CELL, IGNORE_INDEX, 0, 1}
    assert out[1].dtype == torch.long


def test_augmentation_speed_is_reported(capsys):
    # Measured, not asserted: the figure goes to the benchmarks and the closing note.
    cfg = AugmentConfig()
    im = torch.rand(4, 1, 128 + 2 * cfg.margin, 128 + 2 * cfg.margin)
    tg = torch.zeros(4, *im.shape[2:], dtype=torch.long)
    wt = torch.ones(4, *im.shape[2:])
    augment_batch(im, tg, wt, cfg, 128)
    t0 = time.perf_counter()
    for _ in range(10):
        augment_batch(im, tg, wt, cfg, 128)
    ms = (time.perf_counter() - t0) / 10 * 1000
    print(f"augment batch of 4x128^2: {ms:.1f} ms")
    assert ms > 0
