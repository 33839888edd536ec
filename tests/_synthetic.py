"""Synthetic microscopy the tests make themselves: pairs of touching disks on noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk


def touching_disks(
    shape: tuple[int, int] = (256, 256),
    radius: int = 10,
    spacing: int = 50,
    seed: int = 0,
    dtype: type = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """An image of bright disks in touching pairs, and its instance labels (0 = background)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 1
    for cy in range(spacing // 2, shape[0] - radius, spacing):
        for cx in range(spacing // 2, shape[1] - 3 * radius, spacing):
            jy, jx = rng.integers(-4, 5, 2)
            for dx in (0, int(1.7 * radius)):
                rr, cc = disk((cy + jy, cx + jx + dx), radius, shape=shape)
                labels[rr, cc] = k
                k += 1
    image = (labels > 0) * 150.0 + rng.normal(30, 8, shape)
    return np.clip(image, 0, None).astype(dtype), labels


def sparse_annotation(labels: np.ndarray, n_cells: int, seed: int = 0) -> np.ndarray:
    """Paint ``n_cells`` cells (ids >= 2) and background strokes (1); the rest stays 0."""
    rng = np.random.default_rng(seed)
    ann = np.zeros(labels.shape, np.int32)
    ids = rng.permutation(np.unique(labels[labels > 0]))[:n_cells]
    for i, lab in enumerate(ids):
        ann[labels == lab] = i + 2
    bg = labels == 0
    for y in range(5, labels.shape[0], 40):
        row = ann[y : y + 3]
        row[bg[y : y + 3]] = 1
    # Background around the painted cells, so the model learns where each one ends.
    ring = ndi.binary_dilation(ann >= 2, iterations=4) & bg
    ann[ring] = 1
    return ann
