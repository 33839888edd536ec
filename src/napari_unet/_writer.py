"""npe2 writer: a Labels layer to TIFF or Zarr (napari's save dialog asks before replacing)."""

from __future__ import annotations

from typing import Any


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer's data with :func:`napari_unet.io.write_labels`."""
    from . import io

    if isinstance(data, list):  # multiscale: the full-resolution level
        data = data[0]
    io.write_labels(path, data, overwrite=True)
    return [path]
