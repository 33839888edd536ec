"""Batch segmentation of many files or one huge stack: plane tasks, resumable, optionally on
a ``dask.distributed`` cluster.

Every 2D plane of every input (with all its channels) is one task. A task reads only its
plane (lazily, through :func:`napari_unet.io.read_image`), segments it with the engine
(:func:`napari_unet.segment.segment_image`, which tiles the plane internally with mirror
padding, so planes need no halo) and writes its labels into an on-disk zarr "work store"
chunked one plane per chunk: workers write disjoint chunks and need no locks. After the
labels are stored, the task leaves a done-marker file in the store's progress folder; a
rerun skips planes with a marker, so an interrupted run resumes where it stopped, and a task
that fails or whose worker dies is simply run again (``retries``; a plane write is
idempotent).

Instance ids: plane ``i`` stores ``local_id + i * PLANE_STRIDE`` (``PLANE_STRIDE = 2**20``).
Ids are unique across the stack without any coordination between tasks, and a plane's ids
do not depend on which worker ran it, in which order, or on how often the run was resumed.
The store is int32 up to 2047 planes and int64 beyond. The ids are not consecutive:
:func:`napari_unet.stitch.stitch_planes` (``stitch=...``) renumbers 1..N, and ordering by id
is the same as the single-process engine's consecutive numbering (plane, then local id).

When every plane of an input is done it is finalised on the calling process, streaming
plane by plane: optional 3D stitching, then the work store becomes the output (``.zarr``),
is streamed to TIFF (``.tif``) or is written into the OME-Zarr input as ``labels/<name>``.
Workers need the inputs, the outputs and the model file at the same paths (a shared file
system).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import io
from .model import bundled_model_path, check_channels, load_model
from .postprocess import PostprocessConfig
from .segment import (
    InferenceConfig,
    PlaneSink,
    Predictor,
    SegmentProgress,
    check_image,
    label_key,
    output_shape,
    plane_indices,
    segment_image,
)
from .stitch import stitch_planes_iter
from .tiling import drain, relay

__all__ = [
    "PLANE_STRIDE",
    "BatchError",
    "BatchProgress",
    "BatchResult",
    "Job",
    "StitchSettings",
    "local_client",
    "model_loads",
    "segment_batch",
]

PLANE_STRIDE = 2**20
PROGRESS_DIR = ".napari-unet-progress"
_RUN_FILE = "run.json"
_ATTRS_KEY = "napari_unet"
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Job:
    """One input image and where its labels go.

    ``output``: a ``.zarr`` folder or ``.tif/.tiff`` file; None writes into the input, which
    must then be an OME-Zarr image, as ``labels/<label_name>``.
    """

    source: Path
    output: Path | None = None
    label_name: str = "segmentation"


@dataclass
class StitchSettings:
    """3D stitching of the per-plane instances (see :func:`napari_unet.stitch.stitch_planes`).

    ``axis``: the stacking axis of the *input* image; None picks its "z" axis (from
    :func:`napari_unet.io.read_axes`), else axis 0.
    """

    axis: int | None = None
    threshold: float = 0.7
    metric: str = "overlap"
    split_ratio: float | None = 0.85
    anisotropy: float = 1.0


@dataclass
class BatchProgress:
    """Planes finished out of the total, and how far the current one is (in-process only)."""

    planes_done: int
    planes_total: int
    elapsed: float
    message: str | None = None  # set when an input is finished (or skipped)
    plane_fraction: float = 0.0

    @property
    def fraction(self) -> float:
        return (self.planes_done + self.plane_fraction) / max(self.planes_total, 1)


@dataclass
class BatchResult:
    """What a batch run did."""

    outputs: list[str] = field(default_factory=list)
    planes_computed: int = 0
    planes_skipped: int = 0
    megapixels: float = 0.0
    elapsed: float = 0.0
    cancelled: bool = False

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.elapsed if self.elapsed > 0 else 0.0


class BatchError(RuntimeError):
    """Some planes failed even after their retries; every other plane was kept."""

    def __init__(self, failures: list[tuple[str, int, str]], result: BatchResult) -> None:
        self.failures = failures
        self.result = result
        src, index, err = failures[0]
        super().__init__(
            f"{len(failures)} plane(s) failed, e.g. plane {index} of {src}: {err}. Finished "
            "planes are kept; run the same command again to retry the others."
        )


# --------------------------------------------------------------------------------------------
# tasks (run on workers, or in-process)


@dataclass(frozen=True)
class ModelRef:
    """A model file and inference settings; workers load it once (see _cached_predictor)."""

    path: str
    digest: str
    inference_json: str


@dataclass(frozen=True)
class PlaneTask:
    """One plane: where to read it and where its labels go."""

    source: str
    store: str
    index: int
    key: tuple
    channel_axis: int | None
    stride: int


@dataclass(frozen=True)
class PlaneResult:
    store: str
    index: int
    n_objects: int
    pixels: int
    seconds: float


_LOADS = 0


def model_loads() -> int:
    """How often this process loaded a model for batch tasks (one per model and settings)."""
    return _LOADS


@functools.lru_cache(maxsize=2)
def _cached_predictor(path: str, digest: str, inference_json: str) -> Predictor:
    # Loading a model (and fusing it) costs far more than a small plane: once per process.
    # The digest is part of the key so a replaced model file is never served stale.
    global _LOADS
    _LOADS += 1
    return Predictor(load_model(path), InferenceConfig(**json.loads(inference_json)))


class _PlaneReader:
    """A lazy image whose planes are read in the calling thread.

    A dask ``compute`` would go to whatever scheduler is the default: inside a cluster
    worker, or next to a Client, that is the cluster itself (a nested, slow computation
    that also has to pickle open file handles).
    """

    def __init__(self, image: da.Array) -> None:
        self.image = image
        self.shape = image.shape
        self.dtype = image.dtype
        self.ndim = image.ndim

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.image[key].compute(scheduler="synchronous"))


@functools.lru_cache(maxsize=8)
def _open_image(path: str, mtime_ns: int) -> _PlaneReader:
    # Opening parses TIFF headers / zarr metadata; reuse it for the planes of one file.
    return _PlaneReader(io.read_image(path))


def run_plane_iter(
    task: PlaneTask,
    model: ModelRef,
    postprocess: PostprocessConfig,
    cancel: Callable[[], bool] | None = None,
) -> Generator[SegmentProgress, None, PlaneResult | None]:
    """Segment one plane into its store and mark it done; None if cancelled midway."""
    start = time.perf_counter()
    predictor = _cached_predictor(model.path, model.digest, model.inference_json)
    image = _open_image(task.source, os.stat(task.source).st_mtime_ns)
    sink = PlaneSink()
    yield from segment_image(image, predictor, channel_axis=task.channel_axis,
                             postprocess=postprocess, out=sink, planes=[task.key],
                             cancel=cancel)
    labels = sink.get(label_key(task.key, task.channel_axis))
    if labels is None:
        return None
    n = int(labels.max()) if task.stride else 0
    if task.stride and n >= task.stride:
        raise ValueError(f"plane {task.index} of {task.source} has {n} objects; at most "
                         f"{task.stride - 1} per plane are supported")
    store = zarr.open_array(task.store, mode="r+")
    if n:
        labels = np.where(labels > 0, labels.astype(store.dtype) + task.index * task.stride, 0)
    store[label_key(task.key, task.channel_axis)] = labels.astype(store.dtype, copy=False)
    _mark_done(Path(task.store), task.index, n)
    return PlaneResult(task.store, task.index, n, int(labels.size),
                       time.perf_counter() - start)


def run_plane(task: PlaneTask, model: ModelRef, postprocess: PostprocessConfig) -> PlaneResult:
    """Blocking form of :func:`run_plane_iter`: what a cluster worker runs."""
    return drain(run_plane_iter(task, model, postprocess))


def _mark_done(store: Path, index: int, n_objects: int) -> None:
    # Written after the plane's labels and renamed into place: a marker means the plane is
    # complete, even if the worker is killed at any moment.
    folder = store / PROGRESS_DIR
    tmp = folder / f".{index}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(str(n_objects))
    os.replace(tmp, folder / f"{index}.done")


def _done_planes(store: Path) -> set[int]:
    folder = store / PROGRESS_DIR
    if not folder.is_dir():
        return set()
    return {int(name[:-5]) for name in os.listdir(folder)
            if name.endswith(".done") and name[:-5].isdigit()}


# --------------------------------------------------------------------------------------------
# planning


@dataclass
class _Plan:
    """One input's work: its store, which planes are left, how it is finalised."""

    job: Job
    kind: str  # "zarr", "tiff" or "ome"
    final: Path
    store: Path
    shape: tuple[int, ...]
    keys: list[tuple]
    todo: list[int]
    channel_axis: int | None
    stitch_axis: int | None  # in label coordinates
    stride: int
    skip_reason: str | None = None
    remaining: int = 0
    output: str = ""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _fingerprint(job: Job, shape: tuple[int, ...], dtype: Any, channel_axis: int | None,
                 model: ModelRef, post: PostprocessConfig, stride: int) -> dict[str, Any]:
    # Only what changes the labels: device and batch size do not, so a run may be resumed
    # on another machine.
    inf = json.loads(model.inference_json)
    return {
        "source": str(Path(job.source).resolve()), "shape": list(shape), "dtype": str(dtype),
        "channel_axis": channel_axis, "model": model.digest, "plane_stride": stride,
        "inference": {k: inf[k] for k in ("tile", "overlap", "margin", "blend", "precision")},
        "postprocess": asdict(post),
    }


def _resolve_channel_axis(channel_axis: int | str | None, axes: str | None,
                          ndim: int) -> int | None:
    if channel_axis == "auto":
        return axes.index("c") if axes and "c" in axes and len(axes) == ndim else None
    if channel_axis is None:
        return None
    return int(channel_axis) % ndim


def _stitch_axis(stitch: StitchSettings, axes: str | None, ndim: int,
                 channel_axis: int | None) -> int:
    """The stacking axis in label coordinates (the input without its channel axis)."""
    if stitch.axis is not None:
        axis = stitch.axis % ndim
    elif axes and "z" in axes and len(axes) == ndim:
        axis = axes.index("z")
    else:
        axis = 0 if channel_axis != 0 else 1
    if axis == channel_axis:
        raise ValueError(f"the stack axis {axis} is the channel axis; pick another")
    if axis >= ndim - 2:
        raise ValueError(f"the stack axis {axis} is one of the last two (Y, X) axes")
    return axis - (channel_axis is not None and channel_axis < axis)


def _plan(job: Job, model: ModelRef, in_channels: int, post: PostprocessConfig,
          channel_axis: int | str | None, stitch: StitchSettings | None,
          overwrite: bool) -> _Plan:
    src = Path(job.source)
    image = io.read_image(src)
    shape = tuple(int(s) for s in image.shape)
    axes = io.read_axes(src)
    ch = _resolve_channel_axis(channel_axis, axes, len(shape))
    check_image(shape, ch, name=str(src))
    check_channels(in_channels, shape[ch] if ch is not None else 1, what=str(src))
    out_shape = output_shape(shape, ch)
    stitch_axis = None
    if stitch is not None:
        if post.mode != "instances":
            raise ValueError("3D stitching needs instance labels, not semantic classes")
        if len(out_shape) >= 3:  # a single plane in a batch of stacks is left as it is
            stitch_axis = _stitch_axis(stitch, axes, len(shape), ch)

    if job.output is None:
        if not (src.is_dir() and axes is not None):
            raise ValueError(f"{src} is not an OME-Zarr image: give an output path (-o)")
        kind, final = "ome", src / "labels" / job.label_name
        store = src.with_name(f".{src.name}.{job.label_name}.partial.zarr")
    else:
        final = Path(job.output)
        suffix = final.suffix.lower()
        if suffix == ".zarr":
            kind, store = "zarr", final
        elif suffix in io.TIFF_SUFFIXES:
            kind, store = "tiff", final.with_name(f".{final.name}.partial.zarr")
        else:
            raise ValueError(f"cannot write labels to {final}: use a .zarr or .tif path")

    keys = list(plane_indices(shape, ch))
    instances = post.mode == "instances"
    stride = PLANE_STRIDE if instances else 0
    dtype = np.dtype(np.int32 if len(keys) * stride <= _INT32_MAX else np.int64)
    if not instances:
        dtype = np.dtype(np.uint8)
    plan = _Plan(job, kind, final, store, out_shape, keys, [], ch, stitch_axis, stride)
    run = _fingerprint(job, shape, dtype, ch, model, post, stride)

    if not overwrite:
        if kind in ("tiff", "ome") and final.exists():
            # TIFF and OME labels appear only once complete (written under a temporary name).
            plan.skip_reason = f"{final} exists (--overwrite / overwrite=True redoes it)"
            return plan
        if kind == "zarr" and final.exists():
            attrs = _store_attrs(final)
            if attrs.get("complete"):
                plan.skip_reason = f"{final} is complete (--overwrite / overwrite=True redoes it)"
                return plan
            if _read_run(final) is None:
                raise FileExistsError(
                    f"{final} exists and is not a partial napari-unet run; pass --overwrite "
                    "(overwrite=True) to replace it, or choose another path"
                )

    previous = None if overwrite else _read_run(store)
    if previous is not None and previous != run:
        if kind == "zarr":
            raise ValueError(
                f"{store} holds an interrupted run with other settings (model, tiling, "
                "post-processing or input); pass --overwrite (overwrite=True) to start again"
            )
        previous = None  # our own temporary store: start again
    if previous is None:
        io.create_label_store(store, out_shape, dtype, overwrite=True)
        progress = store / PROGRESS_DIR
        progress.mkdir()
        (progress / _RUN_FILE).write_text(json.dumps(run, indent=1))
        zarr.open_array(str(store), mode="r+").attrs[_ATTRS_KEY] = {
            "complete": False, "plane_stride": stride, "source": run["source"]}
    done = _done_planes(store)
    plan.todo = [i for i in range(len(keys)) if i not in done]
    plan.remaining = len(plan.todo)
    return plan


def _read_run(store: Path) -> dict[str, Any] | None:
    try:
        return json.loads((store / PROGRESS_DIR / _RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _store_attrs(path: Path) -> dict[str, Any]:
    try:
        return dict(zarr.open_array(str(path), mode="r").attrs.get(_ATTRS_KEY, {}))
    except Exception:  # not a zarr array at all: nothing of ours
        return {}


def _finalise(plan: _Plan, stitch: StitchSettings | None, overwrite: bool) -> Iterator[None]:
    """Stitch, then turn the work store into the output; yields after each plane stitched.

    Sets ``plan.output`` when done.
    """
    # Streaming the store must run here, not on the cluster a Client may have made default.
    with dask.config.set(scheduler="threads"):
        store = zarr.open_array(str(plan.store), mode="r+")
        info = dict(store.attrs.get(_ATTRS_KEY, {}))
        todo = None
        if stitch is not None and plan.stitch_axis is not None:
            todo = asdict(stitch) | {"axis": plan.stitch_axis}
        elif info.get("stitching"):
            # An earlier run stopped while stitching in place: its planes carry a mix of
            # plane-offset and 3D ids, which only finishing the stitch makes consistent.
            todo = info["stitching"]
        if todo is not None:
            # In place. Stitching only looks at how each plane is partitioned, so stitching a
            # half-rewritten store again gives the same objects.
            store.attrs[_ATTRS_KEY] = info | {"stitching": todo}
            yield from stitch_planes_iter(store, out=store, **todo)
            info.pop("stitching", None)
        store.attrs[_ATTRS_KEY] = info
        if plan.kind == "zarr":
            store.attrs[_ATTRS_KEY] = info | {"complete": True}
            shutil.rmtree(plan.store / PROGRESS_DIR, ignore_errors=True)
            plan.output = str(plan.final)
            return
        labels = da.from_zarr(store)
        if plan.kind == "tiff":
            io.write_labels(plan.final, labels, overwrite=overwrite)
            plan.output = str(plan.final)
        else:
            plan.output = io.write_ome_zarr_labels(plan.job.source, labels,
                                                   plan.job.label_name, overwrite=overwrite)
        shutil.rmtree(plan.store, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# running


def segment_batch(
    jobs: Sequence[Job],
    *,
    model_path: str | os.PathLike | None = None,
    inference: InferenceConfig | None = None,
    postprocess: PostprocessConfig | None = None,
    channel_axis: int | str | None = "auto",
    stitch: StitchSettings | None = None,
    client: Any | None = None,
    retries: int = 2,
    overwrite: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> Generator[BatchProgress, None, BatchResult]:
    """Segment every plane of every job; yields progress, returns a :class:`BatchResult`.

    Args:
        jobs: inputs and outputs (see :class:`Job`).
        model_path: model file; None = the bundled model.
        channel_axis: an int, None (no channels) or "auto": the "c" axis recorded in the
            file (OME-Zarr, OME/ImageJ TIFF, see :func:`napari_unet.io.read_axes`).
        stitch: link per-plane instances into 3D objects before writing the output.
        client: a ``dask.distributed.Client`` to run the planes on; None runs them here,
            one after another.
        retries: extra attempts for a failed plane task on a cluster.
        overwrite: redo and replace existing outputs. Otherwise complete outputs are
            skipped, and interrupted ones (same settings) resume with the missing planes.
        cancel: polled between planes (and tiles, in-process); planes done are kept.

    Raises:
        BatchError: at the end, if some planes failed (the rest are done and kept).
    """
    start = time.perf_counter()
    path = Path(model_path) if model_path is not None else bundled_model_path()
    model = load_model(path)
    inference = inference or InferenceConfig()
    post = postprocess or PostprocessConfig()
    ref = ModelRef(str(path.resolve()), _file_digest(path), json.dumps(asdict(inference)))
    if stitch is not None:
        # Bad stitch settings should fail now, not after hours of segmentation.
        drain(stitch_planes_iter(np.zeros((2, 1, 1), np.int32), **asdict(stitch) | {"axis": 0}))
    targets = [Path(j.output).resolve() if j.output is not None
               else (Path(j.source).resolve(), j.label_name) for j in jobs]
    if len(set(targets)) < len(targets):
        raise ValueError("two inputs would write to the same output; give distinct outputs")
    # Plan every input first, so a bad file or path fails before hours of work.
    plans = [_plan(job, ref, model.config.in_channels, post, channel_axis, stitch, overwrite)
             for job in jobs]
    del model
    by_store = {str(p.store): p for p in plans}
    tasks = [
        PlaneTask(str(p.job.source), str(p.store), i, p.keys[i], p.channel_axis, p.stride)
        for p in plans for i in p.todo
    ]
    result = BatchResult(planes_skipped=sum(len(p.keys) - len(p.todo) for p in plans))
    total, done = len(tasks), 0
    failures: list[tuple[str, int, str]] = []

    def progress(message: str | None = None, plane_fraction: float = 0.0) -> BatchProgress:
        return BatchProgress(done, total, time.perf_counter() - start, message, plane_fraction)

    def finish(plan: _Plan) -> Iterator[BatchProgress]:
        for _ in _finalise(plan, stitch, overwrite):
            yield progress()
        result.outputs.append(plan.output)
        yield progress(f"{plan.job.source} -> {plan.output}")

    def record(res: PlaneResult) -> Iterator[BatchProgress]:
        plan = by_store[res.store]
        result.planes_computed += 1
        result.megapixels += res.pixels / 1e6
        plan.remaining -= 1
        yield progress()
        if plan.remaining == 0:
            yield from finish(plan)

    for plan in plans:
        if plan.skip_reason:
            yield progress(f"skipped {plan.job.source}: {plan.skip_reason}")
        elif not plan.todo:
            # Every plane was done by an earlier run that stopped before finishing the file.
            yield from finish(plan)

    if client is None:
        try:
            for task in tasks:
                if cancel is not None and cancel():
                    result.cancelled = True
                    break
                res = yield from relay(
                    run_plane_iter(task, ref, post, cancel),
                    lambda p: progress(plane_fraction=p.tiles_done / max(p.tiles_total, 1)))
                if res is None:
                    result.cancelled = True
                    break
                done += 1
                yield from record(res)
        finally:
            _open_image.cache_clear()  # let go of open files
    else:
        from distributed import as_completed

        run_id = uuid.uuid4().hex[:8]
        futures = [client.submit(run_plane, task, ref, post, retries=retries, pure=False,
                                 key=f"napari-unet-{run_id}-{n}")
                   for n, task in enumerate(tasks)]
        task_of = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        pending = set(task_of)
        try:
            for fut in as_completed(futures):
                pending.discard(fut.key)
                done += 1
                if fut.status == "finished":
                    res = fut.result()
                    fut.release()
                    yield from record(res)
                else:
                    task = task_of[fut.key]
                    failures.append((task.source, task.index, repr(fut.exception())))
                    yield progress()
                if cancel is not None and cancel():
                    result.cancelled = True
                    break
        finally:
            # Interrupted (cancel, Ctrl-C, an error): drop the queued planes. Finished ones
            # are on disk with their markers, for the next run to skip.
            if pending:
                client.cancel([f for f in futures if f.key in pending])
    result.elapsed = time.perf_counter() - start
    if failures:
        raise BatchError(failures, result)
    return result


def local_client(n_workers: int, threads_per_worker: int = 1, **kwargs: Any) -> Any:
    """A ``dask.distributed`` client on its own new cluster of local worker processes.

    Each worker runs ``threads_per_worker`` planes at a time, and dask's nanny starts it with
    one OpenMP/MKL thread, so PyTorch uses one core per running plane. ``client.close()``
    shuts the cluster down too.
    """
    from distributed import Client

    kwargs.setdefault("dashboard_address", ":0")  # any free port: 8787 may be taken
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    # dask gives workers a tiny MALLOC_TRIM_THRESHOLD_; glibc then stops adapting its mmap
    # threshold, so every plane-sized array is a fresh mmap with page faults: workers ran
    # 1.5x slower than the same planes in-process. Nannies read this when they are made.
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return Client(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      processes=True, **kwargs)
