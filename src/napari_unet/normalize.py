"""Robust per-image intensity normalisation, shared by training and inference."""

from __future__ import annotations

from typing import Any

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
    check_image_dtype(image.dtype)
    check_finite(image)
    lo, hi = value_range if value_range is not None else percentile_range(image, percentiles)
    # A flat image (hi == lo) would divide by zero; any scale gives the same constant.
    scale = 1.0 / max(hi - lo, 1e-6)
    out = image.astype(np.float32, copy=True)
    out -= np.float32(lo)
    out *= np.float32(scale)
    return out


# ------------------------------------------------------------------------------------------
# what kind of pixels an input holds: one check for the CLI, the widgets and the Python API

RGB_MODES = ("gray", "none")
# ITU-R BT.601 luma, the grey of the bundled model's colour training images (the DSB 2018
# brightfield / H&E images in ../shared/data were stored this way), so a colour image
# converted here looks to the model as its training images did.
LUMA = (0.299, 0.587, 0.114)


def to_gray(image: Any) -> Any:
    """Grey float32 from colour samples on the last axis (R, G, B; alpha ignored): the
    weighted sum :data:`LUMA`. Lazy for dask arrays; reads only the first three samples."""
    r, g, b = (image[..., i].astype(np.float32) * np.float32(w) for i, w in enumerate(LUMA))
    return r + g + b


def check_image_dtype(dtype: np.dtype, what: str = "image") -> None:
    """Raise ValueError for pixel types that are not intensities (bool, complex, text...)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        raise ValueError(
            f"the {what} is boolean (dtype bool), a mask rather than an intensity image; use "
            "the image the mask was made from, or convert it with .astype(numpy.uint8)"
        )
    if dtype.kind == "c":
        raise ValueError(
            f"the {what} holds complex numbers (dtype {dtype}); take their magnitude "
            "(numpy.abs) or real part first"
        )
    if dtype.kind not in "uif":
        raise ValueError(f"the {what} has dtype {dtype}; integer or float pixels are needed")


def looks_rgb(shape: tuple[int, ...], channel_axis: int | None = None,
              photometric_rgb: bool = False) -> bool:
    """True when the last axis holds 3 or 4 colour samples (RGB/RGBA) rather than X.

    That is the case when a file says so (TIFF photometric RGB, a colour PNG/JPEG) or when
    the last axis has 3 or 4 entries behind two larger ones (no image is 3 pixels wide).
    """
    if len(shape) < 3 or shape[-1] not in (3, 4):
        return False
    if channel_axis is not None and channel_axis % len(shape) == len(shape) - 1:
        return False
    return photometric_rgb or (shape[-2] > 4 and shape[-3] > 4)


def file_is_rgb(path: Any) -> bool:
    """True for TIFF files whose first page is photometric RGB and for colour PNG/JPEG/BMP."""
    from pathlib import Path

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff", ".btf", ".tf8") and p.is_file():
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                return int(tif.pages.first.photometric) == 2  # PHOTOMETRIC.RGB
        except (tifffile.TiffFileError, OSError, AttributeError, IndexError):
            return False
    return suffix in (".png", ".jpg", ".jpeg", ".bmp")


def resolve_rgb(image: Any, *, channel_axis: int | None = None, rgb: str | None = None,
                photometric_rgb: bool = False, name: str = "image",
                option: str = "rgb={!r}") -> Any:
    """Recognise RGB/RGBA inputs and convert or refuse them; returns the image to use.

    ``rgb``: None refuses a colour image with a message naming the choices; ``"gray"``
    converts it to one grey channel (:func:`to_gray`: luma of R, G and B as float32, alpha
    dropped, lazily for dask/zarr-backed arrays); ``"none"`` reads the last axis as X, unchanged.
    ``option`` spells the choice for the message (``"--rgb {}"`` on the command line).
    """
    if rgb is not None and rgb not in RGB_MODES:
        raise ValueError(f"rgb={rgb!r}: choose one of {', '.join(RGB_MODES)}")
    shape = tuple(image.shape)
    if rgb == "none" or not looks_rgb(shape, channel_axis, photometric_rgb):
        return image
    if rgb == "gray":
        if channel_axis is not None:
            raise ValueError(f"{name}: pass either a channel axis or {option.format('gray')}, "
                             "not both")
        if not hasattr(image, "astype"):
            image = np.asarray(image)
        return to_gray(image)
    kind = "RGBA" if shape[-1] == 4 else "RGB"
    why = " (the file is a colour image)" if photometric_rgb else ""
    what = (f"{name} has shape {shape}: its last axis looks like {kind} colour samples{why}, "
            "which would be segmented as image columns")
    raise ValueError(f"{what}. Pass {option.format('gray')} to convert it to grey (luma of "
                     f"R, G, B; alpha dropped), or {option.format('none')} if the last "
                     "axis really is X")
