"""OME-Zarr writing checked against a maintained NGFF validator (ngff-zarr's bundled JSON
schemas of the specification) for NGFF 0.4 (zarr v2) and 0.5 (zarr v3): images, labels
added to them, and label pyramids matching the image's."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet.io import read_image, write_ome_zarr_image, write_ome_zarr_labels

ngff_zarr = pytest.importorskip("ngff_zarr")
pytest.importorskip("jsonschema")


def _attrs(path) -> dict:
    return zarr.open_group(str(path), mode="r", use_consolidated=False).attrs.asdict()


def _validate(attrs: dict, version: str, model: str) -> None:
    ngff_zarr.validate(attrs, version=version, model=model)
    if model == "image":
        # The strict schema's SHOULDs too (downscaling type and metadata). Not for labels:
        # strict wants a colour per label id, which would bloat metadata with every cell.
        ngff_zarr.validate(attrs, version=version, model=model, strict=True)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_image_labels_and_pyramid_validate(tmp_path, version):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (2, 3, 40, 52), dtype=np.uint16)
    path = write_ome_zarr_image(tmp_path / "img.zarr", image, "czyx", version=version,
                                levels=3)
    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    _validate(_attrs(path), version, "image")

    labels = np.zeros((3, 40, 52), np.int32)  # no channel axis: inserted as size 1
    labels[:, 5:20, 7:30] = 3
    labels[1, 25:39, 30:51] = 8
    out = write_ome_zarr_labels(path, labels, "cells")
    _validate(_attrs(out), version, "label")

    image_ms = _attrs(path).get("ome", _attrs(path))["multiscales"][0]
    label_ms = _attrs(out).get("ome", _attrs(out))["multiscales"][0]
    assert [d["path"] for d in label_ms["datasets"]] == [d["path"] for d in image_ms["datasets"]]
    assert [d["coordinateTransformations"] for d in label_ms["datasets"]] == \
        [d["coordinateTransformations"] for d in image_ms["datasets"]]
    label_group = zarr.open_group(out, mode="r")
    for ds in image_ms["datasets"]:
        img_shape = group[ds["path"]].shape
        lab = label_group[ds["path"]]
        assert lab.shape == (1, *img_shape[1:])
        assert lab.dtype == np.int32
    # nearest neighbour: level 1 takes every other pixel, ids are never blended
    np.testing.assert_array_equal(label_group["1"][0], labels[:, ::2, ::2])
    np.testing.assert_array_equal(read_image(out).compute()[0], labels)
    assert set(np.unique(label_group["2"][...])) <= {0, 3, 8}

    # a second label image is listed next to the first
    write_ome_zarr_labels(path, labels > 0, "mask")
    listing = _attrs(tmp_path / "img.zarr" / "labels")
    assert listing.get("ome", listing)["labels"] == ["cells", "mask"]
    with pytest.raises(FileExistsError):
        write_ome_zarr_labels(path, labels, "cells")


def test_unknown_version_refused(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        write_ome_zarr_image(tmp_path / "x.zarr", np.zeros((8, 8), np.uint8), "yx",
                             version="0.3")
