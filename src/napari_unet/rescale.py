"""Object size: planes whose objects are wider than the model's are shrunk before inference.

A U-Net sees a fixed window; the bundled model learnt nuclei of the sizes in DSB 2018.
Nuclei two to five times wider (GOWT1, NIH3T3 at their native pixel size) come out split
into several cells. Shrinking such a plane until its objects have the model's size
(``ModelConfig.object_diameter``), predicting, and resizing the maps back to the plane is
what Cellpose does with its diameter, and it costs less than predicting the full plane.

The objects' size is measured by a model: a pass at half size over the central
:data:`PROBE_SIDE`² window of the plane (its cost stays bounded however large the plane)
segments it coarsely; the median area of its objects (those cut by the window left out)
gives their diameter. Small objects merge at half size, which over-estimates them; the
decision it feeds is "shrink or not", so planes of small objects are left as they are. The
measuring model is the bundled one (``Predictor.ruler``). A fine-tuned model does not
measure: it keeps the diameter measured in the images it was fine-tuned on
(``ModelConfig.fit_diameter``; they were resized by it) and resizes every plane by it, so
it always sees objects at the size it was trained on; a measure from the few large nuclei
of a small crop scatters more than the model's tolerance (few-label benchmark: fine-tuned
NIH3T3 models lost 0.13 AP where each crop was measured). Scales are never above 1: small
objects are not enlarged (on the validation sets that lost more than it gained).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import clear_border

from .targets import BACKGROUND, UNLABELED

if TYPE_CHECKING:
    from .train import TrainingPair

PROBE_SCALE = 0.5  # the measuring pass runs at this scale
MIN_SCALE = 0.25  # planes are never shrunk more than this
MIN_SIDE = 64  # planes whose shorter side would drop below this are not shrunk
PROBE_SIDE = 1024  # the measuring pass sees the central window of this side (pixels)


def probe_window(shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The central window (at most PROBE_SIDE²) of a plane of ``shape`` that is measured."""
    out = []
    for n in shape[-2:]:
        side = min(n, PROBE_SIDE)
        start = (n - side) // 2
        out.append(slice(start, start + side))
    return out[0], out[1]


def median_diameter(labels: np.ndarray, cut: bool = False) -> float | None:
    """Equivalent diameter (pixels) of the median object of a label image; None if empty.

    ``cut``: the image is a window of a larger one, so objects touching its border may be
    parts of objects and are left out (unless nothing else is left)."""
    if cut:
        inner = clear_border(labels)
        labels = inner if inner.any() else labels
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return None
    return 2.0 * math.sqrt(float(np.median(counts)) / math.pi)


def scale_for(diameter: float | None, model_diameter: float | None,
              shape: tuple[int, ...]) -> float:
    """The factor a plane of ``shape`` is resized by so that objects of ``diameter`` have
    the model's size: in [MIN_SCALE, 1]; 1 when either is unknown or the plane is small."""
    if not diameter or not model_diameter or diameter <= model_diameter:
        return 1.0
    scale = max(model_diameter / diameter, MIN_SCALE, MIN_SIDE / min(shape[-2:]))
    return min(scale, 1.0)


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(h, w) of a plane of ``shape`` resized by ``scale``."""
    return max(round(shape[-2] * scale), 1), max(round(shape[-1] * scale), 1)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, H, W) images or maps to ``size``: area averaging when shrinking (no
    aliasing), bilinear when enlarging (maps back to the plane: probabilities stay ones)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2]
    out = F.interpolate(x[None].float(), size=size,
                        mode="area" if shrink else "bilinear",
                        align_corners=None if shrink else False)
    return out[0]


def rescale_pair(pair: TrainingPair, scale: float) -> TrainingPair:
    """A training pair resized by ``scale``: the image averaged, annotation and masks by
    nearest neighbour (ids and the 0/1/>=2 convention survive), painted background kept."""
    if scale == 1.0:
        return pair
    image = np.asarray(pair.image, np.float32)
    chw = image[None] if image.ndim == 2 else image
    size = scaled_size(chw.shape, scale)
    small = resize(torch.from_numpy(np.ascontiguousarray(chw)), size).numpy()

    def nearest(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        a = np.asarray(a)
        ys = np.minimum(((np.arange(size[0]) + 0.5) / scale).astype(int), a.shape[0] - 1)
        xs = np.minimum(((np.arange(size[1]) + 0.5) / scale).astype(int), a.shape[1] - 1)
        return a[np.ix_(ys, xs)]

    # Painted background is mostly thin strokes and rings around cells: nearest neighbour
    # drops much of it, and training then sees cells without the background between them
    # (few-label benchmark, NIH3T3 k = 20 shrunk to 0.31: AP 0.737 against 0.812 when
    # kept). A small pixel left unannotated is background where any painted background
    # falls in its footprint.
    ann = nearest(pair.annotation)
    painted_bg = resize(torch.from_numpy(
        (np.asarray(pair.annotation) == BACKGROUND).astype(np.float32))[None], size)[0]
    ann[(ann == UNLABELED) & (painted_bg.numpy() > 0)] = BACKGROUND
    return dataclasses.replace(
        pair, image=small[0] if image.ndim == 2 else small, annotation=ann,
        complete=nearest(pair.complete), edited=nearest(pair.edited),
        validation=nearest(pair.validation))
