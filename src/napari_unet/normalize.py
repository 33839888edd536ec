"""Robust per-image intensity normalisation, shared by training and inference."""

from __future__ import annotations

import numpy as np

DEFAULT_PERCENTILES = (1.0, 99.8)
# Percentiles of a large plane are estimated on a strided subsample: the result is the same
# to well under a grey level and it keeps normalisation from dominating inference time.
_MAX_SAMPLES = 1 << 20


def check_finite(image: np.ndarray, what: str = "image") -> None:
    """Raise ValueError if a float image holds NaN or infinite pixels."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise ValueError(
            f"the {what} contains {bad} NaN or infinite pixel(s); replace them (for example "
            "with numpy.nan_to_num) before segmenting or training"
        )


def percentile_range(
    image: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """Low/high intensity at the given percentiles (over all pixels and channels)."""
    flat = np.asarray(image).reshape(-1)
    if flat.size > _MAX_SAMPLES:
        flat = flat[:: flat.size // _MAX_SAMPLES]
    lo, hi = np.percentile(flat, percentiles)
    return float(lo), float(hi)


def normalize(
    image: np.ndarray,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map the percentile range to [0, 1] as float32; works alike for uint8, uint16, float.

    ``value_range`` overrides the percentiles, so a whole stack can share one range.
    """
    image = np.asarray(image)
    check_finite(image)
    lo, hi = value_range if value_range is not None else percentile_range(image, percentiles)
    # A flat image (hi == lo) would divide by zero; any scale gives the same constant.
    scale = 1.0 / max(hi - lo, 1e-6)
    out = image.astype(np.float32, copy=True)
    out -= np.float32(lo)
    out *= np.float32(scale)
    return out
