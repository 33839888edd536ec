"""Per-object measurements: values against hand-computed ones, stacks, 3D, CSV, CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_unet.measure import append_tables, measure, write_csv


def _two_squares() -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:7] = 4  # 4 x 4 square
    labels[10:12, 10:20] = 9  # 2 x 10 bar
    image = np.arange(600, dtype=np.float32).reshape(20, 30)
    return labels, image


def test_plane_values():
    labels, image = _two_squares()
    t = measure(labels, image)
    assert t["label"].tolist() == [4, 9]
    assert t["area"].tolist() == [16, 20]
    np.testing.assert_allclose(t["centroid_y"], [3.5, 10.5])
    np.testing.assert_allclose(t["centroid_x"], [4.5, 14.5])
    assert t["bbox_min_y"].tolist() == [2, 10] and t["bbox_max_x"].tolist() == [7, 20]
    assert t["min_intensity"][0] == image[2, 3] and t["max_intensity"][0] == image[5, 6]
    np.testing.assert_allclose(t["mean_intensity"][1], image[10:12, 10:20].mean())
    assert t["eccentricity"][0] == pytest.approx(0.0, abs=1e-6)  # a square
    assert t["eccentricity"][1] > 0.9 and t["solidity"].tolist() == [1.0, 1.0]


def test_stack_planes_channels_and_3d():
    labels, image = _two_squares()
    stack = np.stack([labels, np.where(labels == 4, 4, 0)])
    t = measure(stack, np.stack([image, image]))
    assert t["plane"].tolist() == [0, 0, 1] and t["label"].tolist() == [4, 9, 4]
    multi = measure(labels, np.stack([image, 2 * image]), channel_axis=0)
    np.testing.assert_allclose(multi["mean_intensity_c1"], 2 * multi["mean_intensity_c0"])
    vol = measure(stack, np.stack([image, image]), mode="3d", spacing=(2.0, 1.0, 1.0))
    assert vol["volume"].tolist() == [2 * 32, 2 * 20]  # physical: voxel depth 2
    assert "eccentricity" not in vol and "centroid_z" in vol
    assert np.isnan(vol["solidity"][1])  # one plane thick: no convex volume
    with pytest.raises(ValueError, match="channel axis"):
        measure(labels, np.stack([image, image]))
    empty = measure(np.zeros((8, 8), np.int32))
    assert len(empty["label"]) == 0


def test_csv(tmp_path):
    labels, image = _two_squares()
    table = append_tables([("a.tif", measure(labels, image))])
    path = write_csv(table, tmp_path / "m.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["image"] == "a.tif" and rows[1]["label"] == "9" and rows[1]["area"] == "20"
    with pytest.raises(FileExistsError):
        write_csv(table, path)
    with pytest.raises(ValueError, match="different columns"):
        append_tables([("a", measure(labels, image)), ("b", measure(labels))])


@pytest.mark.slow
def test_cli_segment_measure_sample(tmp_path, one_torch_thread):
    from napari_unet import io
    from napari_unet.cli import main
    from napari_unet.model import bundled_model_path

    sample = bundled_model_path().parents[1] / "data" / "nuclei_crop.tif"
    out, table = tmp_path / "labels.tif", tmp_path / "cells.csv"
    assert main(["segment", str(sample), "-o", str(out), "--measure", str(table),
                 "--device", "cpu"]) == 0
    labels = np.asarray(io.read_image(out))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(np.unique(labels)) - 1 > 10
    assert {"label", "area", "centroid_y", "mean_intensity", "solidity"} <= set(rows[0])
    # an existing table is not replaced without --overwrite
    assert main(["segment", str(sample), "-o", str(tmp_path / "l2.tif"), "--measure",
                 str(table), "--device", "cpu"]) == 2
