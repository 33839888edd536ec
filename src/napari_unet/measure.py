"""Per-object measurements of a label image: a table for napari layer features and CSV.

One row per object: its label, area (or volume), centroid, bounding box, mean/min/max
intensity of the image under it (one column per channel), eccentricity and solidity
(scikit-image ``regionprops_table``). Stacks are measured plane by plane (columns name the
plane; memory bounded by one plane, lazy arrays read plane by plane), or as 3D objects
(``mode="3d"``, after 3D stitching: volume instead of area). The table is a plain
``dict[str, numpy.ndarray]``: napari takes it as ``Labels.features``, pandas as a DataFrame.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import regionprops_table

Table = dict[str, np.ndarray]
MODES = ("planes", "3d")
_SHAPE_2D = ("eccentricity", "solidity")


@dataclass
class MeasureProgress:
    """Planes measured out of the total."""

    done: int
    total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.done / max(self.total, 1)


def _axis_names(ndim: int) -> tuple[str, ...]:
    return ("z", "y", "x")[-ndim:]


def _rename(table: dict[str, np.ndarray], ndim: int, n_channels: int) -> Table:
    """skimage's 'centroid-0' style names -> 'centroid_y'; intensity columns per channel."""
    names = _axis_names(ndim)
    out: Table = {}
    for key, values in table.items():
        new = key
        if key.startswith("centroid-"):
            new = f"centroid_{names[int(key.split('-')[1])]}"
        elif key.startswith("bbox-"):
            i = int(key.split("-")[1])
            new = f"bbox_{'min' if i < ndim else 'max'}_{names[i % ndim]}"
        elif key.startswith("intensity_"):
            stat, _, ch = key[len("intensity_"):].partition("-")
            new = f"{stat}_intensity" + (f"_c{ch}" if n_channels > 1 else "")
        out[new] = np.asarray(values)
    return out


def measure_region(labels: np.ndarray, image: np.ndarray | None = None, *,
                   spacing: tuple[float, ...] | None = None) -> Table:
    """Measure one 2D plane or one 3D volume. ``image``: same shape, or channels last."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    ndim = labels.ndim
    props = ["label", "area", "centroid", "bbox"]
    if ndim == 2:
        props += list(_SHAPE_2D)
    else:
        props += ["solidity"]  # eccentricity is defined for 2D objects only
    n_channels = 0
    if image is not None:
        image = np.asarray(image)
        if image.shape[:ndim] != labels.shape:
            raise ValueError(f"image shape {image.shape} does not match labels {labels.shape}")
        n_channels = 1 if image.ndim == ndim else image.shape[-1]
        props += ["intensity_mean", "intensity_min", "intensity_max"]
    kwargs: dict[str, Any] = {}
    if spacing is not None:
        kwargs["spacing"] = tuple(float(s) for s in spacing[-ndim:])
    with warnings.catch_warnings():
        # Objects one pixel thick (a line in 2D, a single plane in 3D) have no convex hull:
        # qhull warns and solidity divides by zero; their solidity is reported as NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        table = regionprops_table(labels, intensity_image=image, properties=props, **kwargs)
    if "solidity" in table:
        solidity = np.asarray(table["solidity"], dtype=float)
        solidity[~np.isfinite(solidity)] = np.nan
        table["solidity"] = solidity
    out = _rename(table, ndim, n_channels)
    if ndim == 3:  # same place in the columns, the 3D name
        out = {("volume" if k == "area" else k): v for k, v in out.items()}
    return out


def _concat(tables: list[Table]) -> Table:
    keys = list(tables[0]) if tables else ["label"]
    return {k: np.concatenate([t[k] for t in tables]) if tables else np.zeros(0, np.int64)
            for k in keys}


def measure_iter(
    labels: Any,
    image: Any | None = None,
    *,
    mode: str = "planes",
    channel_axis: int | None = None,
    spacing: tuple[float, ...] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Generator[MeasureProgress, None, Table]:
    """Measure every object of ``labels`` (numpy, dask or zarr; last axes Y, X).

    ``image``: the intensities, of the labels' shape plus, optionally, a channel axis at
    ``channel_axis``. ``mode``: "planes" measures each 2D plane of a stack (a row per object
    per plane, with the plane's index), "3d" measures objects across the last three axes
    (stitched 3D objects; volume instead of area). ``spacing``: pixel size per axis for
    physical units (default 1). On cancel, the planes measured so far are returned.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    shape = tuple(labels.shape)
    region = 2 if mode == "planes" else 3
    if len(shape) < region:
        raise ValueError(f"labels of shape {shape} have fewer than {region} axes for mode "
                         f"{mode!r}")
    if image is not None:
        ishape = tuple(image.shape)
        if channel_axis is None and ishape != shape:
            raise ValueError(
                f"image shape {ishape} differs from labels shape {shape}; give the image's "
                "channel axis if it has one")
        if channel_axis is not None:
            channel_axis %= len(ishape)
            if channel_axis >= len(ishape) - region:
                raise ValueError(f"the channel axis {channel_axis} must come before the "
                                 f"measured axes of image shape {ishape}")
            if ishape[:channel_axis] + ishape[channel_axis + 1:] != shape:
                raise ValueError(f"image shape {ishape} without its channel axis "
                                 f"{channel_axis} differs from labels shape {shape}")
    lead = shape[:-region]
    tables, start = [], time.perf_counter()
    total = int(np.prod(lead)) if lead else 1
    for i, idx in enumerate(np.ndindex(*lead)):
        if cancel is not None and cancel():
            break
        lab = np.asarray(labels[idx])
        img = None
        if image is not None:
            if channel_axis is None:
                img = np.asarray(image[idx])
            else:
                key = list(idx)
                key.insert(channel_axis, slice(None))
                img = np.moveaxis(np.asarray(image[tuple(key)]), channel_axis - len(
                    [k for k in key[:channel_axis] if not isinstance(k, slice)]), -1)
        table = measure_region(lab, img, spacing=spacing)
        n = len(table["label"])
        if len(lead) == 1:
            table = {"plane": np.full(n, idx[0]), **table}
        elif len(lead) > 1:
            table = {**{f"axis{a}": np.full(n, v) for a, v in enumerate(idx)}, **table}
        tables.append(table)
        yield MeasureProgress(i + 1, total, time.perf_counter() - start)
    return _concat(tables)


def measure(labels: Any, image: Any | None = None, **kwargs: Any) -> Table:
    """Blocking :func:`measure_iter`."""
    from .tiling import drain

    return drain(measure_iter(labels, image, **kwargs))


def write_csv(table: Table, path: str | os.PathLike, *, overwrite: bool = False,
              extra: dict[str, str] | None = None) -> Path:
    """Write the table as CSV (header + one row per object); ``extra``: constant columns
    put first (e.g. the image's name). Refuses to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite")
    extra = extra or {}
    cols = list(table)
    n = len(table[cols[0]]) if cols else 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*extra, *cols])
        for i in range(n):
            writer.writerow([*extra.values(), *(_fmt(table[c][i]) for c in cols)])
    os.replace(tmp, path)
    return path


def append_tables(tables: list[tuple[str, Table]], key: str = "image") -> Table:
    """One table from several (name, table) pairs, with a first column naming each source."""
    parts = []
    for name, t in tables:
        n = len(next(iter(t.values()))) if t else 0
        parts.append({key: np.full(n, name, dtype=object), **t})
    if not parts:
        return {}
    keys = list(dict.fromkeys(k for p in parts for k in p))
    missing = [k for k in keys if any(k not in p for p in parts)]
    if missing:
        raise ValueError(f"the tables have different columns ({missing}): measure images "
                         "with the same number of channels and axes together")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _fmt(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return value
