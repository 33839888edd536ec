"""Sparse annotations -> per-pixel training targets and the U-Net border weight map.

Annotation convention (one label image per image plane):

* ``0`` — not annotated: ignored by the loss,
* ``1`` (:data:`BACKGROUND`) — painted background,
* ``>= 2`` — one value per cell instance.

Inside regions declared *fully annotated* (``complete``), unpainted pixels count as background.
The unpainted pixels right next to a painted cell are not ignored: each is background or the
rim of a touching cell, never cell interior, and is trained as such (:data:`OUTSIDE_CELL`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential

UNLABELED = 0
BACKGROUND = 1
FIRST_CELL = 2
IGNORE_INDEX = -1
# Target of an unpainted pixel next to a painted cell: "background or boundary, not interior"
# (a partial label). Without it, cells painted whole with background painted only in the
# open make fine-tuning grow cells into their unpainted neighbours (dense tissue nuclei,
# 20 painted cells, raw fine-tuned weights: AP 0.57 -> 0.53 without, 0.60 with).
OUTSIDE_CELL = -2
# Target classes, in the order of model.CLASSES.
BG, INTERIOR, BOUNDARY = 0, 1, 2


def check_label_dtype(dtype: np.dtype) -> None:
    """Annotations are integer label images."""
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)):
        raise ValueError(
            f"annotation must hold integer labels, got dtype {dtype}; paint it in a "
            "napari Labels layer or convert it with .astype(int)"
        )


def check_annotation(annotation: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError for annotations that cannot be used for training."""
    check_label_dtype(annotation.dtype)
    if shape is not None and annotation.shape != tuple(shape):
        raise ValueError(
            f"annotation shape {annotation.shape} does not match image shape {tuple(shape)}; "
            "the annotation must cover the image pixel for pixel"
        )
    if annotation.size and annotation.min() < 0:
        raise ValueError("annotation labels must be >= 0 (0 = not annotated, 1 = background)")


def instances_to_annotation(labels: np.ndarray) -> np.ndarray:
    """Full ground-truth instance labels (0 = background) -> fully painted annotation."""
    out = labels.astype(np.int32) + (FIRST_CELL - 1)
    out[labels == 0] = BACKGROUND
    return out


def border_weights(cells: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` for every pixel.

    ``d1``/``d2`` are the distances to the nearest and second-nearest cell. Each cell's
    distance transform is computed only in its bounding box grown by the distance beyond
    which the term is negligible, so the cost grows with the number of cells, not pixels^2.
    """
    reach = int(np.ceil(3 * sigma))
    d1 = np.full(cells.shape, np.inf, np.float32)
    d2 = np.full(cells.shape, np.inf, np.float32)
    for lab, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        box = tuple(
            slice(max(s.start - reach, 0), min(s.stop + reach, n))
            for s, n in zip(sl, cells.shape, strict=True)
        )
        dist = ndi.distance_transform_edt(cells[box] != lab).astype(np.float32)
        a, b = d1[box], d2[box]
        closer = dist < a
        b[...] = np.where(closer, a, np.minimum(b, dist))
        a[...] = np.where(closer, dist, a)
    total = d1 + d2
    out = np.zeros(cells.shape, np.float32)
    finite = np.isfinite(total)
    out[finite] = w0 * np.exp(-(total[finite] ** 2) / (2 * sigma**2))
    return out


def painted_cells(annotation: np.ndarray) -> np.ndarray:
    """Instance labels 1..N of the painted cells of a 2D annotation (0 elsewhere).

    Each connected painted region is its own object, even where a value is reused in two
    places.
    """
    cell_values = np.where(annotation >= FIRST_CELL, annotation, 0)
    cells, _ = ndi.label(cell_values > 0)
    cells = np.where(cells > 0, cell_values.astype(np.int64) * (cells.max() + 1) + cells, 0)
    return relabel_sequential(cells)[0].astype(np.int32)


def distance_target(cells: np.ndarray) -> np.ndarray:
    """Each cell pixel's distance to the cell's edge over the cell's largest such distance.

    1 at a cell's most interior pixel, falling towards its edge, 0 outside cells. The
    normalisation makes the map's cores the same for small and large cells, so one level
    seeds one cell whatever its size; where two cells touch it falls to the edge value.
    """
    out = np.zeros(cells.shape, np.float32)
    for lab, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        # Pad by one so a cell touching the crop edge still gets an edge there.
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                    for s, n in zip(sl, cells.shape, strict=True))
        mask = cells[box] == lab
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].astype(np.float32)
        top = dist.max()
        if top > 0:
            out[box][mask] = dist[mask] / top
    return out


def make_targets(
    annotation: np.ndarray,
    complete: np.ndarray | None = None,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    max_class_weight: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Class targets (``-1`` = ignore) and per-pixel loss weights for one 2D annotation.

    Classes: background, cell interior, cell boundary (the inner rim of each painted cell,
    so touching cells are separated by two boundary pixels), and :data:`OUTSIDE_CELL` on the
    unpainted pixels bordering a painted cell (weighted as background). Weights combine
    class-frequency balancing (median-frequency, capped) with the border term between nearby
    cells.
    """
    check_annotation(annotation)
    if annotation.ndim != 2:
        raise ValueError(f"make_targets takes a 2D annotation, got shape {annotation.shape}")
    annotation = np.asarray(annotation)
    background = annotation == BACKGROUND
    if complete is not None:
        background |= np.asarray(complete, bool) & (annotation == UNLABELED)
    cells = painted_cells(annotation)

    target = np.full(annotation.shape, IGNORE_INDEX, np.int64)
    target[background] = BG
    target[cells > 0] = INTERIOR
    target[find_boundaries(cells, mode="inner") & (cells > 0)] = BOUNDARY
    target[ndi.binary_dilation(cells > 0) & (target == IGNORE_INDEX)] = OUTSIDE_CELL

    counts = np.bincount(target[target >= 0], minlength=3).astype(np.float64)
    present = counts > 0
    freq = counts / max(counts.sum(), 1)
    class_w = np.zeros(3)
    class_w[present] = np.minimum(np.median(freq[present]) / freq[present], max_class_weight)
    weight = np.zeros(annotation.shape, np.float32)
    valid = target >= 0
    weight[valid] = class_w[target[valid]]
    outside = target == OUTSIDE_CELL
    # Weighted as background, or as the boundary where no background is painted at all.
    weight[outside] = class_w[BG] if present[BG] else class_w[BOUNDARY]
    valid |= outside
    if cells.max() > 1 and w0 > 0:
        # Only between cells (background and rims): this is what teaches the model to
        # keep a gap where two cells touch.
        between = valid & (target != INTERIOR)
        weight[between] += border_weights(cells, w0, sigma)[between]
    return target, weight
