"""Per-object measurements of a Labels layer: attached as the layer's ``features``, shown in
a table, saved as CSV. Thin over :mod:`napari_unet.measure`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..measure import Table, measure, write_csv
from . import _layers, _ui

NO_IMAGE = "(no intensities)"
MAX_ROWS_SHOWN = 2000  # a Qt table with more rows gets slow; the CSV has them all


def measure_layer(labels: Labels, image: Image | None = None, *, mode: str = "planes") -> Table:
    """Measure ``labels`` (intensities from ``image``) and attach the table as its features.

    An image with one more axis than the labels is read with that first extra axis as
    channels (one intensity column per channel). The features get an ``index`` column (the
    label value), which napari uses to show an object's row under the mouse.
    """
    data = _layers.layer_array(labels)
    img, axis = None, None
    if image is not None:
        img = _layers.layer_array(image)
        if img.ndim == data.ndim + 1:
            axis = next(i for i in range(img.ndim)
                        if img.shape[:i] + img.shape[i + 1:] == tuple(data.shape))
        elif tuple(img.shape) != tuple(data.shape):
            raise ValueError(f"image '{image.name}' {tuple(img.shape)} and labels "
                             f"'{labels.name}' {tuple(data.shape)} differ in shape")
    table = measure(data, img, mode=mode, channel_axis=axis)
    labels.features = {"index": table["label"], **table}
    return table


class MeasureWidget(QWidget):
    """Pick a Labels layer (and an image for intensities), measure, see the table, save CSV."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.table: Table | None = None
        self.labels_combo = QComboBox()
        self.image_combo = QComboBox()
        self.mode_3d = QCheckBox("3D objects (stitched stacks: volume)")
        self.measure_button = QPushButton("Measure")
        self.save_button = QPushButton("Save CSV…")
        self.save_button.setEnabled(False)
        self.status = QLabel("pick a Labels layer and press Measure")
        self.status.setWordWrap(True)
        self.view = QTableWidget()
        self.view.setEditTriggers(QTableWidget.NoEditTriggers)
        self.view.setSortingEnabled(True)

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Intensities", self.image_combo)
        form.addRow(self.mode_3d)
        buttons = QHBoxLayout()
        buttons.addWidget(self.measure_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.view, 1)

        self.measure_button.clicked.connect(self.run)
        self.save_button.clicked.connect(self._ask_save)
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.reordered):
            emitter.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Re-list the layers, keeping the current picks."""
        for combo, kind, extra in ((self.labels_combo, Labels, []),
                                   (self.image_combo, Image, [NO_IMAGE])):
            current = combo.currentText()
            names = extra + [lay.name for lay in self.viewer.layers if isinstance(lay, kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _layer(self, combo: QComboBox) -> Any | None:
        try:
            return self.viewer.layers[combo.currentText()]
        except KeyError:
            return None

    def run(self) -> Table | None:
        """Measure the picked layer, attach the features and fill the table."""
        labels = self._layer(self.labels_combo)
        if labels is None:
            _ui.notify_error("no Labels layer to measure: segment an image first")
            return None
        image = self._layer(self.image_combo)
        mode = "3d" if self.mode_3d.isChecked() else "planes"
        try:
            table = measure_layer(labels, image, mode=mode)
        except ValueError as exc:
            _ui.notify_error(f"cannot measure '{labels.name}': {exc}")
            return None
        self.table = table
        self.show_table(table)
        n = len(table["label"])
        self.status.setText(f"{n} object(s) in '{labels.name}'; the table is also the "
                            "layer's features (hover an object to see its row)")
        self.save_button.setEnabled(n > 0)
        return table

    def show_table(self, table: Table) -> None:
        cols = list(table)
        n = min(len(table[cols[0]]) if cols else 0, MAX_ROWS_SHOWN)
        self.view.setSortingEnabled(False)
        self.view.clear()
        self.view.setColumnCount(len(cols))
        self.view.setRowCount(n)
        self.view.setHorizontalHeaderLabels(cols)
        for j, col in enumerate(cols):
            values = table[col]
            for i in range(n):
                item = QTableWidgetItem()
                v = values[i]
                # numbers as data (not text) so that sorting a column sorts numerically
                item.setData(0, round(float(v), 3) if np.issubdtype(type(v), np.floating)
                             else int(v) if np.issubdtype(type(v), np.integer) else str(v))
                self.view.setItem(i, j, item)
        self.view.setSortingEnabled(True)
        self.view.resizeColumnsToContents()

    def _ask_save(self) -> None:
        labels = self._layer(self.labels_combo)
        stem = _ui.file_stem(labels) if labels is not None else "objects"
        path, _ = QFileDialog.getSaveFileName(self, "Save measurements",
                                              f"{stem}_measurements.csv", "CSV (*.csv)")
        if path:
            # the dialog asked before returning an existing file
            self.save_csv(path, overwrite=True)

    def save_csv(self, path: str | Path, *, overwrite: bool = False) -> Path | None:
        if self.table is None:
            _ui.notify_error("nothing measured yet: press Measure first")
            return None
        try:
            out = write_csv(self.table, path, overwrite=overwrite)
        except (OSError, FileExistsError) as exc:
            _ui.notify_error(f"could not save the table: {exc}")
            return None
        _ui.notify_info(f"measurements saved to {out}")
        return out
