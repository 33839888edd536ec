"""Annotation bookkeeping: which layer annotates which image, the regions and slices
declared fully annotated, and a check for cells left unpainted in such a region."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._layers import TAG, annotation_plane_key

# ---------------------------------------------------------------- annotation bookkeeping


def annotation_meta(layer: Any) -> dict:
    """The plugin's metadata dict of an annotation layer (created when missing)."""
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        meta = {"role": "annotation"}
        layer.metadata[TAG] = meta
    return meta


def complete_planes(layer: Any) -> set[tuple[int, ...]]:
    """Leading indices of the planes declared fully annotated (``()`` for a 2D image)."""
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        return set()
    return {tuple(p) for p in meta.get("complete_planes", [])}


def set_plane_complete(layer: Any, lead: tuple[int, ...], complete: bool) -> None:
    planes = complete_planes(layer)
    if complete:
        planes.add(tuple(lead))
    else:
        planes.discard(tuple(lead))
    annotation_meta(layer)["complete_planes"] = sorted(planes)


def regions_layer_name(image_name: str) -> str:
    return f"{image_name} complete regions"


def find_regions_layer(viewer: Any, image_name: str) -> Any | None:
    """The Shapes layer holding an image's fully-annotated rectangles, if any."""
    from napari.layers import Shapes

    name = regions_layer_name(image_name)
    if name in viewer.layers and isinstance(viewer.layers[name], Shapes):
        return viewer.layers[name]
    return None


def complete_mask(viewer: Any, image_name: str, annotation: Any) -> np.ndarray | None:
    """Bool mask (annotation shape) of the pixels declared fully annotated, or None."""
    shape = tuple(annotation.data.shape)
    mask = None
    regions = find_regions_layer(viewer, image_name)
    if regions is not None and len(regions.data):
        if regions.ndim != len(shape):
            raise ValueError(
                f"the complete-regions layer {regions.name!r} has {regions.ndim} dimensions "
                f"but the annotation has {len(shape)}; delete it and draw the rectangles again"
            )
        mask = np.asarray(regions.to_masks(shape)).any(axis=0)
    planes = complete_planes(annotation)
    if planes:
        mask = np.zeros(shape, bool) if mask is None else mask
        for lead in planes:
            if len(lead) == len(shape) - 2:
                mask[annotation_plane_key(shape, lead)] = True
    return mask


def annotation_of(layer: Any) -> str | None:
    """The image name a Labels layer annotates (tagged by the Annotate widget, or by name)."""
    meta = layer.metadata.get(TAG)
    if isinstance(meta, dict):
        return meta.get("image") if meta.get("role") == "annotation" else None
    if layer.name.endswith(" annotation"):
        return layer.name[: -len(" annotation")]
    return None


def unpainted_objects(plane: np.ndarray | None, annotation: np.ndarray,
                      reference: np.ndarray | None = None, min_size: int = 16) -> int:
    """How many objects of a plane have no painted pixel in the annotation.

    Objects come from ``reference`` (e.g. the plugin's segmentation of the image) when given,
    else from the (bright-object) plane: Otsu threshold, then one object per peak of the
    smoothed distance to the background, so touching nuclei count separately. A rough
    count, only used to warn before a sparse annotation is declared fully annotated.
    """
    from scipy import ndimage

    painted = np.asarray(annotation) >= 2
    if reference is not None:
        reference = np.asarray(reference)
        ids, sizes = np.unique(reference[reference > 0], return_counts=True)
        big = set(ids[sizes >= min_size].tolist())
        return len(big - set(np.unique(reference[painted]).tolist()))
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu

    values = np.asarray(plane, np.float32)
    if values.ndim == 3:  # channels first
        values = values.mean(0)
    if not np.isfinite(values).all() or values.max() <= values.min():
        return 0
    mask = ndimage.binary_opening(values > threshold_otsu(values))
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(mask), 1)
    blobs, _ = ndimage.label(mask)
    peaks = peak_local_max(dist, min_distance=4, labels=blobs, exclude_border=False)
    return int(sum(not painted[y, x] and dist[y, x] ** 2 * np.pi >= min_size
                   for y, x in peaks))


# ---------------------------------------------------------------- corrections


# The edited mask is derived, never stored as one array: each correction is kept as a
# record of the pixels it wrote (with the values they had before) and the pixels it
# concerned. A record counts until every pixel it wrote is back to its old value, so
# napari's undo (Ctrl+Z, which emits no event) takes the undone edit out of the mask and
# redo puts it back, while a later edit over the same pixels leaves it counted.


def _full_index(lead: tuple[int, ...], plane_index: tuple[np.ndarray, ...]) -> tuple:
    """Index arrays of a plane's pixels, prefixed by the plane's leading indices."""
    n = plane_index[0].size
    return tuple(np.full(n, i, np.intp) for i in lead) + tuple(plane_index)


def _add_record(layer: Any, written: tuple, old: Any, changed: tuple) -> None:
    written = tuple(np.asarray(i, np.intp) for i in written)
    if not written or written[0].size == 0:
        return
    annotation_meta(layer).setdefault("edits", []).append(
        {"written": written, "old": np.asarray(old), "changed": changed})


def record_edit(layer: Any, lead: tuple[int, ...], written: tuple[np.ndarray, ...],
                old: np.ndarray, changed: np.ndarray) -> None:
    """Record one correction of a plane (a ``correct.Edit``): the plane pixels it wrote
    (``written``, index arrays) with their ``old`` values, and its ``changed`` mask (bool,
    the plane), which :func:`edited_mask` reports while the edit is not undone."""
    _add_record(layer, _full_index(lead, written), old,
                _full_index(lead, np.nonzero(np.asarray(changed, bool))))


def record_strokes(layer: Any, atoms: Any) -> None:
    """Record the pixels of napari paint-history atoms (a ``Labels.events.paint`` value) as
    corrections: brush, fill and erase strokes on a converted segmentation are fixes.

    Handles napari's fancy-index ``(indices, old, new)`` atoms and its masked atoms
    (``slice_key`` + ``mask``); anything else is skipped (never break painting).
    """
    shape = tuple(layer.data.shape)
    for atom in atoms or ():
        key, mask = getattr(atom, "slice_key", None), getattr(atom, "mask", None)
        try:
            if key is not None:
                starts = [k.indices(n)[0] if isinstance(k, slice) else int(k)
                          for k, n in zip(key, shape, strict=False)]
                box = tuple(max((k.indices(n)[1] - k.indices(n)[0]), 0)
                            if isinstance(k, slice) else 1
                            for k, n in zip(key, shape, strict=False))
                local = np.nonzero(np.ones(box, bool) if mask is None
                                   else np.asarray(mask, bool).reshape(box))
                index = tuple(i + s for i, s in zip(local, starts, strict=True))
                old = np.asarray(atom.old_values)
                if mask is None:  # a snapshot of the whole box
                    old = old.reshape(box)[local]
                _add_record(layer, index, old, index)
            elif isinstance(atom, tuple) and len(atom) == 3:
                index = tuple(np.asarray(i, np.intp).ravel() for i in atom[0])
                _add_record(layer, index, np.asarray(atom[1]).ravel(), index)
        except (IndexError, ValueError, TypeError, AttributeError):
            continue


def live_edits(layer: Any) -> list[dict]:
    """The recorded corrections still in effect (not undone): some pixel each one wrote
    differs from its value before the edit."""
    data = layer.data
    live = []
    for rec in annotation_meta(layer).get("edits", []):
        try:
            if np.any(np.asarray(data[rec["written"]]) != rec["old"]):
                live.append(rec)
        except (IndexError, ValueError):  # the layer's data was replaced by another shape
            continue
    return live


def remember_painted(layer: Any, lead: tuple[int, ...], label: int) -> None:
    """Remember a cell id the user paints by hand as a missed cell (see :func:`edited_mask`)."""
    painted = annotation_meta(layer).setdefault("painted_cells", [])
    entry = [list(lead), int(label)]
    if entry not in painted:
        painted.append(entry)


def edited_mask(layer: Any) -> np.ndarray | None:
    """Bool mask (annotation shape) of the cells the user corrected, or None if none.

    Whole cells count (``correct.edited_objects``, per plane: ids may repeat across planes),
    including cells painted by hand after "paint a missed cell"; undone edits do not. Pass it to
    ``pairs_from_arrays(..., edited=edited_mask(layer))``.
    """
    from ..correct import edited_objects

    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        return None
    data = np.asarray(layer.data)
    edited = meta.get("edited")  # loaded with a saved annotation (<stem>_edited.tif)
    mask = np.array(edited, bool) if isinstance(edited, np.ndarray) and \
        edited.shape == data.shape else np.zeros(data.shape, bool)
    for rec in live_edits(layer):
        mask[rec["changed"]] = True
    for lead, label in meta.get("painted_cells", []):
        if len(lead) == data.ndim - 2:
            key = annotation_plane_key(data.shape, tuple(lead))
            mask[key] |= data[key] == label
    if not mask.any():
        return None
    for lead in np.ndindex(data.shape[:-2]):
        if mask[lead].any():
            mask[lead] = edited_objects(data[lead], mask[lead])
    return mask
