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
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..targets import BACKGROUND, FIRST_CELL
from . import _annotation_io as _io
from . import _annotations as A
from . import _layers as L
from . import _ui
from ._annotation_io import ANNOTATION_SUFFIX, annotation_name

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
        self._annotation = layer
        if layer is not None:
            for emitter in self._layer_emitters(layer):
                emitter.connect(self._schedule_counts)
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
        shapes = A.find_regions_layer(self.viewer, image.name)
        if shapes is None:
            shapes = self.viewer.add_shapes(
                ndim=layer.ndim, name=A.regions_layer_name(image.name),
                scale=layer.scale, translate=layer.translate,
                edge_color="yellow", face_color=[1, 1, 0, 0.08], edge_width=2,
                metadata={L.TAG: {"role": "complete_regions", "image": image.name}},
            )
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
