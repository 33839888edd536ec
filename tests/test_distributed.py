"""Batch segmentation on a dask.distributed LocalCluster: worker loss, retries, resume."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from skimage.segmentation import relabel_sequential

from napari_unet.batch import (
    PROGRESS_DIR,
    Job,
    model_loads,
    segment_batch,
)
from napari_unet.model import load_model
from napari_unet.segment import segment
from napari_unet.tiling import drain
from test_lazy import disk_stack, make_tiny_model

distributed = pytest.importorskip("distributed")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, np.ndarray]:
    """Three TIFF files (2D, 3 and 2 planes) and a zarr stack in 64 x 64 blocks."""
    folder = tmp_path_factory.mktemp("inputs")
    data = {
        "a.tif": disk_stack(1, (150, 170), seed=1)[0],
        "b.tif": disk_stack(3, (128, 140), seed=2),
        "c.tif": disk_stack(2, (100, 120), seed=5),
        "d.zarr": disk_stack(8, (160, 160), seed=7),
    }
    for name, arr in data.items():
        if name.endswith(".tif"):
            tifffile.imwrite(folder / name, arr, photometric="minisblack")
        else:
            z = zarr.create_array(str(folder / name), shape=arr.shape, dtype=arr.dtype,
                                  chunks=(1, 64, 64), zarr_format=2)
            z[:] = arr
    return {str(folder / name): arr for name, arr in data.items()}


def _jobs(inputs, out: Path, suffix: str) -> list[Job]:
    out.mkdir(exist_ok=True)
    return [Job(Path(src), out / f"{Path(src).stem}.{suffix}") for src in inputs]


def _read(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix == ".tif" else zarr.open_array(str(path))[:]


def _drive(gen, on_progress):
    """Run a progress generator, calling ``on_progress`` on each report; return its value."""
    while True:
        try:
            on_progress(next(gen))
        except StopIteration as stop:
            return stop.value


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def test_cluster_with_a_killed_worker_matches_single_process(tmp_path, client, model_file,
                                                             inputs):
    n_planes = sum(1 if a.ndim == 2 else len(a) for a in inputs.values())
    # Reference: the same batch in this process.
    local = drain(segment_batch(_jobs(inputs, tmp_path / "local", "tif"),
                                model_path=model_file))
    assert local.planes_computed == n_planes

    jobs = _jobs(inputs, tmp_path / "cluster", "tif")
    pids = _worker_pids(client)
    victim = sorted(pids)[0]
    killed = []

    def kill_once(p) -> None:
        if not killed and p.planes_done >= 1:
            # A worker dies mid-run (as on a crashed node); its planes must be redone.
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)

    result = _drive(segment_batch(jobs, model_path=model_file, client=client), kill_once)
    assert killed and result.planes_computed == n_planes
    assert len(result.outputs) == len(jobs)
    for job in jobs:
        mine, ref = _read(job.output), _read(tmp_path / "local" / job.output.name)
        np.testing.assert_array_equal(mine, ref)
        src = inputs[str(job.source)]
        assert mine.shape == src.shape and mine.max() > 0
    # Same objects as the in-memory engine, up to the id offsets.
    expected = segment(src, load_model(model_file), device="cpu")
    np.testing.assert_array_equal(relabel_sequential(mine)[0], relabel_sequential(expected)[0])
    # The nanny replaced the killed worker; each worker loaded the model once.
    deadline = time.monotonic() + 30
    while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids[victim] not in _worker_pids(client).values()
    assert set(client.run(model_loads).values()) <= {0, 1}


def _chunk_mtimes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")
            if p.is_file() and PROGRESS_DIR not in p.parts and not p.name.startswith(".z")}


def test_rerun_after_interruption_skips_finished_planes(tmp_path, client, model_file, inputs):
    jobs = _jobs(inputs, tmp_path / "out", "zarr")
    n_planes = sum(1 if a.ndim == 2 else len(a) for a in inputs.values())
    # An interrupted run (in this process: deterministic) that finished 5 planes...
    done = [0]
    gen = segment_batch(jobs, model_path=model_file, cancel=lambda: done[0] >= 5)
    first = _drive(gen, lambda p: done.__setitem__(0, p.planes_done))
    assert first.cancelled and first.planes_computed == 5
    before = {job.output: _chunk_mtimes(job.output) for job in jobs}
    time.sleep(0.05)  # distinct mtimes for rewritten chunks
    # ...is resumed on the cluster: only the other planes are computed.
    second = drain(segment_batch(jobs, model_path=model_file, client=client))
    assert (second.planes_computed, second.planes_skipped) == (n_planes - 5, 5)
    rewritten = sum(
        before[job.output].get(name) != mtime
        for job in jobs for name, mtime in _chunk_mtimes(job.output).items()
    )
    assert rewritten <= n_planes - 5  # finished planes were not written again
    for job in jobs:
        z = zarr.open_array(str(job.output))
        assert z.attrs["napari_unet"]["complete"] and not (job.output / PROGRESS_DIR).exists()
        expected = segment(inputs[str(job.source)], load_model(model_file), device="cpu")
        np.testing.assert_array_equal(relabel_sequential(z[:])[0],
                                      relabel_sequential(expected)[0])
    # A third run finds everything complete.
    third = drain(segment_batch(jobs, model_path=model_file, client=client))
    assert (third.planes_computed, third.planes_skipped) == (0, n_planes)


def test_cancelled_cluster_run_resumes(tmp_path, client, model_file, inputs):
    zarr_input = {k: v for k, v in inputs.items() if k.endswith(".zarr")}
    jobs = _jobs(zarr_input, tmp_path / "out", "zarr")
    first = drain(segment_batch(jobs, model_path=model_file, client=client,
                                cancel=lambda: True))
    assert first.cancelled and first.planes_computed == 1
    # Planes already running when cancelled may still finish; wait for them to settle.
    marker = jobs[0].output / PROGRESS_DIR
    count, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = len(list(marker.glob("*.done")))
        if now == count:
            break
        count = now
    second = drain(segment_batch(jobs, model_path=model_file, client=client))
    assert second.planes_computed == 8 - count and second.planes_skipped == count
    np.testing.assert_array_equal(
        relabel_sequential(zarr.open_array(str(jobs[0].output))[:])[0],
        relabel_sequential(segment(next(iter(zarr_input.values())),
                                   load_model(model_file), device="cpu"))[0])


def test_cli_on_a_running_cluster(tmp_path, client, model_file, inputs, capsys):
    from napari_unet.cli import main

    srcs = [k for k in inputs if k.endswith(".tif")]
    out = tmp_path / "labels"
    assert main(["segment", *srcs, "-o", str(out), "--format", "zarr", "--dask-scheduler",
                 client.scheduler.address, "--model", str(model_file), "--stitch-3d"]) == 0
    assert "6 plane(s) segmented, 0 already done" in capsys.readouterr().out
    assert len(client.scheduler_info()["workers"]) == 2  # the CLI left the cluster running
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.zarr", "b_labels.zarr",
                                                     "c_labels.zarr"]
    b = zarr.open_array(str(out / "b_labels.zarr"))
    assert b.attrs["stitch"]["axis"] == 0 and b[:].max() == b.attrs["stitch"]["n_objects"]
