"""Running a batch segmentation: every plane of every input, in this process or on a
``dask.distributed`` cluster; resumable (what is done, and whether it can be trusted, is
decided by :mod:`napari_unet.batch_plan`).

A task reads only its plane (lazily, through :func:`napari_unet.io.read_image`), segments
it with the engine (:func:`napari_unet.segment.segment_image`, which tiles the plane with
mirror padding, so planes need no halo) and writes its labels into the work store, one
chunk per plane: workers write disjoint chunks and need no locks. A task that fails or whose
worker dies is run again (``retries``; a plane write is idempotent). When every plane of an
input is done it is finalised on the calling process. Workers need the inputs, outputs and
the model file at the same paths (a shared file system).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import blocks, io
from .batch_plan import (
    OUTPUT_ERRNOS,
    PLANE_STRIDE,
    PROGRESS_DIR,
    Job,
    ModelRef,
    OutputError,
    OutputInUseError,
    Plan,
    StitchSettings,
    as_segmented,
    file_digest,
    finalise,
    mark_done,
    output_error,
    plan_jobs,
)
from .model import bundled_model_path, load_model
from .postprocess import PostprocessConfig, recommended
from .segment import (
    InferenceConfig,
    PlaneSink,
    Predictor,
    SegmentProgress,
    label_key,
    read_plane,
    segment_image,
)
from .stitch import stitch_planes_iter
from .tiling import drain, relay

__all__ = [
    "PLANE_STRIDE",
    "PROGRESS_DIR",
    "BatchError",
    "BatchProgress",
    "BatchResult",
    "Job",
    "OutputError",
    "OutputInUseError",
    "SchedulerError",
    "StitchSettings",
    "connect_scheduler",
    "local_client",
    "model_loads",
    "segment_batch",
]


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
class PlaneTask:
    """One plane: where to read it and where its labels go."""

    source: str
    store: str
    index: int
    key: tuple
    channel_axis: int | None
    stride: int
    rgb: str | None = None


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
def _open_image(path: str, mtime_ns: int, rgb: str | None,
                channel_axis: int | None) -> _PlaneReader:
    # Opening parses TIFF headers / zarr metadata; reuse it for the planes of one file.
    return _PlaneReader(as_segmented(io.read_image(path), path, rgb, channel_axis))


def _write_plane(task: PlaneTask, labels: np.ndarray) -> None:
    store = zarr.open_array(task.store, mode="r+")
    store[label_key(task.key, task.channel_axis)] = labels.astype(store.dtype, copy=False)


def run_plane_iter(
    task: PlaneTask,
    model: ModelRef,
    postprocess: PostprocessConfig,
    cancel: Callable[[], bool] | None = None,
) -> Generator[SegmentProgress, None, PlaneResult | None]:
    """Segment one plane into its store and mark it done; None if cancelled midway."""
    start = time.perf_counter()
    predictor = _cached_predictor(model.path, model.digest, model.inference_json)
    image = _open_image(task.source, os.stat(task.source).st_mtime_ns, task.rgb,
                        task.channel_axis)
    if blocks.needs_blocks(image.shape):
        return (yield from _run_huge_plane(task, image, predictor, postprocess, cancel, start))
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
    if n and task.index:
        dtype = zarr.open_array(task.store, mode="r").dtype  # int64 only past 2047 planes
        labels = labels.astype(dtype, copy=False)  # in place: planes can be huge
        labels[labels > 0] += task.index * task.stride
    _write_plane(task, labels)
    mark_done(Path(task.store), task.index, n)
    return PlaneResult(task.store, task.index, n, int(labels.size),
                       time.perf_counter() - start)


class _StoreWindow:
    """(H, W) window access to one plane of the work store, with the plane's id offset
    added on the way in and removed on the way out, so :func:`blocks.segment_plane_blocks`
    writes its labels straight to disk: memory stays a block's, not the plane's."""

    def __init__(self, store: zarr.Array, key: tuple, offset: int) -> None:
        self.store, self.key, self.offset = store, key, offset
        self.shape, self.dtype = tuple(store.shape[-2:]), store.dtype

    def __getitem__(self, yx: tuple) -> np.ndarray:
        region = np.asarray(self.store[self.key + yx])
        if self.offset:
            region[region > 0] -= self.offset
        return region

    def __setitem__(self, yx: tuple, labels: np.ndarray) -> None:
        region = np.asarray(labels).astype(self.store.dtype)
        if self.offset:
            region[region > 0] += self.offset
        self.store[self.key + yx] = region


def _run_huge_plane(task: PlaneTask, image: Any, predictor: Any, postprocess: PostprocessConfig,
                    cancel: Callable[[], bool] | None, start: float,
                    ) -> Generator[SegmentProgress, None, PlaneResult | None]:
    """A plane over the memory budget: block by block, written into the store as it goes."""
    plane = read_plane(image, task.key, task.channel_axis)
    store = zarr.open_array(task.store, mode="r+")
    key = tuple(k for k in label_key(task.key, task.channel_axis) if isinstance(k, int))
    window = _StoreWindow(store, key, task.index * task.stride)
    yield from relay(
        blocks.segment_plane_blocks(plane, predictor, postprocess, out=window, cancel=cancel),
        lambda b: SegmentProgress(0, 1, b.block * b.tiles_total + b.tiles_done,
                                  b.n_blocks * max(b.tiles_total, 1),
                                  time.perf_counter() - start))
    if cancel is not None and cancel():
        return None
    top = int(da.from_zarr(store)[key].max().compute(scheduler="synchronous"))
    n = top - task.index * task.stride if task.stride and top else 0
    mark_done(Path(task.store), task.index, n)
    return PlaneResult(task.store, task.index, n, int(np.prod(window.shape)),
                       time.perf_counter() - start)


def run_plane(task: PlaneTask, model: ModelRef, postprocess: PostprocessConfig) -> PlaneResult:
    """Blocking form of :func:`run_plane_iter`: what a cluster worker runs."""
    return drain(run_plane_iter(task, model, postprocess))


# --------------------------------------------------------------------------------------------
# running


def segment_batch(
    jobs: Sequence[Job],
    *,
    model_path: str | os.PathLike | None = None,
    inference: InferenceConfig | None = None,
    postprocess: PostprocessConfig | None = None,
    channel_axis: int | str | None = "auto",
    rgb: str | None = None,
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
        rgb: how an input whose last axis holds colour samples is read: "gray" (luma),
            "none" (as X); None refuses it (:func:`napari_unet.normalize.resolve_rgb`).
        stitch: link per-plane instances into 3D objects before writing the output.
        client: a ``dask.distributed.Client`` to run the planes on (see
            :func:`connect_scheduler`); None runs them here, one after another.
        retries: extra attempts for a failed plane task on a cluster.
        overwrite: redo and replace existing outputs. Otherwise outputs that are up to
            date are skipped, interrupted ones (same fingerprint) resume with the missing
            planes, and anything else is refused (see :mod:`napari_unet.batch_plan`).
        cancel: polled between planes (and tiles, in-process); planes done are kept.

    Raises:
        BatchError: at the end, if some planes failed (the rest are done and kept).
        OutputError: an output cannot be written (disk full, read-only, -o = an input).
        OutputInUseError: another run is writing one of the outputs.
    """
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    start = time.perf_counter()
    path = Path(model_path) if model_path is not None else bundled_model_path()
    model = load_model(path)
    inference = inference or InferenceConfig()
    post = postprocess or recommended(model.config.postprocess)
    ref = ModelRef(str(path.resolve()), file_digest(path), json.dumps(asdict(inference)))
    if stitch is not None:
        # Bad stitch settings should fail now, not after hours of segmentation.
        drain(stitch_planes_iter(np.zeros((2, 1, 1), np.int32), **asdict(stitch) | {"axis": 0}))
    with ExitStack() as locks:  # the outputs' locks, released however the run ends
        plans = plan_jobs(locks, list(jobs), ref, model.config.in_channels, post,
                          channel_axis, stitch, overwrite, rgb)
        del model
        try:
            return (yield from _run(plans, ref, post, stitch, client, retries, overwrite,
                                    cancel, start))
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                where = getattr(exc, "filename", None) or ", ".join(str(p.store) for p in plans)
                raise output_error(exc, Path(where)) from exc
            raise


def _run(plans: list[Plan], ref: ModelRef, post: PostprocessConfig,
         stitch: StitchSettings | None, client: Any | None, retries: int, overwrite: bool,
         cancel: Callable[[], bool] | None, start: float
         ) -> Generator[BatchProgress, None, BatchResult]:
    by_store = {str(p.store): p for p in plans}
    tasks = [
        PlaneTask(str(p.job.source), str(p.store), i, p.keys[i], p.channel_axis, p.stride,
                  p.rgb)
        for p in plans for i in p.todo
    ]
    result = BatchResult(planes_skipped=sum(len(p.keys) - len(p.todo) for p in plans))
    total, done = len(tasks), 0
    failures: list[tuple[str, int, str]] = []

    def progress(message: str | None = None, plane_fraction: float = 0.0) -> BatchProgress:
        return BatchProgress(done, total, time.perf_counter() - start, message, plane_fraction)

    def finish(plan: Plan) -> Iterator[BatchProgress]:
        for _ in finalise(plan, stitch, overwrite):
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


# --------------------------------------------------------------------------------------------
# clusters


_GREETING_S = 3.0


class SchedulerError(ConnectionError):
    """A dask scheduler address that does not lead to a usable cluster."""


def _probe(address: str, timeout: float) -> None:
    """Check that a tcp:// address answers like a dask scheduler, within ``timeout``.

    A dask scheduler greets every new connection at once; an HTTP server (a dashboard)
    waits for a request, and anything else answers with other bytes. Connecting a Client
    to those waited for minutes, or read an HTTP reply as a frame length (an allocation of
    exabytes).
    """
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp"):
        return  # tls, ucx, inproc ...: leave them to distributed
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    what_to_do = ("give the scheduler's address, as printed by `dask scheduler` "
                  "(tcp://HOST:8786 by default; 8787 is its dashboard)")
    if not host or not port.isdigit():
        raise SchedulerError(f"--dask-scheduler {address!r} is not an address like "
                             f"tcp://host:8786: {what_to_do}")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.gaierror as exc:
        raise SchedulerError(f"dask scheduler {address}: host {host!r} is unknown "
                             f"({exc.strerror}); {what_to_do}") from None
    except TimeoutError:
        raise SchedulerError(f"dask scheduler {address}: no answer within {timeout:g} s "
                             "(host down, or a firewall); check the address and that the "
                             "scheduler runs") from None
    except OSError as exc:
        raise SchedulerError(f"dask scheduler {address}: cannot connect "
                             f"({exc.strerror or exc}); is the scheduler running? "
                             f"{what_to_do}") from None
    with sock:
        # A scheduler greets within milliseconds; do not wait the whole timeout again.
        sock.settimeout(min(timeout, _GREETING_S))
        try:
            greeting = sock.recv(64)
        except TimeoutError:
            greeting = None
        if greeting is None:
            try:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = sock.recv(16)
            except OSError:
                reply = b""
            found = ("an HTTP server (a dask dashboard?)" if reply.startswith(b"HTTP/")
                     else f"a server that said nothing within {min(timeout, _GREETING_S):g} s")
            raise SchedulerError(f"{address} is {found}, not a dask scheduler; {what_to_do}")
        if b"pickle-protoco" not in greeting and b"compression" not in greeting:
            raise SchedulerError(f"{address} answered {greeting[:16]!r}..., not like a dask "
                                 f"scheduler; {what_to_do}")


def connect_scheduler(address: str, timeout: float = 5.0, worker_timeout: float = 10.0
                      ) -> Any:
    """A ``dask.distributed.Client`` on a running scheduler, or a clear error in seconds.

    Raises :class:`SchedulerError` when the address is wrong, answers unlike a scheduler,
    does not answer within ``timeout`` seconds, or the cluster has no worker after
    ``worker_timeout`` seconds (work would wait for ever).
    """
    from distributed import Client

    _probe(address, timeout)
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError, MemoryError) as exc:
        raise SchedulerError(f"dask scheduler {address}: cannot connect ({exc})") from None
    try:
        client.wait_for_workers(1, timeout=worker_timeout)
    except TimeoutError:
        client.close()
        raise SchedulerError(
            f"the dask scheduler at {address} has no workers (waited {worker_timeout:g} s); "
            f"start some with `dask worker {address}`, then run again") from None
    return client


def local_client(n_workers: int, threads_per_worker: int = 1, **kwargs: Any) -> Any:
    """A ``dask.distributed`` client on its own new cluster of local worker processes.

    Each worker runs ``threads_per_worker`` planes at a time, and dask's nanny starts it with
    one OpenMP/MKL thread, so PyTorch uses one core per running plane. ``client.close()``
    shuts the cluster down too.
    """
    from distributed import Client

    if n_workers < 1:
        raise ValueError(f"the number of workers must be 1 or more, got {n_workers}")
    kwargs.setdefault("dashboard_address", ":0")  # any free port: 8787 may be taken
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    # dask gives workers a tiny MALLOC_TRIM_THRESHOLD_; glibc then stops adapting its mmap
    # threshold, so every plane-sized array is a fresh mmap with page faults: workers ran
    # 1.5x slower than the same planes in-process. Nannies read this when they are made.
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return Client(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      processes=True, **kwargs)
