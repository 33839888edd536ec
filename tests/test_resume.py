"""Trustworthy batch runs (issue 10): resume fingerprints, outputs that are not ours, -o = input,
missing / read-only folders, disk full, locks, stale temporaries, scheduler time-outs.

Each test is one row of the issue's fault matrix; the comment names the row.
"""

from __future__ import annotations

import errno
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.segmentation import relabel_sequential

import napari_unet.batch as batch
import napari_unet.batch_plan as plan
from napari_unet import io
from napari_unet.batch import (
    PROGRESS_DIR,
    Job,
    OutputError,
    OutputInUseError,
    SchedulerError,
    connect_scheduler,
    segment_batch,
)
from napari_unet.cli import main
from napari_unet.model import load_model
from napari_unet.segment import InferenceConfig, segment
from napari_unet.tiling import drain
from test_lazy import disk_stack, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _seg(*args) -> int:
    return main(["segment", *map(str, args), "--device", "cpu"])


def _stop_after(out: Path, n: int):
    """A cancel callback that stops a run once ``n`` planes of ``out``'s store are done."""
    return lambda: len(list(out.glob(f"**/{PROGRESS_DIR}/*.done"))) >= n


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(relabel_sequential(a)[0], relabel_sequential(b)[0])


def test_changed_input_is_never_resumed_from_stale_planes(tmp_path, model_file):
    # Row: "after the input stack changed, a rerun said '10 segmented, 6 already done'".
    old, new = disk_stack(5, (80, 80), seed=1), disk_stack(5, (80, 80), seed=11)
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, old)
    kw = {"model_path": model_file}
    for out in (tmp_path / "o.zarr", tmp_path / "o.tif"):
        store = out if out.suffix == ".zarr" else tmp_path / f".{out.name}.partial.zarr"
        res = drain(segment_batch([Job(src, out)], cancel=_stop_after(store, 3), **kw))
        assert res.cancelled and res.planes_computed == 3
    time.sleep(0.01)
    tifffile.imwrite(src, new)  # same path, shape and dtype; other pixels
    # The user's .zarr output: refused, naming what changed.
    with pytest.raises(ValueError, match="the input"):
        drain(segment_batch([Job(src, tmp_path / "o.zarr")], **kw))
    # Our own temporary store (TIFF output): started again, nothing stale kept.
    res = drain(segment_batch([Job(src, tmp_path / "o.tif")], **kw))
    assert (res.planes_computed, res.planes_skipped) == (5, 0)
    assert _same(tifffile.imread(tmp_path / "o.tif"),
                 segment(new, load_model(model_file), device="cpu"))


def test_finished_output_is_skipped_only_if_nothing_changed(tmp_path, model_file):
    # Row: a finished output made from an older input / another model was "already done".
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, disk_stack(2, (64, 64), seed=2))
    for out in (tmp_path / "o.zarr", tmp_path / "o.tif"):
        assert _seg(src, "-o", out, "--model", model_file) == 0
        again = drain(segment_batch([Job(src, out)], model_path=model_file))
        assert (again.planes_computed, again.planes_skipped) == (0, 2)
        # Other settings, or a changed input: refused with what changed.
        with pytest.raises(FileExistsError, match="post-processing"):
            drain(segment_batch([Job(src, out)], model_path=model_file,
                                postprocess=plan.PostprocessConfig(min_size=3)))
    tifffile.imwrite(src, disk_stack(2, (64, 64), seed=3))
    for out in (tmp_path / "o.zarr", tmp_path / "o.tif"):
        assert _seg(src, "-o", out, "--model", model_file) == 2
        assert _seg(src, "-o", out, "--model", model_file, "--overwrite") == 0


def test_flip_averaging_is_a_setting_a_finished_run_is_checked_against(tmp_path, model_file):
    # tta changes the maps: a run without it is not "done" for a run with it. It is recorded
    # only when on, so outputs written before the option existed still resume.
    src, out = tmp_path / "s.tif", tmp_path / "o.zarr"
    tifffile.imwrite(src, disk_stack(2, (64, 64), seed=4))
    assert _seg(src, "-o", out, "--model", model_file) == 0
    again = drain(segment_batch([Job(src, out)], model_path=model_file,
                                inference=InferenceConfig(tta=False)))
    assert (again.planes_computed, again.planes_skipped) == (0, 2)
    with pytest.raises(FileExistsError, match="tiling settings"):
        drain(segment_batch([Job(src, out)], model_path=model_file,
                            inference=InferenceConfig(tta=True)))
    assert _seg(src, "-o", tmp_path / "t.zarr", "--model", model_file, "--tta") == 0
    again = drain(segment_batch([Job(src, tmp_path / "t.zarr")], model_path=model_file,
                                inference=InferenceConfig(tta=True)))
    assert (again.planes_computed, again.planes_skipped) == (0, 2)


def test_object_size_settings_are_checked_against_a_finished_run(tmp_path, model_file):
    # Shrinking planes (rescale.py) changes the maps: turning it off or giving a diameter is
    # a different run; the default (measured per plane) is not recorded, like tta.
    src, out = tmp_path / "s.tif", tmp_path / "o.zarr"
    tifffile.imwrite(src, disk_stack(2, (64, 64), seed=5))
    assert _seg(src, "-o", out, "--model", model_file) == 0
    for changed in (InferenceConfig(rescale=False), InferenceConfig(object_diameter=50.0)):
        with pytest.raises(FileExistsError, match="tiling settings"):
            drain(segment_batch([Job(src, out)], model_path=model_file, inference=changed))
    assert _seg(src, "-o", tmp_path / "n.zarr", "--model", model_file, "--no-rescale") == 0
    again = drain(segment_batch([Job(src, tmp_path / "n.zarr")], model_path=model_file,
                                inference=InferenceConfig(rescale=False)))
    assert (again.planes_computed, again.planes_skipped) == (0, 2)


def test_output_not_written_by_napari_unet_is_never_done(tmp_path, model_file, capsys):
    # Row: "an unrelated, pre-existing -o out/x.tif is taken as '1 already done', exit 0".
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, disk_stack(1, (64, 64))[0])
    (tmp_path / "out").mkdir()
    foreign = tmp_path / "out" / "x.tif"
    tifffile.imwrite(foreign, np.full((64, 64), 7, np.uint8))
    before = foreign.read_bytes()
    assert _seg(src, "-o", foreign, "--model", model_file) == 2
    assert "not written by napari-unet" in capsys.readouterr().err
    assert foreign.read_bytes() == before


@pytest.mark.parametrize("kind", ["tif", "zarr"])
def test_output_equal_to_or_inside_the_input_is_refused(tmp_path, model_file, kind, capsys):
    # Row: "with --overwrite, -o equal to the input replaces the input image with labels".
    image = disk_stack(2, (64, 64))
    src = tmp_path / f"s.{kind}"
    if kind == "tif":
        tifffile.imwrite(src, image)
    else:
        io.write_labels(src, image)  # any integer zarr array is an image
    snapshot = np.asarray(io.read_image(src))
    (tmp_path / "sub").mkdir()
    targets = [src, tmp_path / "sub" / ".." / f"s.{kind}"]  # the same file, spelled otherwise
    if kind == "zarr":
        targets.append(src / "inner.tif")
    for target in targets:
        for extra in ([], ["--overwrite"]):
            assert _seg(src, "-o", target, "--model", model_file, *extra) == 2
            assert "would destroy the input" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(io.read_image(src)), snapshot)


def test_missing_or_read_only_folder_fails_before_any_work(tmp_path, model_file, monkeypatch,
                                                          capsys):
    # Rows: "-o into a missing or read-only folder" (tracebacks).
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, disk_stack(1, (64, 64))[0])
    assert _seg(src, "-o", tmp_path / "nope" / "o.tif", "--model", model_file) == 2
    assert "does not exist" in capsys.readouterr().err
    real = os.access
    monkeypatch.setattr(plan.os, "access",  # root may write anywhere: pretend it may not
                        lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert _seg(src, "-o", tmp_path / "o.zarr", "--model", model_file) == 2
    assert "not writable" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("suffix", ["zarr", "tif"])
def test_disk_full_midway_keeps_planes_and_resumes(tmp_path, model_file, monkeypatch, capsys,
                                                   suffix):
    # Row: "disk full during segment: traceback, and the .zarr output can be neither resumed
    # nor replaced without --overwrite".
    stack = disk_stack(5, (64, 64), seed=4)
    src, out = tmp_path / "s.tif", tmp_path / f"o.{suffix}"
    tifffile.imwrite(src, stack)
    real, calls = batch._write_plane, []

    def fill_disk(task, labels):
        calls.append(task.index)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", task.store)
        real(task, labels)

    monkeypatch.setattr(batch, "_write_plane", fill_disk)
    assert _seg(src, "-o", out, "--model", model_file) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "resumes" in err and "Traceback" not in err
    monkeypatch.setattr(batch, "_write_plane", real)
    res = drain(segment_batch([Job(src, out)], model_path=model_file))
    assert (res.planes_computed, res.planes_skipped) == (3, 2)
    got = np.asarray(io.read_image(out))
    assert _same(got, segment(stack, load_model(model_file), device="cpu"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_while_creating_the_store_leaves_nothing_behind(tmp_path, model_file,
                                                                  monkeypatch):
    src, out = tmp_path / "s.tif", tmp_path / "o.zarr"
    tifffile.imwrite(src, disk_stack(1, (64, 64))[0])
    real = io.create_label_store

    def full(path, *a, **k):
        real(path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plan.io, "create_label_store", full)
    with pytest.raises(OutputError, match="disk is full"):
        drain(segment_batch([Job(src, out)], model_path=model_file))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]
    monkeypatch.setattr(plan.io, "create_label_store", real)
    assert _seg(src, "-o", out, "--model", model_file) == 0  # no --overwrite needed


def test_second_run_into_an_output_in_use_is_refused(tmp_path, model_file):
    # Row: "two runs into one output end with a raw 'No such file or directory: ...tmp'".
    src, out = tmp_path / "s.tif", tmp_path / "o.tif"
    tifffile.imwrite(src, disk_stack(3, (64, 64)))
    first = segment_batch([Job(src, out)], model_path=model_file)
    next(first)  # planned and locked, planes under way
    with pytest.raises(OutputInUseError, match=f"process {os.getpid()}"):
        drain(segment_batch([Job(src, out)], model_path=model_file))
    first.close()  # an interrupted run lets go of its lock
    lock = tmp_path / ".o.tif.napari-unet.lock"
    assert not lock.exists()
    # A lock left by a process that is gone (same host) is stale and taken over.
    lock.write_text(f'{{"pid": {2**22 + 12345}, "host": "{socket.gethostname()}", '
                    '"started": "earlier"}')
    res = drain(segment_batch([Job(src, out)], model_path=model_file))
    assert res.planes_computed == 3 and not lock.exists()
    # One held on another host cannot be checked: refused, naming the file to delete.
    lock.write_text('{"pid": 1, "host": "elsewhere", "started": "earlier"}')
    with pytest.raises(OutputInUseError, match="delete"):
        drain(segment_batch([Job(src, out)], model_path=model_file, overwrite=True))


def test_temporaries_of_a_killed_run_are_cleaned(tmp_path, model_file):
    # Row: "failed runs leave hidden .*.partial.zarr folders (they keep the disk full)".
    src, out = tmp_path / "s.tif", tmp_path / "o.tif"
    tifffile.imwrite(src, disk_stack(2, (64, 64)))
    junk = [tmp_path / ".o.tif.1a2b3c4d.part.tif", tmp_path / ".o.tif.0f0f0f0f.old.part"]
    junk[0].write_bytes(b"x" * 1000)
    junk[1].mkdir()
    drain(segment_batch([Job(src, out)], model_path=model_file))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif", "s.tif"]


# --------------------------------------------------------------------------------------------
# --dask-scheduler


def _serve(handler_cls) -> tuple[socket.socket | http.server.HTTPServer, int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_bad_scheduler_addresses_fail_fast_with_a_message():
    # Rows: "--dask-scheduler at an HTTP port or a dashboard waited 90-150 s; an
    # unreachable host ended in ArrayMemoryError: Unable to allocate 3.07 EiB".
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    http_server, http_port = _serve(http.server.SimpleHTTPRequestHandler)
    cases = [
        (f"tcp://127.0.0.1:{closed_port}", "cannot connect"),
        (f"tcp://127.0.0.1:{http_port}", "HTTP server"),
        (f"127.0.0.1:{silent.getsockname()[1]}", "said nothing"),
        ("tcp://no-such-host.invalid:8786", "unknown"),
        ("http//oops", "not an address"),
    ]
    try:
        for address, what in cases:
            t = time.perf_counter()
            with pytest.raises(SchedulerError, match=what):
                connect_scheduler(address, timeout=1.0, worker_timeout=1.0)
            assert time.perf_counter() - t < 10
    finally:
        http_server.shutdown()
        silent.close()


def test_scheduler_without_workers_is_reported_within_seconds():
    # Row: "--dask-scheduler pointing at a scheduler with no workers waited until killed".
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                                  scheduler_kwargs={"protocol": "tcp"}) as cluster:
        t = time.perf_counter()
        with pytest.raises(SchedulerError, match="no workers"):
            connect_scheduler(cluster.scheduler_address, timeout=5, worker_timeout=2)
        assert time.perf_counter() - t < 15


# --------------------------------------------------------------------------------------------
# process hygiene


def test_importing_the_library_leaves_the_openmp_policy_alone():
    # Row: "importing the package changes OMP_WAIT_POLICY of the host process (napari)".
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, {mod}; print(os.environ.get('OMP_WAIT_POLICY'))")
    for mod, want in (("napari_unet, napari_unet.segment, napari_unet.batch", "None"),
                      ("napari_unet.cli", "PASSIVE")):
        out = subprocess.run([sys.executable, "-c", code.format(mod=mod)], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (mod, out.stdout)


def test_anisotropy_option_is_gone(tmp_path):
    # Row: "--anisotropy changes nothing" (stitching compares 2D masks; it was only recorded).
    assert main(["segment", str(tmp_path / "s.tif"), "--stitch-3d", "--anisotropy", "2"]) == 2


def test_renumbering_plane_offset_ids_is_consecutive_and_safe_to_repeat():
    from napari_unet.batch_plan import PLANE_STRIDE, renumber_consecutively
    from napari_unet.segment import offset_ids

    rng = np.random.default_rng(0)
    local = [rng.integers(0, 4, (8, 8)).astype(np.int32) for _ in range(4)]
    local[2][:] = 0  # an empty plane
    store = np.stack([np.where(p > 0, p + i * PLANE_STRIDE, 0) for i, p in enumerate(local)])
    expected, offset = [], 0
    for p in local:
        ids, offset = offset_ids(p, offset)
        expected.append(ids)
    keys = [(i,) for i in range(4)]
    half = store.copy()
    renumber_consecutively(half, keys[:2])  # a run killed half-way through renumbering
    renumber_consecutively(half, keys)
    renumber_consecutively(store, keys, band=3)  # planes in bands of rows
    np.testing.assert_array_equal(store, np.stack(expected))
    np.testing.assert_array_equal(half, np.stack(expected))
