"""Overlap-tile inference (the U-Net paper's strategy) as one pure function.

The plane is mirror-padded, cut into overlapping tiles whose offsets are multiples of the
model's pooling divisor, predicted in batches, and blended: each tile's outer ``margin``
pixels (where the model lacks context) get weight 0, then the weight ramps up smoothly over
the rest of the overlap. With ``margin`` at least the receptive-field radius, the result
equals whole-image prediction of the same mirror-padded plane up to float rounding.

Everything after the plane's upload stays on the device: mirror padding is one reflect-pad
kernel (a gather by cached indices for planes narrower than the margin), each batch of tiles
is cut in one stack of strided views, and on accelerators blended back with one
``index_add_`` on a flat buffer (a handful of kernels per batch instead of several per tile;
CPUs, with no launch cost, add tile by tile). The window sum is computed once per geometry.
On CUDA, ``index_add_`` adds in an unspecified order, so results may differ between runs in
the last bits of a float.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

BLEND_MODES = ("cosine", "linear", "constant")
T = TypeVar("T")
Predictor = Callable[[torch.Tensor], torch.Tensor]


def _positions(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / step) + 1
    pos = [i * step for i in range(n - 1)] + [length - tile]
    return sorted(set(pos))


def blend_window(tile: int, margin: int, ramp: int, mode: str = "cosine") -> np.ndarray:
    """1D tile weight: 0 on the outer ``margin``, rising over ``ramp`` pixels, then 1."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {mode!r}")
    w = np.ones(tile, np.float32)
    w[:margin] = 0
    w[tile - margin :] = 0
    if mode != "constant" and ramp > 0:
        t = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        rise = t if mode == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)
        w[margin : margin + ramp] = rise
        w[tile - margin - ramp : tile - margin] = rise[::-1]
    return w


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _mirror_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source index of each padded position, so padding by a gather matches ``np.pad``."""
    return np.pad(np.arange(n), (before, after), mode=mode)


@dataclass(frozen=True)
class TileGeometry:
    """Everything about a tiling that depends only on the plane size and the arguments.

    Cached per geometry (:func:`tile_geometry`), so a stack of equal planes builds the
    padding indices, the blend window and the window sum once.
    """

    h: int
    w: int
    ph: int  # padded size
    pw: int
    th: int  # tile size (smaller than ``tile`` for small planes)
    tw: int
    margin: int
    corners: tuple[tuple[int, int], ...]
    rows: torch.Tensor  # (ph,) source row of each padded row
    cols: torch.Tensor  # (pw,)
    window: torch.Tensor  # (th, tw) blend weights
    offsets: torch.Tensor  # (n_tiles,) flat index of each tile's corner in the padded plane
    base: torch.Tensor  # (th * tw,) flat index of each tile pixel relative to its corner
    wsum: torch.Tensor  # (h, w) summed window weights over the image (> 0 everywhere)


@functools.lru_cache(maxsize=8)
def tile_geometry(h: int, w: int, tile: int, overlap: int, margin: int, blend: str,
                  divisor: int, device: torch.device) -> TileGeometry:
    """The (cached) tiling of an ``h`` x ``w`` plane; arguments as in
    :func:`sliding_window_iter`, already validated."""
    # Small planes get a smaller tile rather than a mostly mirrored one.
    ph, pw = _round_up(h + 2 * margin, divisor), _round_up(w + 2 * margin, divisor)
    th, tw = min(tile, ph), min(tile, pw)
    step = tile - overlap
    ys, xs = _positions(ph, th, step), _positions(pw, tw, step)
    ramp = max(overlap - 2 * margin, 0)
    window = np.outer(blend_window(th, margin, ramp, blend), blend_window(tw, margin, ramp, blend))
    corners = tuple((y, x) for y in ys for x in xs)
    # The window sum, accumulated on the host in tile order like the blend itself.
    wsum = np.zeros((ph, pw), np.float32)
    for y, x in corners:
        wsum[y : y + th, x : x + tw] += window
    # Tiles at the padded edge keep weight 0 only outside the image, so wsum > 0 inside.
    wsum = np.maximum(wsum[margin : margin + h, margin : margin + w], 1e-12)
    # "reflect" needs two pixels; a single row or column is mirrored with its edge.
    mode = "symmetric" if min(h, w) < 2 else "reflect"
    dy, dx = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")

    def dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return TileGeometry(
        h, w, ph, pw, th, tw, margin, corners,
        rows=dev(_mirror_index(h, margin, ph - h - margin, mode), torch.int64),
        cols=dev(_mirror_index(w, margin, pw - w - margin, mode), torch.int64),
        window=dev(window, torch.float32),
        # int64 flat indices: index_add_ with int32 ones takes a slow path on CPUs (25x).
        offsets=dev(np.array([y * pw + x for y, x in corners]), torch.int64),
        base=dev((dy * pw + dx).ravel(), torch.int64),
        wsum=dev(wsum, torch.float32),
    )


# Tests set this to run the accelerators' accumulate (index_add_) on a CPU.
_INDEX_ADD_ON_CPU = False


def _mirror_pad(src: torch.Tensor, g: TileGeometry) -> torch.Tensor:
    """(C, H, W) -> (C, ph, pw) mirror-padded like ``np.pad``: one reflect-pad kernel where
    the padding is narrower than the plane, else a gather by the cached indices."""
    _, h, w = src.shape
    pads = (g.margin, g.pw - w - g.margin, g.margin, g.ph - h - g.margin)
    if max(pads[:2]) < w and max(pads[2:]) < h and min(h, w) >= 2:
        return torch.nn.functional.pad(src[None], pads, mode="reflect")[0]
    return src.index_select(1, g.rows).index_select(2, g.cols)


def check_tiling(tile: int, overlap: int, margin: int, divisor: int) -> None:
    """Raise ValueError for tile/overlap/margin that cannot tile exactly."""
    if overlap < 2 * margin:
        raise ValueError(f"overlap ({overlap}) must be at least 2 * margin ({2 * margin})")
    if tile % divisor or overlap % divisor or tile <= overlap:
        raise ValueError(
            f"tile ({tile}) and overlap ({overlap}) must be multiples of {divisor} "
            "with tile > overlap"
        )


def sliding_window_iter(
    image: np.ndarray | torch.Tensor,
    predictor: Predictor,
    *,
    tile: int = 256,
    overlap: int = 64,
    margin: int = 16,
    batch_size: int = 4,
    blend: str = "cosine",
    divisor: int = 8,
    device: torch.device | str = "cpu",
) -> Generator[tuple[int, int], None, np.ndarray | torch.Tensor]:
    """Generator form of :func:`sliding_window_predict`: yields (tiles done, total).

    A numpy ``image`` gives a numpy result; a torch tensor gives a tensor left on
    ``device`` (no copy back to the host), so callers can reduce it there first.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) plane, got shape {tuple(image.shape)}")
    check_tiling(tile, overlap, margin, divisor)
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    as_numpy = isinstance(image, np.ndarray)
    src = torch.from_numpy(np.ascontiguousarray(image, np.float32)) if as_numpy else image
    src = src.to(device=device, dtype=torch.float32)
    _, h, w = src.shape
    g = tile_geometry(h, w, tile, overlap, margin, blend, divisor, device)
    padded = _mirror_pad(src, g)
    n = len(g.corners)
    # CPUs add tile by tile (vectorised slices, no launch cost); accelerators do one
    # index_add_ per batch instead of two small kernels per tile.
    flat = device.type != "cpu" or _INDEX_ADD_ON_CPU
    acc = None
    for start in range(0, n, batch_size):
        chunk = g.corners[start : start + batch_size]
        # One gather per batch: strided views of the padded plane, stacked.
        batch = torch.stack([padded[:, y : y + g.th, x : x + g.tw] for y, x in chunk])
        out = predictor(batch).float()
        k = out.shape[1]
        if acc is None:
            acc = torch.zeros((k, g.ph, g.pw), dtype=torch.float32, device=device)
        weighted = out * g.window
        if flat:
            idx = (g.offsets[start : start + len(chunk), None] + g.base[None]).reshape(-1)
            acc.view(k, -1).index_add_(1, idx, weighted.permute(1, 0, 2, 3).reshape(k, -1))
        else:
            for (y, x), o in zip(chunk, weighted, strict=True):
                acc[:, y : y + g.th, x : x + g.tw] += o
        yield min(start + batch_size, n), n
    assert acc is not None
    m = g.margin
    result = acc[:, m : m + h, m : m + w] / g.wsum
    return result.cpu().numpy() if as_numpy else result


def sliding_window_predict(image: np.ndarray, predictor: Predictor, **kwargs) -> np.ndarray:
    """Predict a (C, H, W) plane of any size tile by tile; returns (K, H, W) float32.

    Keyword arguments (see :func:`sliding_window_iter`): ``tile``, ``overlap`` and
    ``margin`` in pixels, ``batch_size`` tiles per forward pass, ``blend`` (cosine, linear,
    constant), ``divisor`` (tile offsets are multiples of it: the model's pooling factor)
    and ``device`` where tiles are blended.
    """
    return drain(sliding_window_iter(image, predictor, **kwargs))


def drive(gen: Generator[Any, None, T], on_progress: Callable[[Any], None]) -> T:
    """Run a progress-yielding generator to the end, handing each item to ``on_progress``;
    returns the generator's return value."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        on_progress(item)


def drain(gen: Generator[Any, None, T]) -> T:
    """Run a progress-yielding generator to the end and return its return value."""
    return drive(gen, lambda _: None)


def relay(gen: Generator[Any, None, T], convert: Callable[[Any], Any]) -> Generator[Any, None, T]:
    """Yield ``convert(item)`` for each item ``gen`` yields; return its return value
    (``value = yield from relay(gen, convert)``)."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        yield convert(item)
