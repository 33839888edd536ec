"""The CLI segment path never loads a whole stack: zarr / TIFF / OME-Zarr outputs, resume."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from skimage.segmentation import relabel_sequential

from _synthetic import touching_disks
from napari_unet import io
from napari_unet.augment import AugmentConfig
from napari_unet.batch import PLANE_STRIDE, PROGRESS_DIR, Job, StitchSettings, segment_batch
from napari_unet.batch_plan import resolve_channel_axis as _resolve_channel_axis
from napari_unet.cli import main
from napari_unet.model import ModelConfig, UNet, load_model, save_model
from napari_unet.postprocess import PostprocessConfig
from napari_unet.segment import segment
from napari_unet.stitch import stitch_planes
from napari_unet.targets import instances_to_annotation
from napari_unet.tiling import drain
from napari_unet.train import Trainer, TrainingPair, train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tiny_model(path: Path) -> Path:
    """A small U-Net trained a few dozen steps on touching disks: real, non-empty output."""
    torch.manual_seed(0)
    image, labels = touching_disks((128, 128))
    trainer = Trainer(UNet(ModelConfig(depth=3, base_channels=8)),
                      [TrainingPair(image, instances_to_annotation(labels))],
                      train_config(True, steps=40, lr=3e-3, batch_size=4, tile=96,
                                   device="cpu", augment=AugmentConfig(elastic_alpha=0)))
    drain(trainer.run())
    return save_model(trainer.model, path)


def disk_stack(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.stack([touching_disks(shape, seed=seed + i)[0] for i in range(n)])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """256 planes of 128 x 128 uint16 in zarr: 8 MiB (its int32 labels: 16 MiB).

    Many small planes: what one plane costs is fixed, so the stack only has to be many
    planes deep to dwarf it, and the test stays fast.
    """
    stack = np.tile(disk_stack(8, (128, 128)), (32, 1, 1))
    path = tmp_path_factory.mktemp("data") / "stack.zarr"
    z = zarr.create_array(str(path), shape=stack.shape, dtype=stack.dtype,
                          chunks=(1, 128, 128), zarr_format=2)
    z[:] = stack
    return path, stack


def _peak_bytes(fn) -> int:
    """Peak Python-tracked allocation (numpy arrays included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _cli(*args) -> None:
    assert main(["segment", *map(str, args), "--device", "cpu"]) == 0


def test_zarr_and_tiff_outputs_stay_far_below_the_stack_size(tmp_path, big_stack, model_file):
    src, stack = big_stack
    # Warm up (imports, model load) outside the measurement: a fixed cost, not per plane.
    warm = tmp_path / "warm.zarr"
    io.write_labels(warm, stack[:2])  # any integer array will do as an image
    for suffix in ("zarr", "tif"):
        _cli(warm, "-o", tmp_path / f"warm_out.{suffix}", "--model", model_file)
    cap = stack.nbytes / 4  # the whole stack would need 4x this, with its labels 12x
    out_zarr, out_tif = tmp_path / "labels.zarr", tmp_path / "labels.tif"
    # Measured on a rerun (--overwrite): the first run's one-off growth of interpreter-wide
    # tables (interned path strings of every chunk key: an 8 MB dict resize once many tests
    # ran) is not memory per plane.
    for out in (out_zarr, out_tif):
        _cli(src, "-o", out, "--model", model_file)
    peak_zarr = _peak_bytes(lambda: _cli(src, "-o", out_zarr, "--model", model_file,
                                         "--overwrite"))
    peak_tif = _peak_bytes(lambda: _cli(src, "-o", out_tif, "--model", model_file,
                                        "--overwrite"))
    print(f"\nstack {stack.nbytes / 2**20:.1f} MiB, cap {cap / 2**20:.1f} MiB; peak traced "
          f"allocation: zarr output {peak_zarr / 2**20:.2f} MiB, tif output "
          f"{peak_tif / 2**20:.2f} MiB")
    assert peak_zarr < cap
    assert peak_tif < cap

    labels = zarr.open_array(str(out_zarr))
    assert labels.shape == stack.shape and labels.dtype == np.int32
    assert labels.chunks == (1, 128, 128)  # one plane per chunk
    assert not (out_zarr / PROGRESS_DIR).exists() and labels.attrs["napari_unet"]["complete"]
    # One id scheme for every entry point: the same ids as the in-memory engine gives the
    # whole stack (consecutive, plane after plane), not the work store's plane offsets.
    ref = segment(stack, load_model(model_file), device="cpu")
    assert ref.max() > 10 and labels[:].max() < PLANE_STRIDE
    np.testing.assert_array_equal(labels[:], ref)
    # The TIFF holds exactly the same labels, and no temporary store is left behind.
    np.testing.assert_array_equal(tifffile.imread(out_tif), labels[:])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "labels.tif.partial.zarr").exists()


def test_ome_zarr_input_gets_labels_inside_and_stitching(tmp_path, model_file):
    stack = disk_stack(5, (96, 112), seed=3)
    # Slowly drifting copies of one plane: objects continue through the stack.
    stack = np.stack([np.roll(stack[0], k, axis=1) for k in range(5)])
    src = Path(io.write_ome_zarr_image(tmp_path / "img.zarr", stack[None], "czyx"))
    # The channel axis comes from the OME axes ("c" first); labels land in labels/seg.
    _cli(src, "--label-name", "seg", "--model", model_file, "--stitch-3d")
    labels_path = src / "labels" / "seg"
    labels = io.read_image(labels_path).compute()
    assert labels.shape == (1, 5, 96, 112)  # the channel axis is kept, as size 1
    planes = segment(stack, load_model(model_file), device="cpu")
    np.testing.assert_array_equal(labels[0], stitch_planes(planes))
    assert labels.max() < planes.max()  # objects were linked across planes
    assert io.read_axes(labels_path) == "czyx"
    assert not any(p.name.endswith(".partial.zarr") for p in tmp_path.iterdir())
    # Once there, the same command skips them; other settings are refused (exit 2)...
    _cli(src, "--label-name", "seg", "--model", model_file, "--stitch-3d")
    assert main(["segment", str(src), "--label-name", "seg", "--model", str(model_file),
                 "--device", "cpu"]) == 2
    np.testing.assert_array_equal(io.read_image(labels_path).compute(), labels)
    _cli(src, "--label-name", "seg", "--model", model_file, "--overwrite")
    assert io.read_image(labels_path).compute().max() > labels.max()  # not stitched now


def test_interrupted_run_resumes(tmp_path, model_file):
    stack = disk_stack(6, (96, 96))
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack)
    out = tmp_path / "out.zarr"
    jobs = [Job(src, out)]
    kw = {"model_path": model_file}
    markers = out / PROGRESS_DIR
    stopped = drain(segment_batch(jobs, cancel=lambda: len(list(markers.glob("*.done"))) >= 2,
                                  **kw))
    assert stopped.cancelled and stopped.planes_computed == 2
    first = zarr.open_array(str(out))
    assert not first.attrs["napari_unet"]["complete"]
    assert len(list((out / PROGRESS_DIR).glob("*.done"))) == 2
    # Other settings may not resume someone's partial output...
    with pytest.raises(ValueError, match="other settings"):
        drain(segment_batch(jobs, model_path=model_file,
                            postprocess=PostprocessConfig(min_size=3)))
    # ...the same ones do, computing only the 4 missing planes.
    result = drain(segment_batch(jobs, **kw))
    assert (result.planes_computed, result.planes_skipped) == (4, 2)
    ref = segment(stack, load_model(model_file), device="cpu")
    np.testing.assert_array_equal(relabel_sequential(zarr.open_array(str(out))[:])[0],
                                  relabel_sequential(ref)[0])
    again = drain(segment_batch(jobs, **kw))
    assert (again.planes_computed, again.planes_skipped) == (0, 6)


def test_interrupted_stitching_is_finished_by_the_rerun(tmp_path, model_file, monkeypatch):
    import napari_unet.batch_plan as dist

    stack = np.stack([np.roll(disk_stack(1, (96, 96), seed=4)[0], k, axis=0) for k in range(6)])
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack)
    jobs = [Job(src, tmp_path / "out.zarr")]
    real = dist.stitch_planes_iter

    def crash_midway(*args, **kwargs):
        for i, p in enumerate(real(*args, **kwargs)):
            if i == 8:  # pass 2 has rewritten some planes, not all
                raise RuntimeError("power cut")
            yield p

    monkeypatch.setattr(dist, "stitch_planes_iter", crash_midway)
    with pytest.raises(RuntimeError, match="power cut"):
        drain(segment_batch(jobs, model_path=model_file, stitch=StitchSettings()))
    monkeypatch.setattr(dist, "stitch_planes_iter", real)
    # The rerun, even without asking for stitching, finishes the interrupted stitch.
    result = drain(segment_batch(jobs, model_path=model_file))
    assert result.planes_computed == 0
    planes = segment(stack, load_model(model_file), device="cpu")
    out = zarr.open_array(str(jobs[0].output))
    np.testing.assert_array_equal(out[:], stitch_planes(planes))
    assert "stitching" not in out.attrs["napari_unet"]


def test_errors_are_clear(tmp_path, model_file):
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, disk_stack(2, (64, 64)))
    assert main(["segment", str(src), "--model", str(model_file)]) == 2  # not OME: need -o
    assert main(["segment", str(src), "-o", str(tmp_path / "x.png"),
                 "--model", str(model_file)]) == 2
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(2, 64, 64), dtype=np.int32, zarr_format=2)
    assert main(["segment", str(src), "-o", str(foreign), "--model", str(model_file)]) == 2
    assert main(["segment", str(src), "-o", str(tmp_path / "o.zarr"), "--semantic",
                 "--stitch-3d", "--model", str(model_file)]) == 2
    assert main(["segment", str(src), "-o", str(tmp_path / "o.zarr"), "--stitch-3d",
                 "--stitch-threshold", "2", "--model", str(model_file)]) == 2
    assert not (tmp_path / "o.zarr").exists()  # refused before any work


def test_channel_axis_resolution():
    assert _resolve_channel_axis("auto", "czyx", 4) == 0
    assert _resolve_channel_axis("auto", "tzyx", 4) is None
    assert _resolve_channel_axis("auto", None, 3) is None
    assert _resolve_channel_axis(1, "czyx", 4) == 1  # explicit wins
    assert _resolve_channel_axis(-3, None, 4) == 1
