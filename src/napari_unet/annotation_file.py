"""Saved annotations: ``<stem>_annotation.tif`` and its JSON sidecar, read without Qt.

The Annotate widget saves the painted labels as a TIFF and, next to it, a sidecar
``<stem>_annotation.json`` recording the image, its channel axis and the regions declared
*fully annotated* (whole planes and rectangles), where unpainted pixels count as background.
:func:`read_sidecar`, :func:`complete_mask` and :func:`edited_mask` are the one reading of
that sidecar, used by ``napari-unet train`` and meant for the widget's reload too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ANNOTATION_SUFFIX = "_annotation.tif"
SIDECAR_SUFFIX = "_annotation.json"


@dataclass
class AnnotationInfo:
    """What a sidecar records next to the painted labels."""

    path: Path  # the sidecar itself
    image: str | None = None
    image_layer: str | None = None
    channel_axis: int | None = None
    # Leading indices of whole planes declared fully annotated (() for a 2D image).
    complete_planes: list[tuple[int, ...]] = field(default_factory=list)
    # Rectangles (4 vertices x annotation ndim, in annotation pixel coordinates).
    complete_rectangles: list[np.ndarray] = field(default_factory=list)
    # File (beside the sidecar) of the bool mask of cells the user corrected, if any.
    edited: str | None = None


def sidecar_path(annotation: str | os.PathLike) -> Path:
    """Where the sidecar of an annotation file is (whether or not it exists)."""
    p = Path(annotation)
    stem = p.name[: -len(ANNOTATION_SUFFIX)] if p.name.endswith(ANNOTATION_SUFFIX) \
        else p.name.split(".")[0]
    return p.with_name(f"{stem}{SIDECAR_SUFFIX}")


def _int_tuple(value: Any, what: str, where: Path) -> tuple[int, ...]:
    if not (isinstance(value, list | tuple) and all(type(v) is int for v in value)):
        raise ValueError(f"{where}: {what} must be a list of integers, got {value!r}")
    return tuple(value)


def read_sidecar(annotation: str | os.PathLike) -> AnnotationInfo | None:
    """Read the sidecar of an annotation file; None when there is none.

    Raises:
        ValueError: the sidecar exists but is not valid JSON of the expected form.
    """
    path = sidecar_path(annotation)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the annotation sidecar {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    ch = meta.get("channel_axis")
    if ch is not None and type(ch) is not int:
        raise ValueError(f"{path}: channel_axis must be an integer or null, got {ch!r}")
    planes = [_int_tuple(p, "each complete plane", path)
              for p in meta.get("complete_planes") or []]
    rects = []
    for r in meta.get("complete_rectangles") or []:
        arr = np.asarray(r, dtype=float)
        if arr.ndim != 2 or arr.shape[0] < 3 or arr.shape[1] < 2 or not np.isfinite(arr).all():
            raise ValueError(f"{path}: a complete rectangle must be a list of vertices, "
                             f"got {r!r}")
        rects.append(arr)
    edited = meta.get("edited")
    if edited is not None and not isinstance(edited, str):
        raise ValueError(f"{path}: edited must be a file name or null, got {edited!r}")
    return AnnotationInfo(path, meta.get("image"), meta.get("image_layer"), ch, planes, rects,
                          edited)


def edited_mask(shape: tuple[int, ...], info: AnnotationInfo | None) -> np.ndarray | None:
    """Bool mask (annotation ``shape``) of the cells the user corrected, or None.

    Read from the file the sidecar names (``<stem>_edited.tif``, written by the Annotate
    widget); training weighs these pixels ``TrainConfig.edited_weight`` times more.
    """
    if info is None or not info.edited:
        return None
    import tifffile

    path = info.path.with_name(Path(info.edited).name)
    try:
        mask = np.asarray(tifffile.imread(path)) > 0
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the corrected-cells mask {path} named in "
                         f"{info.path.name}: {exc}; restore it or remove \"edited\" from "
                         "the sidecar") from exc
    if mask.shape != tuple(shape):
        raise ValueError(f"{path} has shape {mask.shape} but the annotation {tuple(shape)}; "
                         f"remove \"edited\" from {info.path.name} or save the annotation "
                         "again from the Annotate widget")
    return mask


def complete_mask(shape: tuple[int, ...], info: AnnotationInfo | None) -> np.ndarray | None:
    """Bool mask (annotation ``shape``) of the pixels declared fully annotated, or None.

    A rectangle covers the pixels inside its polygon on the plane given by its leading
    coordinates (rounded, as napari draws it).
    """
    if info is None or not (info.complete_planes or info.complete_rectangles):
        return None
    from skimage.draw import polygon2mask

    shape = tuple(int(s) for s in shape)
    mask = np.zeros(shape, bool)
    lead_ndim = len(shape) - 2
    for lead in info.complete_planes:
        if len(lead) != lead_ndim or any(not 0 <= i < n for i, n in zip(lead, shape,
                                                                         strict=False)):
            raise ValueError(f"{info.path}: complete plane {list(lead)} does not exist in an "
                             f"annotation of shape {shape}")
        mask[lead] = True
    for rect in info.complete_rectangles:
        if rect.shape[1] != len(shape):
            raise ValueError(f"{info.path}: a complete rectangle has {rect.shape[1]} "
                             f"coordinates but the annotation has {len(shape)} dimensions")
        lead = tuple(int(round(v)) for v in rect[0, :lead_ndim])
        if any(not 0 <= i < n for i, n in zip(lead, shape, strict=False)):
            continue  # drawn outside the stack: covers nothing
        yx = np.clip(rect[:, lead_ndim:], 0, np.subtract(shape[-2:], 1))
        plane = polygon2mask(shape[-2:], yx)  # the same pixels as napari's to_masks
        mask[lead] |= plane
    return mask


def write_sidecar(annotation: str | os.PathLike, *, image: str | None,
                  image_layer: str | None, channel_axis: int | None,
                  complete_planes: list[tuple[int, ...]],
                  complete_rectangles: list[np.ndarray], edited: str | None = None) -> Path:
    """Write the sidecar of an annotation file (the form :func:`read_sidecar` reads)."""
    path = sidecar_path(annotation)
    meta = {
        "image": image,
        "image_layer": image_layer,
        "channel_axis": channel_axis,
        "conventions": {"0": "not annotated", "1": "background", ">=2": "one cell each"},
        "complete_planes": [list(p) for p in sorted(complete_planes)],
        "complete_rectangles": [np.asarray(r).tolist() for r in complete_rectangles],
        "edited": edited,
    }
    path.write_text(json.dumps(meta, indent=1))
    return path
