"""Overlap-tile inference (the U-Net paper's strategy) as one pure function.

The plane is mirror-padded, cut into overlapping tiles whose offsets are multiples of the
model's pooling divisor, predicted in batches, and blended: each tile's outer ``margin``
pixels (where the model lacks context) get weight 0, then the weight ramps up smoothly over
the rest of the overlap. With ``margin`` at least the receptive-field radius, the result
equals whole-image prediction of the same mirror-padded plane up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
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


def sliding_window_iter(
    image: np.ndarray,
    predictor: Predictor,
    *,
    tile: int = 256,
    overlap: int = 64,
    margin: int = 16,
    batch_size: int = 4,
    blend: str = "cosine",
    divisor: int = 8,
    device: torch.device | str = "cpu",
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Generator form of :func:`sliding_window_predict`: yields (tiles done, total)."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) plane, got shape {image.shape}")
    if overlap < 2 * margin:
        raise ValueError(f"overlap ({overlap}) must be at least 2 * margin ({2 * margin})")
    if tile % divisor or overlap % divisor or tile <= overlap:
        raise ValueError(
            f"tile ({tile}) and overlap ({overlap}) must be multiples of {divisor} "
            "with tile > overlap"
        )
    _, h, w = image.shape
    # Small planes get a smaller tile rather than a mostly mirrored one.
    ph, pw = _round_up(h + 2 * margin, divisor), _round_up(w + 2 * margin, divisor)
    th, tw = min(tile, ph), min(tile, pw)
    pad = ((0, 0), (margin, ph - h - margin), (margin, pw - w - margin))
    padded = np.pad(image, pad, mode="symmetric" if min(h, w) < 2 else "reflect")
    step = tile - overlap
    ys, xs = _positions(ph, th, step), _positions(pw, tw, step)
    ramp = max(overlap - 2 * margin, 0)
    window = torch.from_numpy(
        np.outer(blend_window(th, margin, ramp, blend), blend_window(tw, margin, ramp, blend))
    ).to(device)
    corners = [(y, x) for y in ys for x in xs]
    acc = None
    wsum = torch.zeros((ph, pw), dtype=torch.float32, device=device)
    src = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        batch = torch.stack([src[:, y : y + th, x : x + tw] for y, x in chunk])
        out = predictor(batch.to(device, non_blocking=True)).float()
        if acc is None:
            acc = torch.zeros((out.shape[1], ph, pw), dtype=torch.float32, device=device)
        for (y, x), o in zip(chunk, out, strict=True):
            acc[:, y : y + th, x : x + tw] += o * window
            wsum[y : y + th, x : x + tw] += window
        yield min(start + batch_size, len(corners)), len(corners)
    crop = (slice(margin, margin + h), slice(margin, margin + w))
    # Tiles at the padded edge keep weight 0 only outside the image, so wsum > 0 inside.
    result = acc[:, crop[0], crop[1]] / wsum[crop].clamp_min(1e-12)
    return result.cpu().numpy()


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
