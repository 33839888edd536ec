"""Tests for napari_unet.io (no Qt, all data made in tmp_path)."""

from __future__ import annotations

import json

import dask.array as da
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

from napari_unet.io import (
    create_label_store,
    read_axes,
    read_image,
    write_labels,
    write_ome_zarr_image,
    write_ome_zarr_labels,
)


def _labels(shape, seed=0, dtype=np.uint32):
    return np.random.default_rng(seed).integers(0, 50, size=shape).astype(dtype)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or p.name.endswith(".old"))


@pytest.mark.parametrize("shape", [(40, 50), (6, 40, 50), (2, 3, 16, 20)])
def test_tiff_roundtrip(tmp_path, shape):
    labels = _labels(shape)
    path = tmp_path / "labels.tif"
    write_labels(path, labels)
    out = read_image(path)
    assert isinstance(out, da.Array)
    assert out.shape == shape and out.dtype == labels.dtype
    np.testing.assert_array_equal(out.compute(), labels)
    assert _leftovers(tmp_path) == []  # temp file renamed away
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_tiff_read_is_lazy_one_plane_per_chunk(tmp_path):
    stack = np.arange(5 * 30 * 40, dtype=np.uint16).reshape(5, 30, 40)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, compression="zlib")
    # Corrupt the compressed data of the last page: only reading that plane may fail.
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[4].dataoffsets[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 16)
    img = read_image(path)
    assert isinstance(img, da.Array)
    assert img.chunks == ((1,) * 5, (30,), (40,))
    np.testing.assert_array_equal(img[0].compute(), stack[0])
    np.testing.assert_array_equal(img[:4].compute(), stack[:4])
    with pytest.raises(Exception):  # noqa: B017 - codec error type is imagecodecs internal
        img[4].compute()


def test_tiff_2d_strips_become_one_block(tmp_path):
    image = np.random.default_rng(1).random((300, 200), dtype=np.float32)
    path = tmp_path / "strips.tiff"
    tifffile.imwrite(path, image, rowsperstrip=16, compression="zlib")
    img = read_image(path)
    assert img.numblocks == (1, 1)
    np.testing.assert_array_equal(img.compute(), image)


def test_tiff_axes(tmp_path):
    ome = tmp_path / "img.ome.tif"
    tifffile.imwrite(ome, np.zeros((2, 3, 16, 16), np.uint8), metadata={"axes": "TCYX"})
    assert read_axes(ome) == "tcyx"
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij, np.zeros((4, 2, 16, 16), np.uint16), imagej=True, metadata={"axes": "ZCYX"}
    )
    assert read_axes(ij) == "zcyx"
    rgb = tmp_path / "rgb.ome.tif"
    tifffile.imwrite(rgb, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    assert read_axes(rgb) == "yxc"
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    assert read_axes(plain) is None
    assert read_image(ome).shape == (2, 3, 16, 16)


def test_png_kept_as_is(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 255, (12, 10, 4), dtype=np.uint8)
    path = tmp_path / "img.png"
    iio.imwrite(path, rgba)
    out = read_image(path)
    assert isinstance(out, da.Array)
    np.testing.assert_array_equal(out.compute(), rgba)
    assert read_axes(path) is None


def test_zarr_roundtrip_numpy_and_plane_chunks(tmp_path):
    labels = _labels((4, 24, 32), dtype=np.uint16)
    path = tmp_path / "labels.zarr"
    write_labels(path, labels)
    out = read_image(path)
    assert out.chunks == ((1,) * 4, (24,), (32,))
    np.testing.assert_array_equal(out.compute(), labels)
    assert _leftovers(tmp_path) == []


def test_write_labels_from_dask(tmp_path):
    labels = _labels((6, 20, 24))
    lazy = da.from_array(labels, chunks=(3, 10, 24))
    write_labels(tmp_path / "a.tif", lazy)
    write_labels(tmp_path / "a.zarr", lazy)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif").compute(), labels)
    np.testing.assert_array_equal(read_image(tmp_path / "a.zarr").compute(), labels)
    # Chunked on two leading axes: planes still come out in C order.
    lazy4 = da.from_array(_labels((2, 3, 8, 8), seed=3), chunks=(1, 2, 8, 4))
    write_labels(tmp_path / "b.tif", lazy4)
    np.testing.assert_array_equal(read_image(tmp_path / "b.tif").compute(), lazy4.compute())


def test_write_labels_overwrite(tmp_path):
    for name in ("seg.tif", "seg.zarr"):
        path = tmp_path / name
        write_labels(path, _labels((8, 8), seed=1))
        with pytest.raises(FileExistsError, match="overwrite=True"):
            write_labels(path, _labels((8, 8), seed=2))
        np.testing.assert_array_equal(read_image(path).compute(), _labels((8, 8), seed=1))
        write_labels(path, _labels((8, 8), seed=2), overwrite=True)
        np.testing.assert_array_equal(read_image(path).compute(), _labels((8, 8), seed=2))
    assert _leftovers(tmp_path) == []


def test_overwrite_with_labels_read_lazily_from_same_path(tmp_path):
    for name in ("seg.tif", "seg.zarr"):
        path = tmp_path / name
        write_labels(path, _labels((3, 8, 8)))
        edited = read_image(path) + 1  # still lazy, reads from `path` while writing
        write_labels(path, edited, overwrite=True)
        np.testing.assert_array_equal(read_image(path).compute(), _labels((3, 8, 8)) + 1)


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="integer"):
        write_labels(tmp_path / "f.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\.zarr"):
        write_labels(tmp_path / "f.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(tmp_path / "missing" / "f.tif", np.zeros((4, 4), np.uint8))


def test_create_label_store(tmp_path):
    path = tmp_path / "store.zarr"
    store = create_label_store(path, (3, 20, 30))
    assert store.dtype == np.uint32 and store.chunks == (1, 20, 30)
    store[1] = 7
    out = read_image(path).compute()
    assert out[0].max() == 0 and (out[1] == 7).all()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        create_label_store(path, (3, 20, 30))
    store = create_label_store(path, (2, 5, 5), np.uint16, overwrite=True)
    assert read_image(path).shape == (2, 5, 5)


def test_ome_zarr_image_roundtrip_and_axes(tmp_path):
    image = np.random.default_rng(4).integers(0, 4000, (2, 5, 16, 20), dtype=np.uint16)
    path = write_ome_zarr_image(tmp_path / "img.zarr", image, "czyx")
    out = read_image(path)
    np.testing.assert_array_equal(out.compute(), image)
    assert read_axes(path) == "czyx"
    meta = json.loads((tmp_path / "img.zarr" / ".zattrs").read_text())
    ms = meta["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["type"] for a in ms["axes"]] == ["channel", "space", "space", "space"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0] * 4
    zarray = json.loads((tmp_path / "img.zarr" / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/"
    with pytest.raises(ValueError, match="level 1"):
        read_image(path, level=1)
    with pytest.raises(ValueError, match="axes"):
        write_ome_zarr_image(tmp_path / "bad.zarr", image, "zcyx")
    with pytest.raises(FileExistsError):
        write_ome_zarr_image(path, image, "czyx")


def test_ome_zarr_multiscale_level(tmp_path):
    root = zarr.open_group(str(tmp_path / "ms.zarr"), mode="w", zarr_format=2)
    full = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    root.create_array("s0", data=full)
    root.create_array("s1", data=full[::2, ::2])
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "s0"}, {"path": "s1"}],
        }
    ]
    assert read_image(tmp_path / "ms.zarr").shape == (16, 16)
    np.testing.assert_array_equal(read_image(tmp_path / "ms.zarr", level=1), full[::2, ::2])
    assert read_axes(tmp_path / "ms.zarr") == "yx"


def test_ome_zarr_labels_structure(tmp_path):
    image = np.zeros((2, 4, 12, 14), np.uint16)
    img_path = write_ome_zarr_image(tmp_path / "img.zarr", image, "czyx")
    seg = _labels((4, 12, 14))  # no channel axis: inserted as size 1
    out = write_ome_zarr_labels(img_path, seg)
    assert out == str(tmp_path / "img.zarr" / "labels" / "segmentation")

    labels_attrs = json.loads((tmp_path / "img.zarr" / "labels" / ".zattrs").read_text())
    assert labels_attrs == {"labels": ["segmentation"]}
    attrs = json.loads((tmp_path / "img.zarr" / "labels" / "segmentation" / ".zattrs").read_text())
    assert attrs["image-label"] == {"version": "0.4", "source": {"image": "../../"}}
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0"]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}
    ]

    back = read_image(out)
    assert back.shape == (1, 4, 12, 14)
    np.testing.assert_array_equal(back[0].compute(), seg)
    assert read_axes(out) == "czyx"
    # The image itself is still what read_image returns for the root.
    assert read_image(img_path).shape == image.shape

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_ome_zarr_labels(img_path, seg)
    write_ome_zarr_labels(img_path, seg + 1, overwrite=True)
    np.testing.assert_array_equal(read_image(out)[0].compute(), seg + 1)
    write_ome_zarr_labels(img_path, da.from_array(seg, chunks=(2, 12, 14)), name="nuclei")
    labels_attrs = json.loads((tmp_path / "img.zarr" / "labels" / ".zattrs").read_text())
    assert labels_attrs["labels"] == ["segmentation", "nuclei"]
    assert _leftovers(tmp_path / "img.zarr" / "labels") == []

    with pytest.raises(ValueError, match="do not match"):
        write_ome_zarr_labels(img_path, _labels((4, 12, 13)), name="bad")


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        read_axes(tmp_path / "nope.zarr")
    with pytest.raises(FileNotFoundError):
        write_ome_zarr_labels(tmp_path / "nope.zarr", np.zeros((4, 4), np.uint8))


def test_non_image_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*unsupported file type"):
        read_image(text)
    fake = tmp_path / "fake.tif"
    fake.write_text("not a tiff")
    with pytest.raises(ValueError, match=r"fake\.tif.*not a readable TIFF"):
        read_image(fake)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a Zarr store"):
        read_image(folder)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("a", shape=(4, 4), dtype="u1")
    group.create_array("b", shape=(4, 4), dtype="u1")
    with pytest.raises(ValueError, match="no single image"):
        read_image(tmp_path / "g.zarr")
    with pytest.raises(ValueError, match="level 2"):
        read_image(tmp_path / "g.zarr" / "a", level=2)


def test_plain_group_with_single_array(tmp_path):
    group = zarr.open_group(str(tmp_path / "one.zarr"), mode="w")  # zarr v3 format
    group.create_array("data", data=np.arange(12, dtype=np.int16).reshape(3, 4))
    np.testing.assert_array_equal(read_image(tmp_path / "one.zarr"), np.arange(12).reshape(3, 4))
    assert read_axes(tmp_path / "one.zarr") is None


def test_atomic_path_keeps_the_old_output_when_writing_fails(tmp_path):
    from napari_unet import atomic

    for final in (tmp_path / "a.tif", tmp_path / "b.zarr"):
        write_labels(final, np.ones((2, 8, 8), np.int32))
        before = np.asarray(read_image(final))
        with pytest.raises(OSError, match="full"), atomic.atomic_path(final) as tmp:
            tmp.mkdir() if final.suffix == ".zarr" else tmp.write_bytes(b"half")
            raise OSError(28, "disk full")
        np.testing.assert_array_equal(np.asarray(read_image(final)), before)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # Replacing a folder moves the old one aside first and deletes it only on success.
    write_labels(tmp_path / "b.zarr", np.full((2, 8, 8), 5, np.int32), overwrite=True)
    assert int(np.asarray(read_image(tmp_path / "b.zarr")).max()) == 5
    assert atomic.remove_stale_temporaries(tmp_path / "b.zarr") == []


def test_label_attrs_round_trip(tmp_path):
    from napari_unet.io import read_label_attrs

    attrs = {"napari_unet": {"complete": True, "record": {"input": {"shape": [2, 8, 8]}}}}
    for name in ("l.tif", "l.ome.tif", "l.zarr"):
        write_labels(tmp_path / name, np.ones((2, 8, 8), np.int32), attrs=attrs)
        assert read_label_attrs(tmp_path / name) == attrs
        assert np.asarray(read_image(tmp_path / name)).shape == (2, 8, 8)
    tifffile.imwrite(tmp_path / "plain.tif", np.ones((8, 8), np.uint8))
    assert read_label_attrs(tmp_path / "plain.tif") is None
    assert read_label_attrs(tmp_path / "missing.tif") is None
