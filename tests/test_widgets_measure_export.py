"""The Measure widget, the 'Export to bioimage.io…' button and opening a bioimage.io
package in napari (needs Qt and a display: run under xvfb-run)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from _display import require_display

require_display()

from napari_unet._widgets import _models  # noqa: E402
from napari_unet._widgets.export import ExportButton  # noqa: E402
from napari_unet._widgets.measure import MeasureWidget, measure_layer  # noqa: E402
from napari_unet.model import ModelConfig, UNet  # noqa: E402
from napari_unet.sample import load_sample  # noqa: E402

pytestmark = pytest.mark.widgets
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_registry():
    _models.REGISTRY.clear()
    yield
    _models.REGISTRY.clear()


def test_measure_widget_features_table_and_csv(make_napari_viewer, notes, tmp_path):
    viewer = make_napari_viewer()
    image, _, truth = load_sample()
    viewer.add_image(image, name="nuclei")
    labels = viewer.add_labels(truth.astype(np.int32), name="nuclei labels")
    w = MeasureWidget(viewer)
    viewer.window.add_dock_widget(w, name="Measure")
    assert w.labels_combo.currentText() == "nuclei labels"
    w.image_combo.setCurrentText("nuclei")
    table = w.run()
    n = len(np.unique(truth)) - 1
    assert len(table["label"]) == n and w.view.rowCount() == n
    features = labels.features
    assert list(features["index"]) == list(table["label"])
    assert {"area", "mean_intensity", "eccentricity", "solidity"} <= set(features.columns)
    headers = [w.view.horizontalHeaderItem(j).text() for j in range(w.view.columnCount())]
    assert headers[:3] == ["label", "area", "centroid_y"]
    out = w.save_csv(tmp_path / "cells.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == n and float(rows[0]["mean_intensity"]) > 0
    assert w.save_csv(tmp_path / "cells.csv") is None  # exists: not replaced unasked
    assert any("exists" in m for level, m in notes if level == "error")


def test_measure_layer_stack_with_channels(make_napari_viewer):
    viewer = make_napari_viewer()
    lab = np.zeros((2, 16, 16), np.int32)
    lab[0, 2:6, 2:6] = 5
    lab[1, 8:12, 8:12] = 7
    img = viewer.add_image(np.ones((2, 2, 16, 16), np.float32), name="img")  # (Z, C, Y, X)
    layer = viewer.add_labels(lab)
    table = measure_layer(layer, img)
    assert table["plane"].tolist() == [0, 1] and "mean_intensity_c1" in table


def test_export_button_writes_a_valid_package(qtbot, notes, tmp_path, monkeypatch):
    pytest.importorskip("bioimageio.core")
    monkeypatch.setenv("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")
    empty = ExportButton(lambda: None)
    assert empty.export_to(tmp_path / "none.zip") is None
    assert "no model to export" in notes[-1][1]
    model = UNet(ModelConfig(depth=3, base_channels=8))
    button = ExportButton(lambda: model)
    qtbot.addWidget(button)
    worker = button.export_to(tmp_path / "tiny.zip", start=False)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        worker.start()
    assert (tmp_path / "tiny.zip").is_file() and button.isEnabled()
    assert any("tiny.zip" in m for level, m in notes if level == "info"), notes
    from napari_unet.bioimageio import validate_package

    assert validate_package(tmp_path / "tiny.zip").status == "valid-format"


def test_open_package_in_napari_registers_model(npe2pm, make_napari_viewer, notes, tmp_path,
                                                monkeypatch):
    pytest.importorskip("bioimageio.core")
    monkeypatch.setenv("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")
    from napari_unet._widgets import SegmentWidget
    from napari_unet.bioimageio import export_model

    package = export_model(UNet(ModelConfig(depth=3, base_channels=8)), tmp_path / "pkg.zip",
                           torchscript=False)
    with npe2pm.tmp_plugin(manifest=str(ROOT / "napari.yaml")):
        viewer = make_napari_viewer()
        _, sw = viewer.window.add_plugin_dock_widget("napari-unet", "Segment")
        assert isinstance(sw, SegmentWidget)
        assert viewer.open(str(package), plugin="napari-unet") == []
        assert sw.model_picker.label() == "file: pkg.zip"
        assert sw.model_picker.model().config.depth == 3
