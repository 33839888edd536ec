"""Lazy, Qt-free image I/O: TIFF / OME-TIFF, Zarr / OME-Zarr (NGFF 0.4, 0.5) and PNG/JPEG.

Images can be tens of GB, so readers return dask arrays backed by the file (TIFF pages or zarr
chunks are only decoded when a block is computed) and writers stream plane by plane.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from . import atomic

__all__ = [
    "create_label_store",
    "read_axes",
    "read_image",
    "read_label_attrs",
    "write_labels",
    "write_ome_zarr_image",
    "write_ome_zarr_labels",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_ZARR_MARKERS = (".zarray", ".zgroup", ".zattrs", "zarr.json")
_NGFF_AXES = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}

# A dask block bigger than this would make "one plane per block" a memory hazard (whole-slide
# 2D images), so such TIFFs keep the file's own strip/tile chunking instead.
_MAX_BLOCK_BYTES = 256 * 2**20
# Zarr chunks are one plane, but a single 40k x 40k chunk could not be read lazily at all.
_MAX_CHUNK_SIDE = 4096
# Plane slabs computed at once when streaming dask labels to TIFF (see _iter_planes).
_MAX_SLAB_BYTES = 512 * 2**20
# tifffile only switches to BigTIFF by itself for uncompressed data; compressed output that
# passes 4 GB would otherwise fail near the end of a long write.
_BIGTIFF_BYTES = 2**32 - 2**25
# NGFF (since 0.2) requires "/" between chunk indices.
_CHUNK_KEYS = {"name": "v2", "separator": "/"}
# write_labels' attrs live in a private TIFF tag (65000-65535 is the private range): the
# ImageDescription belongs to tifffile's shape record or to the OME-XML of .ome.tif files.
_TIFF_ATTRS_TAG = 65117


# --------------------------------------------------------------------------------------------
# reading


def read_image(path: str | os.PathLike, level: int = 0) -> da.Array:
    """Open an image lazily as a dask array.

    Supports TIFF/OME-TIFF/ImageJ TIFF (blocks of one page), PNG/JPEG (read eagerly, returned
    unchanged, e.g. RGBA keeps its alpha), zarr arrays, OME-Zarr images (``level`` selects the
    resolution level, 0 = full resolution) and zarr groups holding exactly one array.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a supported image, or ``level`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No image at '{p}': the file or folder does not exist.")
    if _is_zarr(p):
        return _read_zarr(p, level)
    if p.is_dir():
        raise ValueError(
            f"'{p}' is a folder but not a Zarr store (no .zarray, .zgroup or zarr.json inside); "
            "expected a TIFF, PNG/JPEG file or a Zarr/OME-Zarr folder."
        )
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(p, level)
    if suffix in RASTER_SUFFIXES:
        _check_single_level(p, level)
        import imageio.v3 as iio

        try:
            arr = np.asarray(iio.imread(p))
        except Exception as exc:  # imageio raises many plugin-specific types
            raise ValueError(f"Cannot decode '{p}' as a {suffix} image: {exc}") from exc
        return da.from_array(arr, chunks=arr.shape, name=f"raster-{_file_token(p, level)}")
    raise ValueError(
        f"Cannot read '{p}': unsupported file type '{suffix or '(none)'}'; expected a TIFF "
        f"({', '.join(TIFF_SUFFIXES)}), {', '.join(RASTER_SUFFIXES)} or a Zarr/OME-Zarr folder."
    )


def read_axes(path: str | os.PathLike) -> str | None:
    """Return the axes of an image as a lowercase string such as ``"tczyx"``, if recorded.

    Known for OME-Zarr (multiscales axes) and OME/ImageJ TIFF (tifffile series axes, with the
    RGB sample axis ``S`` reported as ``c``); ``None`` for anything else, because plain TIFF,
    PNG and zarr axes would only be a guess.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No image at '{p}': the file or folder does not exist.")
    if _is_zarr(p):
        node = _open_zarr(p)
        if isinstance(node, zarr.Array):
            return None
        node = _image_group(node)
        multiscales = _multiscales(node.attrs)
        if not multiscales:
            return None
        names = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])]
        if not names or not all(isinstance(n, str) and len(n) == 1 for n in names):
            return None
        return "".join(names).lower()
    if p.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(p) as tif:
                if not (tif.is_ome or tif.is_imagej):
                    return None
                axes = tif.series[0].axes.upper()
        except tifffile.TiffFileError as exc:
            raise ValueError(f"'{p}' is not a readable TIFF file: {exc}") from exc
        if "S" in axes and "C" not in axes:
            axes = axes.replace("S", "C")
        return axes.lower()
    return None


def _read_tiff(p: Path, level: int) -> da.Array:
    try:
        store = tifffile.imread(p, aszarr=True, level=level)
    except tifffile.TiffFileError as exc:
        raise ValueError(f"'{p}' is not a readable TIFF file: {exc}") from exc
    except IndexError as exc:
        with tifffile.TiffFile(p) as tif:
            n_levels = len(tif.series[0].levels)
        raise ValueError(
            f"'{p}' has {n_levels} resolution level(s); level {level} does not exist."
        ) from exc
    try:
        z = zarr.open_array(store, mode="r")
    except Exception:
        store.close()
        raise
    chunks = _plane_chunks(z.shape, z.chunks, z.dtype.itemsize)
    # The store keeps the file open for as long as the dask graph lives; dask's default token
    # for it is not tied to the file content, so name it from path + mtime instead.
    return da.from_zarr(z, chunks=chunks, name=f"tiff-{_file_token(p, level)}")


def _plane_chunks(
    shape: tuple[int, ...], native: tuple[int, ...], itemsize: int
) -> tuple[int, ...]:
    """Widen the file's chunks to whole planes (dims tifffile chunks by 1 stay 1)."""
    chunks = tuple(1 if c == 1 else s for s, c in zip(shape, native, strict=True))
    if math.prod(chunks) * itemsize > _MAX_BLOCK_BYTES:
        return tuple(native)
    return chunks


def _read_zarr(p: Path, level: int) -> da.Array:
    node = _open_zarr(p)
    if isinstance(node, zarr.Array):
        _check_single_level(p, level)
        return da.from_zarr(node)
    group = _image_group(node)
    multiscales = _multiscales(group.attrs)
    if multiscales:
        datasets = multiscales[0].get("datasets", [])
        if not 0 <= level < len(datasets):
            raise ValueError(
                f"OME-Zarr image '{p}' has {len(datasets)} resolution level(s); "
                f"level {level} does not exist."
            )
        key = datasets[level]["path"]
        try:
            arr = group[key]
        except KeyError as exc:
            raise ValueError(
                f"OME-Zarr image '{p}' lists dataset '{key}' but it is missing."
            ) from exc
        return da.from_zarr(arr)
    arrays = sorted(group.array_keys())
    if len(arrays) == 1:
        _check_single_level(p, level)
        return da.from_zarr(group[arrays[0]])
    raise ValueError(
        f"Zarr group '{p}' holds no single image: expected a zarr array, an OME-Zarr group "
        f"with 'multiscales' metadata, or a group with exactly one array; found arrays "
        f"{arrays} and groups {sorted(group.group_keys())}."
    )


def _open_zarr(p: Path) -> zarr.Array | zarr.Group:
    try:
        return zarr.open(store=str(p), mode="r")
    except Exception as exc:
        raise ValueError(f"'{p}' looks like a Zarr store but cannot be opened: {exc}") from exc


def _image_group(group: zarr.Group) -> zarr.Group:
    # bioformats2raw (the usual OME-TIFF -> OME-Zarr converter) puts the image in series "0".
    attrs = group.attrs.asdict()
    if not _multiscales(attrs) and "bioformats2raw.layout" in attrs and "0" in group:
        child = group["0"]
        if isinstance(child, zarr.Group):
            return child
    return group


def _multiscales(attrs: Any) -> list[dict]:
    """NGFF multiscales list: top level in 0.4 (zarr v2), under the 'ome' key in 0.5 (v3)."""
    attrs = dict(attrs)
    if "multiscales" in attrs:
        return list(attrs["multiscales"])
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        return list(ome["multiscales"])
    return []


def _is_zarr(p: Path) -> bool:
    return p.is_dir() and any((p / marker).exists() for marker in _ZARR_MARKERS)


def _check_single_level(p: Path, level: int) -> None:
    if level != 0:
        raise ValueError(f"'{p}' has a single resolution level; level {level} does not exist.")


def _file_token(p: Path, level: int) -> str:
    st = p.stat()
    return tokenize(str(p.resolve()), st.st_mtime_ns, st.st_size, level)


# --------------------------------------------------------------------------------------------
# writing


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray | da.Array,
    *,
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write an integer label image (numpy or dask, at least 2D) to ``.tif/.tiff`` or ``.zarr``.

    Dask input is computed a few planes at a time, never as a whole. TIFF is zlib compressed;
    zarr is chunked one plane per chunk unless ``chunks`` is given (``chunks`` is zarr only).
    The result is written under a temporary name and moved into place at the end, so a crash
    never leaves a half-written file, and ``labels`` may lazily read from ``path`` itself.
    ``attrs`` (JSON-able) are stored with the labels: zarr attributes, or in the TIFF's
    description; :func:`read_label_attrs` reads them back.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: unsupported suffix or non-integer labels.
    """
    p = Path(path)
    labels = _as_labels(labels)
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        _check_target(p, overwrite, want_dir=False)
        _write_tiff(p, labels, attrs)
    elif suffix == ".zarr":
        _check_target(p, overwrite, want_dir=True)
        chunks = _default_chunks(labels.shape) if chunks is None else tuple(chunks)
        with atomic.atomic_path(p) as tmp:
            target = zarr.create_array(
                str(tmp),
                shape=labels.shape,
                dtype=labels.dtype,
                chunks=chunks,
                fill_value=0,
                zarr_format=2,
                chunk_key_encoding=_CHUNK_KEYS,
            )
            _store(labels, target)
            if attrs:
                target.attrs.update(attrs)
    else:
        raise ValueError(
            f"Cannot write labels to '{p}': expected a {', '.join(TIFF_SUFFIXES)} or .zarr path."
        )


def create_label_store(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any = np.uint32,
    chunks: Sequence[int] | None = None,
    *,
    overwrite: bool = False,
) -> zarr.Array:
    """Create an empty (all 0) on-disk zarr label array to be filled plane by plane.

    Chunks default to one 2D plane of the last two axes (split into tiles of at most 4096 px
    per side for huge planes), so writing whole planes from parallel workers never touches a
    shared chunk.
    """
    p = Path(path)
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if len(shape) < 2:
        raise ValueError(f"Label store '{p}' needs at least 2 dimensions, got shape {shape}.")
    if not (np.issubdtype(dtype, np.integer) or dtype.kind == "b"):
        raise ValueError(f"Label store '{p}' needs an integer dtype, got {dtype}.")
    if _check_target(p, overwrite, want_dir=True):
        _remove(p)
    return zarr.create_array(
        str(p),
        shape=shape,
        dtype=dtype,
        chunks=_default_chunks(shape) if chunks is None else tuple(chunks),
        fill_value=0,
        zarr_format=2,
        chunk_key_encoding=_CHUNK_KEYS,
    )


NGFF_VERSIONS = ("0.4", "0.5")  # 0.4: zarr v2, attributes at the top; 0.5: zarr v3, under "ome"


def write_ome_zarr_image(
    path: str | os.PathLike,
    image: np.ndarray | da.Array,
    axes: str,
    *,
    overwrite: bool = False,
    version: str = "0.4",
    levels: int = 1,
) -> str:
    """Write an OME-Zarr image (``version`` "0.4": zarr v2, "0.5": zarr v3) and return its path.

    ``axes`` names each dimension in NGFF order, e.g. ``"zyx"`` or ``"tczyx"``. ``levels`` > 1
    adds a pyramid: level ``i`` takes every ``2**i``-th pixel in Y and X (scale ``2**i``).
    """
    p = Path(path)
    if version not in NGFF_VERSIONS:
        raise ValueError(f"OME-Zarr version {version!r} is not supported; use one of "
                         f"{NGFF_VERSIONS}.")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    if not isinstance(image, da.Array):
        image = np.asarray(image)
    axes = _validate_axes(axes, image.ndim)
    _check_target(p, overwrite, want_dir=True)
    with atomic.atomic_path(p) as tmp:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=_zarr_format(version))
        datasets = []
        for i in range(levels):
            data = image[..., :: 2**i, :: 2**i]
            target = group.create_array(
                str(i), shape=data.shape, dtype=data.dtype, chunks=_default_chunks(data.shape),
                **_chunk_keys(version),
            )
            _store(data, target)
            scale = [1.0] * (image.ndim - 2) + [float(2**i)] * 2
            datasets.append({"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": scale}]})
        name = p.name[: -len(".zarr")] if p.name.lower().endswith(".zarr") else p.name
        ms = {"name": name, "axes": [{"name": a, "type": _AXIS_TYPES[a]} for a in axes],
              "datasets": datasets, "type": "subsample",
              "metadata": {"description": "level i keeps every 2**i-th pixel in Y and X",
                           "method": "numpy slicing [..., ::2**i, ::2**i]"}}
        group.attrs.update(_ngff_attrs(version, multiscales=[ms]))
    return str(p)


def write_ome_zarr_labels(
    image_path: str | os.PathLike,
    labels: np.ndarray | da.Array,
    name: str = "segmentation",
    *,
    overwrite: bool = False,
) -> str:
    """Add ``labels`` to an OME-Zarr 0.4 or 0.5 image as ``labels/<name>``; returns that path.

    The label image gets the image's NGFF version and zarr format, and one level per image
    level: same dataset paths, shapes (nearest-neighbour downsampling of ``labels``), axes
    and coordinate transformations, so viewers overlay it in the same physical space at
    every zoom. ``labels`` must have the image's level-0 shape; a missing channel axis is
    inserted with size 1. Other labels already listed in the ``labels`` group are kept.
    """
    root = Path(image_path)
    if not root.exists():
        raise FileNotFoundError(f"No OME-Zarr image at '{root}': the folder does not exist.")
    if not _is_zarr(root):
        raise ValueError(f"'{root}' is not a Zarr store; expected an OME-Zarr image folder.")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"Invalid label name {name!r}: use a plain folder name.")
    # Consolidated metadata would hide the new labels from readers, so bypass it and refresh it
    # afterwards if the image has it.
    group = zarr.open_group(str(root), mode="r+", use_consolidated=False)
    zarr_format = group.metadata.zarr_format
    multiscales = _multiscales(group.attrs)
    if not multiscales:
        raise ValueError(f"'{root}' has no 'multiscales' metadata; expected an OME-Zarr image.")
    version = "0.4" if zarr_format == 2 else str(
        (group.attrs.get("ome") or {}).get("version", "0.5"))
    if version not in NGFF_VERSIONS:
        raise ValueError(f"'{root}' is OME-Zarr {version}; labels can be added to OME-Zarr "
                         f"{' and '.join(NGFF_VERSIONS)} images only.")
    ms = multiscales[0]
    axes_meta = copy.deepcopy(ms.get("axes", []))
    axis_names = [a["name"] if isinstance(a, dict) else a for a in axes_meta]
    image_levels = [(ds, group[ds["path"]].shape) for ds in ms["datasets"]]
    labels = _match_image_shape(_as_labels(labels), image_levels[0][1], axis_names)

    labels_dir = root / "labels"
    label_dir = labels_dir / name
    if label_dir.exists() and not overwrite:
        raise FileExistsError(
            f"Labels '{name}' already exist in '{root}'. Pass overwrite=True to replace them, "
            "or choose another name."
        )
    labels_group = group.require_group("labels")
    label_ms: dict[str, Any] = {
        "name": name,
        "axes": axes_meta,
        "datasets": [
            {"path": ds["path"],
             "coordinateTransformations": copy.deepcopy(ds.get("coordinateTransformations", []))}
            for ds, _ in image_levels
        ],
    }
    if "coordinateTransformations" in ms:
        label_ms["coordinateTransformations"] = copy.deepcopy(ms["coordinateTransformations"])
    label_ms.update({"type": "nearest", "metadata": {
        "description": "each level samples the full-resolution labels at the image level's "
        "shape (pixel i * N // n): ids are never averaged",
        "method": "napari_unet.io._nearest_level"}})

    tmp = _temp_sibling(label_dir)
    try:
        label_group = zarr.open_group(str(tmp), mode="w-", zarr_format=zarr_format)
        for ds, shape in image_levels:
            level = _nearest_level(labels, shape)
            target = label_group.create_array(
                ds["path"], shape=level.shape, dtype=level.dtype,
                chunks=_default_chunks(level.shape), fill_value=0, **_chunk_keys(version),
            )
            _store(level, target)
        label_group.attrs.update(_ngff_attrs(
            version, multiscales=[label_ms], **{"image-label": {"source": {"image": "../../"}}}))
        _move_into_place(tmp, label_dir)
    finally:
        _remove(tmp)

    # Listed only once the data is in place, so a crash never advertises missing labels.
    listed = list(_ngff_section(labels_group.attrs).get("labels", []))
    if name not in listed:
        labels_group.attrs.update(_ngff_attrs(version, labels=[*listed, name]))
    if (root / ".zmetadata").exists():
        zarr.consolidate_metadata(str(root), zarr_format=2)
    elif zarr_format == 3 and group.metadata.consolidated_metadata is not None:
        zarr.consolidate_metadata(str(root), zarr_format=3)
    return str(label_dir)


def _zarr_format(version: str) -> int:
    return 2 if version == "0.4" else 3


def _chunk_keys(version: str) -> dict[str, Any]:
    # zarr v3's default chunk keys already use "/" (c/0/0); v2 needs it asked for.
    return {"chunk_key_encoding": _CHUNK_KEYS} if version == "0.4" else {}


def _ngff_attrs(version: str, **fields: Any) -> dict[str, Any]:
    """NGFF metadata as group attributes: 0.4 puts each field at the top with its own
    "version"; 0.5 nests them under "ome" with one "version"."""
    if version == "0.4":
        out = copy.deepcopy(fields)
        for key in ("multiscales",):
            for entry in out.get(key, []):
                entry.setdefault("version", version)
        if "image-label" in out:
            out["image-label"] = {"version": version, **out["image-label"]}
        return out
    return {"ome": {"version": version, **copy.deepcopy(fields)}}


def _ngff_section(attrs: Any) -> dict[str, Any]:
    attrs = dict(attrs)
    return dict(attrs["ome"]) if isinstance(attrs.get("ome"), dict) else attrs


def _nearest_level(
    labels: np.ndarray | da.Array, shape: tuple[int, ...]
) -> np.ndarray | da.Array:
    """``labels`` resampled to ``shape`` by nearest neighbour (pixel ``i * N // n``): label
    values are ids, never averaged. The identity when the shapes agree."""
    for axis, (n_full, n) in enumerate(zip(labels.shape, shape, strict=True)):
        if n_full == n or n_full == 1:
            continue
        idx = (np.arange(n) * n_full) // n
        labels = labels[(slice(None),) * axis + (idx,)]
    return labels


# --------------------------------------------------------------------------------------------
# writing helpers


def _as_labels(labels: Any) -> np.ndarray | da.Array:
    if not isinstance(labels, da.Array):
        labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels must be an integer array, got dtype {labels.dtype}.")
    if labels.ndim < 2:
        raise ValueError(f"Labels must have at least 2 dimensions, got shape {labels.shape}.")
    return labels


def _match_image_shape(
    labels: np.ndarray | da.Array, image_shape: tuple[int, ...], axis_names: list[str]
) -> np.ndarray | da.Array:
    # Segmentations rarely carry the image's channel axis; NGFF wants it, as size 1.
    if labels.ndim == len(image_shape) - 1 and "c" in axis_names:
        c = axis_names.index("c")
        expected = image_shape[:c] + image_shape[c + 1 :]
        if tuple(labels.shape) == expected:
            labels = (da if isinstance(labels, da.Array) else np).expand_dims(labels, c)
    ok = labels.ndim == len(image_shape) and all(
        s == n or (ax == "c" and s == 1)
        for s, n, ax in zip(labels.shape, image_shape, axis_names, strict=False)
    )
    if not ok:
        raise ValueError(
            f"Labels of shape {tuple(labels.shape)} do not match the image shape "
            f"{tuple(image_shape)} (axes {''.join(axis_names)}); the channel axis may be 1 "
            "or left out, every other axis must match."
        )
    return labels


def _validate_axes(axes: str, ndim: int) -> str:
    axes = axes.lower()
    order = [_NGFF_AXES.find(a) for a in axes]
    if (
        len(axes) != ndim
        or not 2 <= ndim <= 5
        or -1 in order
        or order != sorted(set(order))
        or not axes.endswith("yx")
    ):
        raise ValueError(
            f"Invalid axes {axes!r} for a {ndim}D image: OME-Zarr 0.4 needs one letter per "
            f"dimension, in the order of {_NGFF_AXES!r} without repeats, ending in 'yx'."
        )
    return axes


def _default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    # One plane, tiled past 4096 px per side: at most 128 MiB per chunk even for 64-bit data.
    lead = tuple(1 for _ in shape[:-2])
    return lead + tuple(max(1, min(int(s), _MAX_CHUNK_SIDE)) for s in shape[-2:])


def _store(data: np.ndarray | da.Array, target: zarr.Array) -> None:
    if not isinstance(data, da.Array):
        target[...] = data
        return
    # Dask blocks that straddle zarr chunks would race on read-modify-write of shared chunks.
    aligned = all(
        all(edge % c == 0 for edge in np.cumsum(block)[:-1])
        for block, c in zip(data.chunks, target.chunks, strict=True)
    )
    da.store(data, target, lock=not aligned)


def _write_tiff(p: Path, labels: np.ndarray | da.Array, attrs: dict[str, Any] | None) -> None:
    # The temp name ends with the real name's suffixes so tifffile's suffix-based choices
    # (OME-XML for .ome.tif) are the same as for the final file.
    bigtiff = labels.size * labels.dtype.itemsize > _BIGTIFF_BYTES
    extratags = [(_TIFF_ATTRS_TAG, "s", 0, json.dumps(attrs), True)] if attrs else []
    with atomic.atomic_path(p, keep_suffix=True) as tmp:
        if isinstance(labels, da.Array):
            tifffile.imwrite(
                tmp,
                _iter_planes(labels),
                shape=labels.shape,
                dtype=labels.dtype,
                photometric="minisblack",
                compression="zlib",
                bigtiff=bigtiff,
                extratags=extratags,
            )
        else:
            # photometric must be explicit: tifffile would store a (3, Y, X) stack as planar RGB.
            tifffile.imwrite(tmp, labels, photometric="minisblack", compression="zlib",
                             bigtiff=bigtiff, extratags=extratags)


def read_label_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``attrs`` :func:`write_labels` stored with a label image; None if it has none
    (or is not a TIFF / zarr array at all)."""
    p = Path(path)
    try:
        if p.suffix.lower() in TIFF_SUFFIXES and p.is_file():
            with tifffile.TiffFile(p) as tif:
                tag = tif.pages.first.tags.get(_TIFF_ATTRS_TAG)
                return dict(json.loads(tag.value)) if tag is not None else None
        if _is_zarr(p):
            node = zarr.open(store=str(p), mode="r")
            return dict(node.attrs) if isinstance(node, zarr.Array) else None
    except (OSError, ValueError, TypeError, tifffile.TiffFileError):
        return None
    return None


def _iter_planes(arr: da.Array) -> Iterator[np.ndarray]:
    """Yield the 2D planes of ``arr`` in C order, computing a slab of planes at a time.

    Computing plane by plane would re-run a dask chunk once per plane it holds (ruinous when
    the graph is a network prediction), so planes are computed per chunk of the first leading
    axis that is chunked by more than one, with later leading axes in full to keep C order.
    If such a slab would exceed the memory budget, fall back to single planes.
    """
    lead = arr.ndim - 2
    plane_bytes = arr.shape[-2] * arr.shape[-1] * arr.dtype.itemsize
    axis = next((i for i in range(lead) if max(arr.chunks[i]) > 1), None)
    if axis is not None:
        slab_planes = max(arr.chunks[axis]) * math.prod(arr.shape[axis + 1 : lead])
        if slab_planes * plane_bytes > _MAX_SLAB_BYTES:
            axis = None
    if axis is None:
        for idx in np.ndindex(*arr.shape[:lead]):
            yield np.asarray(arr[idx].compute())
        return
    edges = np.cumsum((0, *arr.chunks[axis]))
    for outer in np.ndindex(*arr.shape[:axis]):
        for start, stop in zip(edges[:-1], edges[1:], strict=True):
            slab = np.asarray(arr[(*outer, slice(int(start), int(stop)))].compute())
            yield from slab.reshape(-1, *arr.shape[-2:])


def _check_target(p: Path, overwrite: bool, *, want_dir: bool) -> bool:
    """Validate an output path; return True if something is there to be replaced."""
    if not p.parent.is_dir():
        raise FileNotFoundError(f"Cannot write '{p}': folder '{p.parent}' does not exist.")
    if not (p.exists() or p.is_symlink()):
        return False
    if not overwrite:
        raise FileExistsError(
            f"'{p}' already exists. Pass overwrite=True to replace it, or choose another path."
        )
    if p.is_dir() and not (want_dir and _is_zarr(p)):
        # Never delete a folder we cannot recognise as a previous output.
        raise FileExistsError(
            f"'{p}' is an existing folder that is not a Zarr store; refusing to replace it. "
            "Remove it yourself or choose another path."
        )
    return True


# The OME-Zarr label writer still names these; they are the shared atomic helpers.
_temp_sibling = atomic.temp_sibling
_move_into_place = atomic.move_into_place
_remove = atomic.remove
