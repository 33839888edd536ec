"""Annotate widget: pair an image with a sparse annotation Labels layer and paint it.

Conventions (``napari_unet.targets``): 0 = not annotated (ignored by training),
1 = background, every value >= 2 = one cell. Regions declared fully annotated (rectangles in
a "<image> complete regions" Shapes layer, or whole slices) count their unpainted pixels
as background; declaring a slice complete while many objects there are unpainted asks first.
The channel choice (one channel, a mean, all) is stored on the image layer, so Train and
Segment feed the model what was annotated (RGB images included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .. import correct
from ..targets import BACKGROUND, FIRST_CELL
from . import _annotation_io as _io
from . import _annotations as A
from . import _layers as L
from . import _shortcuts as _keys
from . import _ui
from ._annotation_io import ANNOTATION_SUFFIX, annotation_name

# Correction shortcuts (Shift+letter: napari's Labels layer uses the plain letters).
SHORTCUTS = {
    "delete": ("Shift-D", "delete the cell under the cursor (it becomes background)"),
    "merge": ("Shift-M", "merge: press over one cell, then over the other"),
    "split": ("Shift-S", "split the cell crossed by the last line drawn in '… split lines'"),
    "paint": ("Shift-N", "paint a missed cell: selects the next free id and the brush"),
}
REGIONS = {"image": "whole image", "slice": "slice on screen", "rectangles": "inside shapes"}

UNPAINTED_WARN = 5  # ask before "fully annotated" when this many objects look unpainted

_COUNT_LIMIT = 64_000_000  # count the whole annotation below this many pixels, else the slice


def count_annotation(data: np.ndarray) -> tuple[int, int]:
    """(number of distinct cell ids >= 2, number of background pixels)."""
    data = np.asarray(data)
    if data.size == 0:
        return 0, 0
    if data.dtype.kind == "u" or (data.dtype.kind in "ib" and data.min() >= 0):
        counts = np.bincount(data.ravel().astype(np.intp, copy=False))
        cells = int(np.count_nonzero(counts[FIRST_CELL:]))
        background = int(counts[BACKGROUND]) if len(counts) > BACKGROUND else 0
        return cells, background
    values = np.unique(data)
    return int((values >= FIRST_CELL).sum()), int((data == BACKGROUND).sum())


class _Swatch(QLabel):
    def __init__(self, color: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFixedSize(16, 16)
        self.set_color(color)

    def set_color(self, color: Any) -> None:
        if color is None:
            css = "background: transparent; border: 1px dashed gray;"
        else:
            r, g, b = (int(255 * float(v)) for v in np.asarray(color)[:3])
            css = f"background: {QColor(r, g, b).name()}; border: 1px solid gray;"
        self.setStyleSheet(css)


class AnnotateWidget(_ui.TabbedDock, QWidget):
    """Create/pick an image's annotation layer, paint it, declare complete regions, save it."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._annotation: Labels | None = None
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(150)
        self._count_timer.timeout.connect(self.update_counts)

        self.image_combo = L.LayerCombo(napari_viewer, (Image,))
        self.channel_combo = L.ChannelPicker()
        self.annotation_combo = L.LayerCombo(napari_viewer, (Labels,), none_text="(new)",
                                             follow=False)
        self.create_button = QPushButton("Create / pick annotation layer")
        self.create_button.setToolTip('adds a Labels layer "<image> annotation" matching the '
                                      "image (or picks the existing one)")

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Channels", self.channel_combo)
        form.addRow("Annotation", self.annotation_combo)

        legend = QGroupBox("Label values")
        grid = QGridLayout(legend)
        self.swatches = [_Swatch(None), _Swatch((0.47, 0.15, 0.02)), _Swatch((0.36, 0.84, 0.97))]
        texts = ["0  not annotated (ignored)", "1  background",
                 "≥ 2  cells: one value per cell"]
        for row, (swatch, text) in enumerate(zip(self.swatches, texts, strict=True)):
            grid.addWidget(swatch, row, 0)
            grid.addWidget(QLabel(text), row, 1)
        grid.setColumnStretch(1, 1)

        self.background_button = QPushButton("Paint background (1)")
        self.background_button.setToolTip("brush with label 1: pixels that are surely not a cell")
        self.next_cell_button = QPushButton("Next free cell id")
        self.next_cell_button.setToolTip("brush with a new cell id (one value per cell, >= 2)")
        paint_row = QHBoxLayout()
        paint_row.addWidget(self.background_button)
        paint_row.addWidget(self.next_cell_button)

        complete = QGroupBox("Fully annotated (unpainted pixels there = background)")
        cl = QVBoxLayout(complete)
        self.regions_button = QPushButton("Draw complete-region rectangles")
        self.regions_button.setToolTip('adds a Shapes layer "<image> complete regions": every '
                                       "cell inside a rectangle must be painted")
        self.slice_check = QCheckBox("This slice is fully annotated")
        cl.addWidget(self.regions_button)
        cl.addWidget(self.slice_check)

        self.counts_label = QLabel("no annotation layer")
        self.counts_label.setWordWrap(True)
        self.status = _ui.StatusBox("")

        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip(f"write <image>{ANNOTATION_SUFFIX} (+ the image and the "
                                    "complete regions) into a folder")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip(f"open a saved *{ANNOTATION_SUFFIX} with its image")
        io_row = QHBoxLayout()
        io_row.addWidget(self.save_button)
        io_row.addWidget(self.load_button)

        body = QWidget()
        layout = _ui.scrolled(self, body)
        layout.addLayout(form)
        layout.addWidget(self.create_button)
        layout.addLayout(paint_row)
        layout.addWidget(complete)
        layout.addWidget(self.counts_label)
        layout.addWidget(self.status)
        layout.addLayout(io_row)
        layout.addWidget(legend)
        # Hook for more annotation tools (e.g. corrections from a segmentation).
        self.actions = QWidget()
        self.actions_layout = QVBoxLayout(self.actions)
        self.actions_layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.actions)
        layout.addStretch(1)
        self._build_corrections()

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.channel_combo.changed.connect(self._on_channel_changed)
        self.annotation_combo.currentIndexChanged.connect(self._on_annotation_changed)
        self.create_button.clicked.connect(self.create_annotation)
        self.background_button.clicked.connect(self.paint_background)
        self.next_cell_button.clicked.connect(self.next_cell_id)
        self.regions_button.clicked.connect(self.add_regions_layer)
        self.slice_check.toggled.connect(self._on_slice_toggled)
        self.save_button.clicked.connect(self._ask_save)
        self.load_button.clicked.connect(self._ask_load)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._on_image_changed()
        _ui.fit_width(self)

    # ------------------------------------------------------------ state

    def image_layer(self) -> Image | None:
        return self.image_combo.layer()

    def annotation_layer(self) -> Labels | None:
        return self.annotation_combo.layer()

    def _expected_shape(self, image: Image) -> tuple[int, ...]:
        return L.label_shape(image)

    def _on_image_changed(self, *_: Any) -> None:
        image = self.image_layer()
        self.channel_combo.set_layer(image)
        if image is not None:
            match = self._find_annotation(image)
            self.annotation_combo.set_layer(match)
        self.status.set(L.stack_hint(image) or "")
        self._on_annotation_changed()

    def _on_channel_changed(self, *_: Any) -> None:
        self.status.set("")

    def _find_annotation(self, image: Image) -> Labels | None:
        """An existing annotation layer for this image (tagged, or by name)."""
        shape = self._expected_shape(image)
        for layer in self.viewer.layers:
            meta = layer.metadata.get(L.TAG)
            if isinstance(layer, Labels) and isinstance(meta, dict) and \
                    meta.get("role") == "annotation" and meta.get("image") == image.name and \
                    layer.data.shape == shape:
                return layer
        name = annotation_name(image.name)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, Labels) and layer.data.shape == shape:
                return layer
        return None

    def _on_annotation_changed(self, *_: Any) -> None:
        layer = self.annotation_layer()
        if layer is self._annotation:
            self.update_counts()
            return
        if self._annotation is not None:
            for emitter in self._layer_emitters(self._annotation):
                emitter.disconnect(self._schedule_counts)
            self._unhook_corrections(self._annotation)
        self._annotation = layer
        self._merge_first = None
        if layer is not None:
            for emitter in self._layer_emitters(layer):
                emitter.connect(self._schedule_counts)
            self._hook_corrections(layer)
            image = self.image_layer()
            if image is not None and layer.data.shape != self._expected_shape(image):
                self.status.warning(
                    f"annotation {layer.name!r} has shape {layer.data.shape} but image "
                    f"{image.name!r} needs {self._expected_shape(image)}: pick another layer "
                    "under 'Annotation' or press 'Create / pick annotation layer'"
                )
            self.swatches[1].set_color(layer.get_color(BACKGROUND))
            self.swatches[2].set_color(layer.get_color(FIRST_CELL))
        self._on_step()
        self.update_counts()

    @staticmethod
    def _layer_emitters(layer: Labels) -> list:
        ev = layer.events
        return [ev.paint, ev.data, ev.labels_update]

    # ------------------------------------------------------------ actions

    def create_annotation(self) -> Labels | None:
        """Create (or pick the existing) "<image> annotation" layer; returns it."""
        image = self.image_layer()
        if image is None:
            self.status.error(L.image_problem(None))
            return None
        existing = self._find_annotation(image)
        if existing is not None:
            self.annotation_combo.set_layer(existing)
            self._activate(existing)
            return existing
        shape = self._expected_shape(image)
        if len(shape) < 2:
            self.status.error(f"{image.name!r} has shape {L.layer_array(image).shape}: an "
                              "image needs Y and X axes")
            return None
        scale, translate = L.spatial_transform(image, L.default_channel_axis(image),
                                               len(shape))
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint16),
            name=L.free_name(self.viewer, annotation_name(image.name)),
            scale=scale, translate=translate,
            metadata={L.TAG: {"role": "annotation", "image": image.name,
                              "complete_planes": []}},
        )
        layer.brush_size = 5
        self.annotation_combo.set_layer(layer)
        self.next_cell_id()
        return layer

    def _checked_annotation(self) -> Labels | None:
        layer = self.annotation_layer()
        if layer is None:
            self.status.error("no annotation layer: press 'Create / pick annotation layer' "
                              "first")
            return None
        return layer

    def _activate(self, layer: Any) -> None:
        self.viewer.layers.selection.active = layer

    def paint_background(self) -> None:
        layer = self._checked_annotation()
        if layer is None:
            return
        layer.selected_label = BACKGROUND
        self._activate(layer)
        layer.mode = "paint"

    def next_cell_id(self) -> int | None:
        """Select a label no cell uses yet (at least 2) and switch to painting."""
        layer = self._checked_annotation()
        if layer is None:
            return None
        data = np.asarray(layer.data)
        value = max(int(data.max()) + 1 if data.size else FIRST_CELL, FIRST_CELL)
        layer.selected_label = value
        self._activate(layer)
        layer.mode = "paint"
        return value

    def add_regions_layer(self) -> Any | None:
        """Create or select the image's "complete regions" Shapes layer, in rectangle mode."""
        image = self.image_layer()
        layer = self._checked_annotation()
        if image is None or layer is None:
            if image is None:
                self.status.error(L.image_problem(None))
            return None
        shapes = self._regions_layer(image, layer)
        self._activate(shapes)
        shapes.mode = "add_rectangle"
        return shapes

    # ------------------------------------------------------------ complete slices

    def _current_lead(self) -> tuple[int, ...] | None:
        layer = self.annotation_layer()
        if layer is None:
            return None
        return L.lead_index(L.plane_key(self.viewer, layer, None), None)

    def _on_step(self, *_: Any) -> None:
        layer = self.annotation_layer()
        lead = self._current_lead()
        self.slice_check.setEnabled(layer is not None)
        self.slice_check.setText("Whole image is fully annotated" if lead == ()
                                 else "This slice is fully annotated")
        self.slice_check.blockSignals(True)
        self.slice_check.setChecked(layer is not None and lead in A.complete_planes(layer))
        self.slice_check.blockSignals(False)
        if layer is not None and layer.data.size > _COUNT_LIMIT:
            self._schedule_counts()

    def _on_slice_toggled(self, checked: bool) -> None:
        layer = self.annotation_layer()
        lead = self._current_lead()
        if layer is None or lead is None:
            return
        if checked:
            missing = self._unpainted(layer, lead)
            where = "the whole image" if lead == () else "this slice"
            if missing >= UNPAINTED_WARN and not _ui.confirm(
                    self, f"About {missing} objects in {where} have no painted pixel. "
                    f"'Fully annotated' makes every unpainted pixel background, so training "
                    f"would learn those cells as background.\n\nMark {where} fully "
                    "annotated anyway?"):
                self.slice_check.blockSignals(True)
                self.slice_check.setChecked(False)
                self.slice_check.blockSignals(False)
                self.status.set(f"not marked: paint the ~{missing} unpainted objects first "
                                "(or draw complete-region rectangles around painted ones)")
                return
        A.set_plane_complete(layer, lead, checked)
        self.update_counts()

    def _unpainted(self, layer: Labels, lead: tuple[int, ...]) -> int:
        """Objects of the plane on screen with no painted pixel (see unpainted_objects)."""
        image = self.image_layer()
        if image is None:
            return 0
        key = L.annotation_plane_key(layer.data.shape, lead)
        ann = np.asarray(layer.data[key])
        own = L.owned_layer(self.viewer, "labels", image.name)
        reference = np.asarray(own.data[key]) if own is not None and \
            tuple(own.data.shape) == tuple(layer.data.shape) else None
        plane = None
        if reference is None:
            data, axis = L.model_input(image)
            full = list(L.input_plane_key(self.viewer, image))
            lead_iter = iter(lead)
            full = [next(lead_iter) if isinstance(k, int) else k for k in full]
            from ..segment import read_plane

            plane = read_plane(data, tuple(full), axis)
        try:
            return A.unpainted_objects(plane, ann, reference)
        except Exception:  # only a warning: never block the tick on a failed estimate
            return 0

    def set_slice_complete(self, complete: bool = True) -> None:
        """Declare the slice on screen fully annotated (or not)."""
        self.slice_check.setChecked(complete)

    # ------------------------------------------------------------ counts

    def _schedule_counts(self, *_: Any) -> None:
        self._count_timer.start()

    def update_counts(self) -> tuple[int, int] | None:
        layer = self.annotation_layer()
        if layer is None:
            self.counts_label.setText("no annotation layer")
            return None
        data = layer.data
        where = ""
        if data.size > _COUNT_LIMIT:
            key = L.annotation_plane_key(data.shape, self._current_lead() or ())
            data, where = data[key], " (this slice)"
        cells, background = count_annotation(data)
        n_complete = len(A.complete_planes(layer))
        text = (f"{_ui.bold(str(cells))} cells, {_ui.bold(f'{background:,}')} background "
                f"pixels{where}")
        if n_complete:
            text += f"; {n_complete} fully annotated slice(s)"
        if cells == 0:
            text += "<br>paint at least one cell (a value ≥ 2) to train"
        self.counts_label.setText(text)
        return cells, background

    # ------------------------------------------------------------ corrections

    def _build_corrections(self) -> None:
        """The "Correct a segmentation" group (in ``actions_layout``)."""
        self._merge_first: Any = None  # position of the first cell of a merge
        self._tool: str | None = None  # "delete" / "merge": clicks on the annotation act
        self._applying = False  # True while _apply writes an edit (recorded by _apply)
        box = QGroupBox("Correct a segmentation")
        lay = QVBoxLayout(box)
        form = QFormLayout()
        self.region_combo = QComboBox()
        for key, text in REGIONS.items():
            self.region_combo.addItem(text, key)
        self.region_combo.setToolTip("which part of the Segment widget's labels to turn into "
                                     "annotation (marked fully annotated)")
        self.shapes_combo = L.LayerCombo(self.viewer, (Shapes,), none_text="(none)",
                                         follow=False)
        self.shapes_combo.setToolTip("Shapes layer whose rectangles bound the region for "
                                     "'inside shapes' (e.g. the complete-regions layer)")
        form.addRow("Region", self.region_combo)
        form.addRow("Shapes", self.shapes_combo)
        lay.addLayout(form)
        self.convert_button = QPushButton("Correct from segmentation")
        self.convert_button.setToolTip(
            "copy the image's segmentation (Segment widget) into the annotation: cells keep "
            "their ids (≥ 2), the rest of the region becomes background (1); pixels you "
            "painted already are kept")
        lay.addWidget(self.convert_button)
        grid = QGridLayout()
        self.delete_button = QPushButton("Delete (click)")
        self.merge_button = QPushButton("Merge (2 clicks)")
        self.split_button = QPushButton("Split along line")
        self.paint_button = QPushButton("Paint missed cell")
        for k, (button, name) in enumerate(((self.delete_button, "delete"),
                                            (self.merge_button, "merge"),
                                            (self.split_button, "split"),
                                            (self.paint_button, "paint"))):
            key, text = SHORTCUTS[name]
            button.setToolTip(f"{text} [{key}]")
            grid.addWidget(button, k // 2, k % 2)
        self.delete_button.setCheckable(True)
        self.merge_button.setCheckable(True)
        lay.addLayout(grid)
        keys = QLabel("Keys, with the annotation layer selected:<br>" + "<br>".join(
            f"<b>{key.replace('-', '+')}</b> {text}" for key, text in SHORTCUTS.values())
            + "<br>Anywhere, while the Train / Segment widget is open:<br>"
            + _keys.describe(_keys.TRAIN, _keys.SEGMENT))
        keys.setWordWrap(True)
        lay.addWidget(keys)
        self.edited_label = QLabel("")
        self.edited_label.setWordWrap(True)
        lay.addWidget(self.edited_label)
        self.actions_layout.addWidget(box)

        self.region_combo.currentIndexChanged.connect(self._on_region_changed)
        self._on_region_changed()
        self.convert_button.clicked.connect(lambda: self.correct_from_segmentation())
        self.delete_button.toggled.connect(lambda on: self._set_tool("delete", on))
        self.merge_button.toggled.connect(lambda on: self._set_tool("merge", on))
        self.split_button.clicked.connect(self._split_button)
        self.paint_button.clicked.connect(lambda: self.paint_missed())

    def _on_region_changed(self, *_: Any) -> None:
        inside = self.region_combo.currentData() == "rectangles"
        self.shapes_combo.setEnabled(inside)
        image = self.image_layer()
        if inside and self.shapes_combo.layer() is None and image is not None:
            regions = A.find_regions_layer(self.viewer, image.name)
            if regions is not None:  # drawn for "fully annotated": the natural choice
                self.shapes_combo.set_layer(regions)

    def _hook_corrections(self, layer: Labels) -> None:
        """Shortcuts and the click tools on the annotation layer."""
        for name, (key, _) in SHORTCUTS.items():
            layer.bind_key(key, getattr(self, f"_key_{name}"), overwrite=True)
        if self._on_click not in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.append(self._on_click)
        layer.events.paint.connect(self._on_paint)

    def _unhook_corrections(self, layer: Labels) -> None:
        for key, _ in SHORTCUTS.values():
            layer.bind_key(key, None, overwrite=True)
        if self._on_click in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._on_click)
        layer.events.paint.disconnect(self._on_paint)

    def _on_paint(self, event: Any) -> None:
        """Hand strokes on an annotation converted from a segmentation are corrections."""
        layer = self.annotation_layer()
        meta = None if layer is None else layer.metadata.get(L.TAG)
        if isinstance(meta, dict) and meta.get("from_segmentation") and not self._applying:
            A.record_strokes(layer, getattr(event, "value", None))

    # ---- correct from segmentation

    def segmentation_layer(self) -> Labels | None:
        """The Segment widget's labels of the current image (its tagged output), if any."""
        image = self.image_layer()
        return None if image is None else L.owned_layer(self.viewer, "labels", image.name)

    def correct_from_segmentation(self, region: str | None = None) -> Labels | None:
        """Copy the image's segmentation into its annotation inside ``region`` ("image",
        "slice", "rectangles"; default the widget's choice) and mark that region fully
        annotated. Pixels already painted in the annotation are kept (new cells get ids
        above the annotation's). Returns the annotation layer, or None (reason in status).
        """
        region = region or self.region_combo.currentData()
        image = self.image_layer()
        if image is None:
            self.status.error(L.image_problem(None))
            return None
        seg = self.segmentation_layer()
        if seg is None:
            self.status.error(f"no segmentation of {image.name!r}: run the Segment widget on "
                              "it first (its labels layer is what gets corrected)")
            return None
        shape = self._expected_shape(image)
        if tuple(seg.data.shape) != shape:
            self.status.error(f"the segmentation {seg.name!r} has shape "
                              f"{tuple(seg.data.shape)} but {image.name!r} needs {shape}: "
                              "segment the whole image again with the current 'Channels'")
            return None
        shapes = None
        if region == "rectangles":
            shapes = self.shapes_combo.layer()
            if shapes is None or not len(shapes.data):
                self.status.error("'inside shapes': pick a Shapes layer under 'Shapes' and "
                                  "draw rectangles around the cells to correct")
                return None
            if shapes.ndim != len(shape):
                self.status.error(f"Shapes layer {shapes.name!r} has {shapes.ndim} "
                                  f"dimensions but the annotation {len(shape)}: draw the "
                                  "rectangles in a layer made for this image")
                return None
        layer = self.annotation_layer() or self.create_annotation()
        if layer is None:
            return None
        if tuple(layer.data.shape) != shape:
            self.status.error(f"annotation {layer.name!r} has shape {tuple(layer.data.shape)} "
                              f"but {image.name!r} needs {shape}: pick another layer under "
                              "'Annotation' or choose '(new)'")
            return None
        data = np.asarray(layer.data)
        lead = self._current_lead() or ()
        try:
            if region == "slice":
                key = L.annotation_plane_key(shape, lead)
                plane, mask = correct.labels_to_annotation(
                    np.asarray(seg.data[key]), base=data[key] if data[key].any() else None)
                out = data.astype(np.int32)
                out[key] = plane
                cells = len(np.unique(plane[mask & (plane >= FIRST_CELL)]))
            else:
                mask = None if shapes is None else \
                    np.asarray(shapes.to_masks(shape)).any(axis=0)
                out, mask = correct.labels_to_annotation(
                    np.asarray(seg.data), mask, base=data if data.any() else None)
                cells = sum(len(np.unique(out[k][mask[k] & (out[k] >= FIRST_CELL)]))
                            for k in np.ndindex(shape[:-2]))  # ids repeat across planes
        except ValueError as exc:
            self.status.error(_ui.gui_message(str(exc)))
            return None
        if out.max() <= np.iinfo(layer.data.dtype).max:
            out = out.astype(layer.data.dtype)
        layer.data = out
        A.annotation_meta(layer)["from_segmentation"] = seg.name
        # The converted region is fully annotated: whole planes, or the drawn shapes.
        if region == "image":
            for plane_lead in np.ndindex(shape[:-2]):
                A.set_plane_complete(layer, plane_lead, True)
        elif region == "slice":
            A.set_plane_complete(layer, lead, True)
        elif shapes is not None and shapes is not A.find_regions_layer(self.viewer,
                                                                        image.name):
            regions = self._regions_layer(image, layer)
            regions.add(list(shapes.data), shape_type=list(shapes.shape_type))
        self._on_step()
        where = REGIONS.get(region, region)
        keys = ", ".join(k.replace("-", "+") for k, _ in SHORTCUTS.values())
        self.status.set(f"{cells} cells from {seg.name!r} ({where}) are now in "
                        f"{layer.name!r}: fix the errors ({keys}), then train")
        self._activate(layer)
        layer.mode = "pan_zoom"
        return layer

    def _regions_layer(self, image: Image, layer: Labels) -> Shapes:
        shapes = A.find_regions_layer(self.viewer, image.name)
        if shapes is None:
            shapes = self.viewer.add_shapes(
                ndim=layer.ndim, name=A.regions_layer_name(image.name),
                scale=layer.scale, translate=layer.translate,
                edge_color="yellow", face_color=[1, 1, 0, 0.08], edge_width=2,
                metadata={L.TAG: {"role": "complete_regions", "image": image.name}},
            )
        return shapes

    # ---- quick corrections (each one a pure function of correct.py)

    def _plane_point(self, position: Any) -> tuple[tuple[int, ...], tuple[float, float]]:
        """(leading indices, (y, x)) in the annotation of a data-coordinate position."""
        layer = self.annotation_layer()
        pos = np.asarray(position, float)
        shape = layer.data.shape
        lead = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(pos[:-2], shape[:-2],
                                                                        strict=True))
        return lead, (float(pos[-2]), float(pos[-1]))

    def _cursor(self) -> Any:
        """The mouse position in the annotation layer's data coordinates."""
        return self.annotation_layer().world_to_data(self.viewer.cursor.position)

    def _apply(self, lead: tuple[int, ...], make: Any) -> correct.Edit | None:
        """Run ``make(plane) -> Edit`` on a plane, write the change undoably, record it."""
        layer = self._checked_annotation()
        if layer is None:
            return None
        key = L.annotation_plane_key(layer.data.shape, lead)
        plane = np.asarray(layer.data[key])
        try:
            edit = make(plane)
        except ValueError as exc:
            self.status.warning(str(exc))
            return None
        if edit.annotation.max() > np.iinfo(layer.data.dtype).max:
            self.status.error(f"cell id {int(edit.annotation.max())} does not fit the "
                              f"{layer.data.dtype} annotation {layer.name!r}")
            return None
        diff = np.nonzero(edit.annotation != plane)
        old = plane[diff]  # a copy (fancy indexing), taken before the write below
        if diff[0].size:
            index = tuple(np.full(diff[0].size, i) for i in lead) + diff
            self._applying = True  # its paint event is this edit, recorded whole below
            try:
                layer.data_setitem(index, edit.annotation[diff].astype(layer.data.dtype))
            finally:
                self._applying = False
        A.record_edit(layer, lead, diff, old, edit.changed)
        self.update_corrections()
        return edit

    def update_corrections(self) -> int:
        """Show how many recorded corrections are in effect (undone ones do not count)."""
        layer = self.annotation_layer()
        n = 0 if layer is None else len(A.live_edits(layer))
        self.edited_label.setText(f"{n} correction(s) recorded: the corrected cells weigh "
                                  "more in training" if n else "")
        return n

    def delete_at(self, position: Any) -> correct.Edit | None:
        """Delete the cell at ``position`` (annotation data coordinates)."""
        lead, yx = self._plane_point(position)
        edit = self._apply(lead, lambda p: correct.delete_object(p, yx))
        if edit is not None:
            self.status.set(f"deleted the cell at {tuple(round(v) for v in yx)}")
        return edit

    def merge_at(self, first: Any, second: Any) -> correct.Edit | None:
        """Merge the cell at ``second`` into the cell at ``first``."""
        lead, a = self._plane_point(first)
        lead_b, b = self._plane_point(second)
        if lead_b != lead:
            self.status.warning("merge: both cells must be on the same slice")
            return None
        edit = self._apply(lead, lambda p: correct.merge_objects(p, a, b))
        if edit is not None:
            self.status.set(f"merged into cell {edit.label}")
        return edit

    def split_along(self, polyline: Any) -> correct.Edit | None:
        """Split the cell crossed by ``polyline`` ((n, D) vertices, data coordinates)."""
        pts = np.asarray(polyline, float)
        lead, _ = self._plane_point(pts[0])
        edit = self._apply(lead, lambda p: correct.split_object(p, pts[:, -2:]))
        if edit is not None:
            self.status.set(f"split cell {edit.label}")
        return edit

    def paint_missed(self, mask: np.ndarray | None = None,
                     lead: tuple[int, ...] | None = None) -> int | None:
        """Paint a missed cell: with ``mask`` (bool, one plane) at once, else select the
        next free id and the brush so the user paints it; either way the cell counts as a
        correction. Returns its id."""
        layer = self._checked_annotation()
        if layer is None:
            return None
        lead = self._current_lead() or () if lead is None else tuple(lead)
        label = max(int(np.max(layer.data, initial=0)) + 1, FIRST_CELL)  # free on all planes
        if mask is None:
            self.next_cell_id()
            A.remember_painted(layer, lead, label)
            return label
        edit = self._apply(lead, lambda p: correct.paint_cell(p, mask, label))
        return None if edit is None else edit.label

    def split_lines_layer(self) -> Shapes | None:
        """The image's "split lines" Shapes layer (created in path mode when missing)."""
        image, layer = self.image_layer(), self._checked_annotation()
        if image is None or layer is None:
            return None
        name = f"{image.name} split lines"
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Shapes):
            return self.viewer.layers[name]
        shapes = self.viewer.add_shapes(
            ndim=layer.ndim, name=name, scale=layer.scale, translate=layer.translate,
            edge_color="magenta", edge_width=1,
            metadata={L.TAG: {"role": "split_lines", "image": image.name}})
        shapes.bind_key(SHORTCUTS["split"][0], self._key_split, overwrite=True)
        return shapes

    def split_last_line(self) -> correct.Edit | None:
        """Split along the last line drawn in the split-lines layer, then remove the line."""
        shapes = self.split_lines_layer()
        if shapes is None:
            return None
        if not len(shapes.data):
            self._activate(shapes)
            shapes.mode = "add_path"
            self.status.set("draw a line across the cell to split (click points, "
                            f"double-click to end), then press {SHORTCUTS['split'][0]}")
            return None
        # Made with the annotation's scale and translate: its data coordinates are ours.
        edit = self.split_along(np.asarray(shapes.data[-1]))
        if edit is not None:
            shapes.selected_data = {len(shapes.data) - 1}
            shapes.remove_selected()
        return edit

    def _split_button(self) -> None:
        self.split_last_line()

    def _set_tool(self, name: str, on: bool) -> None:
        other = self.merge_button if name == "delete" else self.delete_button
        if on:
            other.setChecked(False)
            layer = self._checked_annotation()
            if layer is not None:
                self._activate(layer)
                layer.mode = "pan_zoom"  # clicks select cells instead of painting
                self.status.set("click a cell to delete" if name == "delete" else
                                "click the two cells to merge")
        self._tool = name if on else (None if self._tool == name else self._tool)
        self._merge_first = None

    def _on_click(self, layer: Labels, event: Any) -> None:
        if self._tool is None or layer.mode != "pan_zoom":
            return
        position = layer.world_to_data(event.position)
        if self._tool == "delete":
            self.delete_at(position)
        else:
            self._merge_step(position)

    def _merge_step(self, position: Any) -> correct.Edit | None:
        """First call remembers a cell, the second merges the two."""
        if self._merge_first is None:
            layer = self._checked_annotation()
            if layer is None:
                return None
            lead, yx = self._plane_point(position)
            plane = np.asarray(layer.data[L.annotation_plane_key(layer.data.shape, lead)])
            try:  # say at once when the first point misses a cell
                correct.merge_objects(plane, yx, yx, gap=0)
            except ValueError as exc:
                self.status.warning(str(exc))
                return None
            self._merge_first = position
            self.status.set("merge: now the second cell")
            return None
        first, self._merge_first = self._merge_first, None
        return self.merge_at(first, position)

    # key callbacks (napari passes the layer); the tests call these as the keys do
    def _key_delete(self, _layer: Any = None) -> None:
        self.delete_at(self._cursor())

    def _key_merge(self, _layer: Any = None) -> None:
        self._merge_step(self._cursor())

    def _key_split(self, _layer: Any = None) -> None:
        self.split_last_line()

    def _key_paint(self, _layer: Any = None) -> None:
        self.paint_missed()

    # ------------------------------------------------------------ save / load

    def _ask_save(self) -> None:
        _io.ask_save(self)

    def save_to(self, folder: str | Path, overwrite: bool | None = None) -> Path | None:
        """Write ``<stem>_annotation.tif`` (+ sidecar JSON, + the image if it has no file);
        ``overwrite=None`` asks before replacing files."""
        return _io.save_to(self, folder, overwrite)

    def _ask_load(self) -> None:
        _io.ask_load(self)

    def load_from(self, path: str | Path) -> Labels | None:
        """Open a saved annotation with its image (reusing an open image layer)."""
        return _io.load_from(self, path)


__all__ = ["AnnotateWidget", "count_annotation"]
