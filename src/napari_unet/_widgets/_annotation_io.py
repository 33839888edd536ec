"""Saving and loading annotations with their image and the fully-annotated regions
(``<stem>_annotation.tif`` + a JSON sidecar), for the Annotate widget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QFileDialog

from ..targets import check_label_dtype
from . import _annotations as A
from . import _layers as L
from . import _ui

if TYPE_CHECKING:
    from .annotate import AnnotateWidget

ANNOTATION_SUFFIX = "_annotation.tif"
SIDECAR_SUFFIX = "_annotation.json"
EDITED_SUFFIX = "_edited.tif"  # bool mask of the cells the user corrected (1 = corrected)


def annotation_name(image_name: str) -> str:
    return f"{image_name} annotation"


def ask_save(widget: AnnotateWidget) -> None:
    image = widget.image_layer()
    start = ""
    path = getattr(getattr(image, "source", None), "path", None)
    if path:
        start = str(Path(path).parent)
    folder = QFileDialog.getExistingDirectory(widget, "Save annotation into folder",
                                              start)
    if folder:
        save_to(widget, folder)


def save_to(widget: AnnotateWidget, folder: str | Path,
            overwrite: bool | None = None) -> Path | None:
    """Write ``<stem>_annotation.tif`` (+ sidecar JSON, + the image if it has no file).

    ``overwrite=None`` asks before replacing files.
    """
    from .. import io

    image, layer = widget.image_layer(), widget._checked_annotation()
    if image is None or layer is None:
        if image is None:
            widget.status.error("no image layer to save the annotation with")
        return None
    if layer.data.shape != widget._expected_shape(image):
        widget.status.error(f"annotation shape {layer.data.shape} does not match the image "
                       f"({widget._expected_shape(image)}); nothing saved")
        return None
    folder = Path(folder)
    stem = _ui.file_stem(image)
    ann_path = folder / f"{stem}{ANNOTATION_SUFFIX}"
    sidecar = folder / f"{stem}{SIDECAR_SUFFIX}"
    source = getattr(getattr(image, "source", None), "path", None)
    image_path = Path(source) if source else folder / f"{stem}.tif"
    edited = A.edited_mask(layer)  # the user's corrections, weighed more in training
    edited_path = folder / f"{stem}{EDITED_SUFFIX}"
    targets = [ann_path, sidecar] + ([] if source else [image_path]) + \
        ([] if edited is None else [edited_path])
    existing = [p for p in targets if p.exists()]
    if existing:
        if overwrite is None:
            overwrite = _ui.confirm(widget, "Replace " + ", ".join(p.name for p in existing)
                                    + f" in {folder}?")
        if not overwrite:
            widget.status.warning(f"not saved: {existing[0]} exists")
            return None
    folder.mkdir(parents=True, exist_ok=True)
    if not source:
        import tifffile

        tifffile.imwrite(image_path, np.asarray(L.layer_array(image)))
    io.write_labels(ann_path, layer.data, overwrite=True)
    if edited is not None:
        import tifffile

        tifffile.imwrite(edited_path, edited.astype(np.uint8), compression="zlib")
    regions = A.find_regions_layer(widget.viewer, image.name)
    meta = {
        "image": str(image_path.resolve()),
        "image_layer": image.name,
        "channel_axis": widget.channel_combo.value(),
        "channel": L.channel_pick(image),
        "conventions": {"0": "not annotated", "1": "background", ">=2": "one cell each"},
        "complete_planes": [list(p) for p in sorted(A.complete_planes(layer))],
        "edited": None if edited is None else edited_path.name,
        "complete_rectangles": [] if regions is None else
        [np.asarray(s).tolist() for s, t in zip(regions.data, regions.shape_type,
                                                strict=True) if t == "rectangle"],
    }
    sidecar.write_text(json.dumps(meta, indent=1))
    _ui.notify_info(f"saved {ann_path.name} in {folder}")
    return ann_path


def ask_load(widget: AnnotateWidget) -> None:
    path, _ = QFileDialog.getOpenFileName(widget, "Load an annotation", "",
                                          f"annotations (*{ANNOTATION_SUFFIX} *.tif *.tiff)")
    if path:
        load_from(widget, path)


def load_from(widget: AnnotateWidget, path: str | Path) -> Labels | None:
    """Open a saved annotation with its image (reusing an open image layer)."""
    from .. import io

    path = Path(path)
    stem = path.name[: -len(ANNOTATION_SUFFIX)] if path.name.endswith(ANNOTATION_SUFFIX) \
        else path.name.split(".")[0]
    sidecar = path.with_name(f"{stem}{SIDECAR_SUFFIX}")
    meta: dict = {}
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            widget.status.warning(f"ignoring {sidecar.name} (unreadable: {exc})")
    try:
        annotation = np.asarray(io.read_image(path))
        check_label_dtype(annotation.dtype)
    except (OSError, ValueError) as exc:
        widget.status.error(f"cannot read the annotation {path.name}: {exc}")
        return None
    channel_axis = meta.get("channel_axis")
    image = open_image_for(widget, stem, meta, path.parent)
    new_image = image is None
    if new_image:
        candidates = [Path(meta["image"])] if meta.get("image") else []
        candidates += [path.with_name(f"{stem}{ext}") for ext in (".tif", ".tiff", ".png")]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            widget.status.error(f"the image of {path.name} was not found (looked for "
                              f"{', '.join(p.name for p in candidates)}); open it first")
            return None
        data = io.read_image(found)
        from ..segment import output_shape

        expected = output_shape(tuple(data.shape), channel_axis)
    else:
        data, found = None, None
        expected = L.label_shape(image, channel_axis)
    if annotation.shape != tuple(expected):
        widget.status.error(f"annotation {path.name} has shape {annotation.shape} but its image "
                       f"needs {tuple(expected)}; nothing loaded")
        return None
    if new_image:
        image = widget.viewer.add_image(data, name=meta.get("image_layer", stem))
    if channel_axis is not None:
        L.remember_channels(image, channel_axis, meta.get("channel"))
    widget.image_combo.set_layer(image)
    widget.channel_combo.set_layer(image)
    scale, translate = L.spatial_transform(image, channel_axis, annotation.ndim)
    layer = widget.viewer.add_labels(
        annotation, name=L.free_name(widget.viewer, annotation_name(image.name)),
        scale=scale, translate=translate,
        metadata={L.TAG: {"role": "annotation", "image": image.name,
                          "complete_planes": [tuple(p) for p in
                                              meta.get("complete_planes", [])]}},
    )
    if meta.get("edited"):
        edited_path = path.with_name(meta["edited"])
        try:
            edited = np.asarray(io.read_image(edited_path)) > 0
        except (OSError, ValueError) as exc:
            edited = None
            widget.status.warning(f"ignoring {edited_path.name} (unreadable: {exc}): the "
                                  "corrected cells will not weigh more in training")
        if edited is not None and edited.shape == annotation.shape:
            layer.metadata[L.TAG]["edited"] = edited
    rects = meta.get("complete_rectangles") or []
    if rects:
        if A.find_regions_layer(widget.viewer, image.name) is None:
            widget.viewer.add_shapes(
                [np.asarray(r) for r in rects], shape_type="rectangle",
                name=A.regions_layer_name(image.name), scale=scale, translate=translate,
                edge_color="yellow", face_color=[1, 1, 0, 0.08], edge_width=2,
                metadata={L.TAG: {"role": "complete_regions", "image": image.name}},
            )
        else:
            widget.status.warning(f"{A.regions_layer_name(image.name)!r} exists already; "
                             "the saved complete regions were not added")
    widget.annotation_combo.set_layer(layer)
    return layer


def open_image_for(widget: AnnotateWidget, stem: str, meta: dict,
                   folder: Path) -> Image | None:
    """An image layer already open for this annotation, if any."""
    wanted = {stem, meta.get("image_layer")}
    for layer in widget.viewer.layers:
        if isinstance(layer, Image) and (layer.name in wanted or _ui.file_stem(layer) == stem):
            return layer
    return None
