"""Huge planes block by block: memory bounded by a block, not by the plane.

A whole-slide plane (say 12 000 x 12 000) held whole costs ~46 bytes per pixel during
segmentation (float32 class probabilities, blending buffers, the watershed's arrays): 6.6 GB.
:func:`segment_plane_blocks` cuts the plane into square *cores* of ``block`` pixels, reads
each core with ``halo`` pixels of context on every side (only that window is read from a
lazy zarr/dask plane), predicts and post-processes the window alone, and keeps:

- semantic labels: the core's pixels;
- instances: every object whose *anchor* (the top-left corner of its bounding box, in plane
  coordinates) lies in the core, whole, even where it reaches into a neighbouring core.
  Two neighbouring windows see an object near their common border identically (both hold it
  with its context), so exactly one of them owns it: objects are never split or duplicated
  at block borders, without any merge pass.

That holds when ``halo`` covers the model's context (prediction near a window edge sees
mirrored pixels instead of the plane's) plus the largest object; objects reaching past the
halo are still written whole as far as their window goes, and counted in
:attr:`BlockProgress.cut_objects`. Intensities are normalised with the *plane's* percentile
range (one strided sample), as whole-plane inference does, not per block.

Ids are 1..N in the order blocks are visited (row by row), then by id within a block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .normalize import _MAX_SAMPLES, check_finite, normalize, percentile_range
from .postprocess import PostprocessConfig, labels_from_probs, recommended
from .tiling import sliding_window_iter

__all__ = ["DEFAULT_BLOCK", "DEFAULT_HALO", "PLANE_BUDGET_PIXELS", "BlockProgress",
           "needs_blocks", "segment_plane_blocks"]

# A 2048-pixel core with a 128-pixel halo is a 2304^2 window: ~0.35 GB while it is
# segmented, and 27 % more pixels predicted than the plane itself.
DEFAULT_BLOCK = 2048
# The bundled model's context plus the largest nuclei (~60 px) at their usual scale.
DEFAULT_HALO = 128
# Planes above this are worth cutting: 4096^2 held whole is ~0.8 GB (46 bytes per pixel).
PLANE_BUDGET_PIXELS = 4096 * 4096


def needs_blocks(shape: tuple[int, ...], budget_pixels: int | None = None) -> bool:
    """Whether a plane of this shape ((H, W) or (C, H, W)) exceeds the in-memory budget
    (default :data:`PLANE_BUDGET_PIXELS`)."""
    budget = PLANE_BUDGET_PIXELS if budget_pixels is None else budget_pixels
    return int(shape[-2]) * int(shape[-1]) > budget


@dataclass
class BlockProgress:
    """Blocks done (fractional within the current one) out of the total."""

    block: int
    n_blocks: int
    tiles_done: int
    tiles_total: int
    elapsed: float
    cut_objects: int = 0  # objects larger than the halo allows (may be cut at a window edge)

    @property
    def fraction(self) -> float:
        return (self.block + self.tiles_done / max(self.tiles_total, 1)) / max(self.n_blocks, 1)


def _value_range(plane: Any, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The plane's percentile range from one strided sample (never the whole lazy plane)."""
    if isinstance(plane, np.ndarray):
        return percentile_range(plane, percentiles)  # exactly what whole-plane inference uses
    h, w = plane.shape[-2:]
    step = max(1, math.ceil(math.sqrt(h * w / _MAX_SAMPLES)))
    sample = np.asarray(plane[..., ::step, ::step])
    return percentile_range(sample, percentiles)


def _window(start: int, stop: int, halo: int, size: int) -> tuple[int, int]:
    return max(start - halo, 0), min(stop + halo, size)


def segment_plane_blocks(
    plane: Any,
    predictor: Any,
    postprocess: PostprocessConfig | None = None,
    block: int = DEFAULT_BLOCK,
    halo: int = DEFAULT_HALO,
    *,
    out: Any | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Generator[BlockProgress, None, Any]:
    """Segment one (H, W) or (C, H, W) plane block by block; yields progress, returns labels.

    Args:
        plane: numpy, zarr or dask array (channels first); only windows are read.
        predictor: a :class:`napari_unet.segment.Predictor` (its tiling settings, model and
            device are used; normalisation is done here, plane-wide).
        postprocess: instances (objects merged across blocks, see the module doc) or
            semantic classes.
        block: core side in pixels; the window is ``block + 2 * halo`` at most.
        halo: context on each side: at least the model's context plus the largest object.
        out: (H, W) integer array to write into (e.g. an on-disk zarr array, for memory
            bounded by a block even for the labels); default a new int32 numpy array.
        cancel: polled between tile batches; on cancel the blocks done so far are kept.
    """
    post = postprocess or recommended(predictor.model_config.postprocess)
    if block <= 0 or halo < 0:
        raise ValueError(f"block must be positive and halo at least 0, got {block}, {halo}")
    shape = tuple(int(s) for s in plane.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected an (H, W) or (C, H, W) plane, got shape {shape}")
    h, w = shape[-2:]
    if out is None:
        out = np.zeros((h, w), np.int32 if post.mode == "instances" else np.uint8)
    elif tuple(out.shape) != (h, w):
        raise ValueError(f"out has shape {tuple(out.shape)}, the plane is {(h, w)}")
    mc, c = predictor.model_config, predictor.config
    value_range = _value_range(plane, tuple(mc.norm_percentiles))
    cores = [(y, x) for y in range(0, h, block) for x in range(0, w, block)]
    start, next_id, cut = time.perf_counter(), 1, 0
    for b, (y0, x0) in enumerate(cores):
        y1, x1 = min(y0 + block, h), min(x0 + block, w)
        (wy0, wy1), (wx0, wx1) = _window(y0, y1, halo, h), _window(x0, x1, halo, w)
        raw = np.asarray(plane[..., wy0:wy1, wx0:wx1])
        check_finite(raw, f"block at ({y0}, {x0}) of the plane")
        norm = normalize(raw if raw.ndim == 3 else raw[None], value_range=value_range)
        del raw
        gen = sliding_window_iter(norm, predictor, tile=predictor.tile, overlap=c.overlap,
                                  margin=c.margin, batch_size=predictor.batch_size,
                                  blend=c.blend, divisor=mc.divisor, device=predictor.device)
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                probs = stop.value
                break
            yield BlockProgress(b, len(cores), done, total, time.perf_counter() - start, cut)
            if cancel is not None and cancel():
                gen.close()
                return out
        del norm
        labels = labels_from_probs(probs, post)
        del probs
        if post.mode != "instances":
            out[y0:y1, x0:x1] = labels[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
            continue
        next_id, n_cut = _keep_owned(labels, out, (y0, y1, x0, x1), (wy0, wy1, wx0, wx1),
                                     (h, w), next_id)
        cut += n_cut
    yield BlockProgress(len(cores), len(cores), 0, 0, time.perf_counter() - start, cut)
    return out


def _keep_owned(labels: np.ndarray, out: Any, core: tuple[int, int, int, int],
                window: tuple[int, int, int, int], size: tuple[int, int],
                next_id: int) -> tuple[int, int]:
    """Write the window's objects anchored in the core into ``out`` with new ids; returns
    the next free id and how many of them touch a window edge inside the plane."""
    y0, y1, x0, x1 = core
    wy0, wy1, wx0, wx1 = window
    h, w = size
    slices = ndi.find_objects(labels)
    lut = np.zeros(len(slices) + 1, np.int64)
    cut = 0
    for i, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        ay, ax = sl[0].start + wy0, sl[1].start + wx0
        if not (y0 <= ay < y1 and x0 <= ax < x1):
            continue
        lut[i] = next_id
        next_id += 1
        # Touching a window edge that is not the plane's edge: the object may go on.
        cut += ((sl[0].start == 0 and wy0 > 0) or (sl[0].stop == labels.shape[0] and wy1 < h)
                or (sl[1].start == 0 and wx0 > 0) or (sl[1].stop == labels.shape[1] and wx1 < w))
    if next_id - 1 > np.iinfo(out.dtype).max:
        raise ValueError(f"{next_id - 1} objects do not fit in the output dtype {out.dtype}")
    owned = lut[labels]
    region = np.asarray(out[wy0:wy1, wx0:wx1])
    # A neighbour's object already written keeps its pixels (the two windows only disagree
    # where one of them lacks context, i.e. with too small a halo).
    take = (owned > 0) & (region == 0)
    if take.any():
        region = region.copy() if not region.flags.writeable else region
        region[take] = owned[take]
        out[wy0:wy1, wx0:wx1] = region
    return next_id, int(cut)
