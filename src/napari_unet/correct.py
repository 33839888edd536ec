"""Correct a segmentation instead of painting from scratch.

The plugin's labels use ``0`` = background and ``1..N`` = cells; an annotation uses ``0`` =
not annotated, ``1`` = background, ``>= 2`` = cells (see :mod:`targets`).
:func:`labels_to_annotation` converts labels inside a region (whole image, one plane of a
stack, or rectangles) into an annotation plus the mask of the region it fully annotates.

The editing operations (:func:`delete_object`, :func:`merge_objects`, :func:`split_object`,
:func:`paint_cell`) are pure: they take a 2D annotation and return a new one with an
:class:`Edit` saying which pixels the user's correction touched. Accumulating those in an
*edited* mask lets training weigh the user's corrections above the untouched predictions
(``TrainingPair.edited`` and ``TrainConfig.edited_weight``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import line as draw_line

from .targets import BACKGROUND, FIRST_CELL, UNLABELED, check_label_dtype

Point = Sequence[float]  # (y, x) in pixels, as napari gives a click position


@dataclass
class Edit:
    """The result of one correction: the new annotation and the pixels it concerned."""

    annotation: np.ndarray
    changed: np.ndarray  # bool (H, W): pixels of every object the edit touched
    label: int = 0  # the id the edit produced or kept (0 for a deletion)


# ---- labels -> annotation ------------------------------------------------------------------


def rectangles_to_mask(shape: tuple[int, ...], rectangles: Iterable[np.ndarray]) -> np.ndarray:
    """Bool mask of the last two axes of ``shape`` covered by axis-aligned rectangles.

    Each rectangle is given by its corners (an (n, 2) or (n, D) array whose last two columns
    are y, x, as in a napari Shapes layer) or as ``(y0, x0, y1, x1)``.
    """
    h, w = shape[-2:]
    mask = np.zeros((h, w), bool)
    for rect in rectangles:
        r = np.asarray(rect, float)
        if r.ndim == 1 and r.size == 4:
            ys, xs = r[[0, 2]], r[[1, 3]]
        elif r.ndim == 2 and r.shape[1] >= 2:
            ys, xs = r[:, -2], r[:, -1]
        else:
            raise ValueError(
                f"a rectangle must be (y0, x0, y1, x1) or an array of corners (n, 2), got "
                f"shape {r.shape}"
            )
        y0, y1 = int(np.clip(np.floor(ys.min()), 0, h)), int(np.clip(np.ceil(ys.max()), 0, h))
        x0, x1 = int(np.clip(np.floor(xs.min()), 0, w)), int(np.clip(np.ceil(xs.max()), 0, w))
        mask[y0:y1, x0:x1] = True
    return mask


def labels_to_annotation(
    labels: np.ndarray,
    region: np.ndarray | None = None,
    *,
    plane: tuple[int, ...] | None = None,
    base: np.ndarray | None = None,
    grow_to_cells: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0 background, 1..N cells) -> ``(annotation, complete)`` inside a region.

    ``region``: bool mask over the last two axes (e.g. :func:`rectangles_to_mask`) or of
    ``labels``' full shape; default the whole image. ``plane``: index of one plane of a stack
    (the leading axes), e.g. ``(12,)`` for the slice on screen; other planes stay
    unannotated. With ``grow_to_cells`` the region grows to hold every cell it cuts, so no
    cell gets a false edge at the region's border. ``base``: an existing annotation to add
    to; its painted pixels win and new cells get ids above its largest.

    Returns the annotation (int32; cells keep their own ids, shifted to >= 2) and ``complete``
    (bool), the region the annotation now fully describes, both of ``labels``' shape.
    """
    labels = np.asarray(labels)
    check_label_dtype(labels.dtype)
    if labels.ndim < 2:
        raise ValueError(f"labels must be at least 2D (Y, X), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background, 1..N = cells)")
    if base is not None and base.shape != labels.shape:
        raise ValueError(
            f"the annotation to add to has shape {base.shape}, the labels {labels.shape}; "
            "convert labels of the same image"
        )
    mask = np.ones(labels.shape, bool) if region is None else np.asarray(region, bool)
    if mask.shape == labels.shape[-2:] and labels.ndim > 2:
        mask = np.broadcast_to(mask, labels.shape)
    if mask.shape != labels.shape:
        raise ValueError(
            f"region shape {mask.shape} matches neither the labels {labels.shape} nor their "
            f"last two axes {labels.shape[-2:]}"
        )
    if plane is not None:
        plane = tuple(plane)
        if len(plane) != labels.ndim - 2:
            raise ValueError(
                f"plane {plane} must index the {labels.ndim - 2} leading axes of labels of "
                f"shape {labels.shape}"
            )
        only = np.zeros(labels.shape, bool)
        only[plane] = True
        mask = mask & only
    mask = np.array(mask)  # writable, own memory
    if grow_to_cells:
        # Per plane: cells are 2D objects for training, and ids may repeat across planes.
        for key in np.ndindex(labels.shape[:-2]):
            m, lab = mask[key], labels[key]
            if m.any():
                cut = np.unique(lab[m & (lab > 0)])
                m |= np.isin(lab, cut[cut > 0])

    ann = np.zeros(labels.shape, np.int32) if base is None else np.array(base, np.int32)
    offset = FIRST_CELL - 1 if base is None else max(int(ann.max()), BACKGROUND) - BACKGROUND + 1
    new = np.where(labels > 0, labels.astype(np.int64) + offset, BACKGROUND)
    if new.size and new.max() > np.iinfo(np.int32).max:
        raise ValueError("too many label ids to convert into an int32 annotation")
    free = mask if base is None else mask & (ann == UNLABELED)
    ann[free] = new[free]
    return ann, mask


# ---- edits ---------------------------------------------------------------------------------


def _check_2d(annotation: np.ndarray) -> np.ndarray:
    annotation = np.asarray(annotation)
    check_label_dtype(annotation.dtype)
    if annotation.ndim != 2:
        raise ValueError(
            f"edits work on one 2D plane, got shape {annotation.shape}; pass the plane on "
            "screen, e.g. annotation[z]"
        )
    return annotation


def _object_at(annotation: np.ndarray, point: Point, what: str) -> int:
    y, x = (int(round(float(v))) for v in point[-2:])
    h, w = annotation.shape
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"{what}: point ({y}, {x}) is outside the image ({h} x {w})")
    label = int(annotation[y, x])
    if label < FIRST_CELL:
        kind = "background" if label == BACKGROUND else "not annotated"
        raise ValueError(f"{what}: no cell at ({y}, {x}) (the pixel is {kind}); click on a cell")
    return label


def next_free_id(annotation: np.ndarray) -> int:
    """The smallest cell id above every id in use (at least :data:`FIRST_CELL`)."""
    return max(int(np.max(annotation, initial=0)) + 1, FIRST_CELL)


def delete_object(annotation: np.ndarray, point: Point) -> Edit:
    """The cell under ``point`` becomes painted background (a false positive corrected)."""
    ann = _check_2d(annotation)
    label = _object_at(ann, point, "delete")
    changed = ann == label
    out = ann.copy()
    out[changed] = BACKGROUND
    return Edit(out, changed, 0)


def merge_objects(annotation: np.ndarray, a: Point, b: Point, gap: int = 2) -> Edit:
    """Merge the cell under ``b`` into the cell under ``a`` (an over-split cell corrected).

    Background pixels in the thin seam between the two (up to ``gap`` px wide, which is
    where the model drew their border) join the merged cell.
    """
    ann = _check_2d(annotation)
    la, lb = _object_at(ann, a, "merge"), _object_at(ann, b, "merge")
    if la == lb:
        return Edit(ann.copy(), ann == la, la)
    union = (ann == la) | (ann == lb)
    if gap > 0:
        closed = ndi.binary_closing(np.pad(union, gap + 1), np.ones((3, 3), bool),
                                    iterations=gap)
        closed = closed[gap + 1 : -gap - 1, gap + 1 : -gap - 1]
        union |= closed & ((ann == BACKGROUND) | (ann == UNLABELED))
    out = ann.copy()
    out[union] = la
    return Edit(out, union, la)


def split_object(annotation: np.ndarray, polyline: Sequence[Point]) -> Edit:
    """Cut the cell crossed by a drawn line (two or more (y, x) vertices) in two or more.

    The largest piece keeps the cell's id, the others get new ids; the pixels under the
    line go to the nearest piece, so the pieces touch (the model learns a border there).
    """
    ann = _check_2d(annotation)
    pts = np.asarray(polyline, float)
    if pts.ndim != 2 or len(pts) < 2 or pts.shape[1] < 2:
        raise ValueError("split: draw a line of at least two points across the cell")
    pts = np.round(pts[:, -2:]).astype(int)
    h, w = ann.shape
    rr, cc = [], []
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:], strict=True):
        r, c = draw_line(y0, x0, y1, x1)
        rr.append(r)
        cc.append(c)
    r, c = np.concatenate(rr), np.concatenate(cc)
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    r, c = r[inside], c[inside]
    on_line = ann[r, c]
    cells = on_line[on_line >= FIRST_CELL]
    if cells.size == 0:
        raise ValueError("split: the line crosses no cell; draw it across the cell to cut")
    label = int(np.bincount(cells).argmax())  # the cell the line crosses most
    full = ann == label
    box = ndi.find_objects(full.astype(np.uint8))[0]
    obj = full[box]
    cut = np.zeros(ann.shape, bool)
    cut[r, c] = True
    pieces, n = ndi.label(obj & ~cut[box])  # 4-connected: an 8-connected line separates them
    if n < 2:
        raise ValueError(
            f"split: the line does not cut cell {label} in two; draw it from edge to edge"
        )
    sizes = np.bincount(pieces.ravel())[1:]
    order = np.argsort(-sizes) + 1
    out = ann.copy()
    new_id = next_free_id(ann)
    ids = np.zeros(n + 1, np.int64)
    ids[order[0]] = label
    ids[order[1:]] = np.arange(new_id, new_id + n - 1)
    # Line pixels of the cell join the nearest piece.
    nearest = ndi.distance_transform_edt(pieces == 0, return_distances=False,
                                         return_indices=True)
    filled = pieces[tuple(nearest)]
    out[box][obj] = ids[filled[obj]]
    return Edit(out, full, label)


def paint_cell(annotation: np.ndarray, mask: np.ndarray, label: int | None = None) -> Edit:
    """Paint a missed cell (bool ``mask``) with the next free id (or ``label``)."""
    ann = _check_2d(annotation)
    mask = np.asarray(mask, bool)
    if mask.shape != ann.shape:
        raise ValueError(f"paint: mask shape {mask.shape} does not match the annotation "
                         f"{ann.shape}")
    if not mask.any():
        raise ValueError("paint: the mask is empty; paint the cell's pixels")
    label = next_free_id(ann) if label is None else int(label)
    if label < FIRST_CELL:
        raise ValueError(f"paint: cell ids start at {FIRST_CELL}, got {label}")
    out = ann.copy()
    out[mask] = label
    return Edit(out, mask.copy(), label)


def edited_objects(annotation: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Grow an edited-pixel mask to whole cells: any cell with an edited pixel counts.

    Weighting whole corrected cells (not only the brushed pixels) keeps a cell's interior and
    its rim equally important, which is what separates it from its neighbours.
    """
    annotation, edited = np.asarray(annotation), np.asarray(edited, bool)
    if edited.shape != annotation.shape:
        raise ValueError(f"edited mask shape {edited.shape} does not match the annotation "
                         f"{annotation.shape}")
    touched = np.unique(annotation[edited & (annotation >= FIRST_CELL)])
    return edited | np.isin(annotation, touched)
