"""Planning a resumable batch segmentation: jobs, fingerprints, locks, what is already done.

Every 2D plane of every input (with all its channels) is one task (run by
:mod:`napari_unet.batch`). Its labels go into an on-disk zarr "work store" chunked one plane
per chunk, and a done-marker file in the store's progress folder says the plane is complete;
a rerun skips planes with a marker.

A rerun may only trust that work if nothing it depends on changed. The store records a
*fingerprint* (:func:`run_fingerprint`): each input's path, shape, dtype, file sizes and
modification times and a hash of sampled pixels, the model file's digest, and every
setting that changes the labels. A finished output records it too (zarr attributes, the
TIFF description, the OME-Zarr label group's attributes), so:

- an interrupted run resumes only with the same fingerprint; a temporary store of ours is
  otherwise started again, a ``.zarr`` output the user named is refused with what changed;
- a finished output is skipped only if its fingerprint matches; one made from something
  else is refused (``--overwrite`` redoes it), and an output napari-unet did not write is
  never taken as done;
- ``-o`` equal to, inside, or containing an input is always refused;
- each output is locked (a lock file with pid and host) while a run writes it; a lock whose
  process is gone (same host) is stale and taken over.

Instance ids: while planes are segmented, plane ``i`` stores ``local_id + i * PLANE_STRIDE``
(``PLANE_STRIDE = 2**20``): unique across the stack without coordination between tasks, and
independent of which worker ran a plane or how often the run was resumed. The store is int32
up to 2047 planes and int64 beyond. Finalising renumbers them as every entry point numbers
cells (:func:`napari_unet.segment.offset_ids`): consecutively, plane after plane, so the CLI,
the widgets and the Python API give the same image the same ids; with ``stitch=...``
:func:`napari_unet.stitch.stitch_planes` numbers the 3D objects 1..N instead.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import socket
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import atomic, io
from .model import check_channels
from .normalize import file_is_rgb, resolve_rgb
from .postprocess import PostprocessConfig
from .segment import check_image, label_key, output_shape, plane_indices
from .stitch import stitch_planes_iter

__all__ = [
    "PLANE_STRIDE",
    "PROGRESS_DIR",
    "Job",
    "ModelRef",
    "OutputError",
    "OutputInUseError",
    "OutputLock",
    "StitchSettings",
    "describe_changes",
    "input_fingerprint",
]

PLANE_STRIDE = 2**20
PROGRESS_DIR = ".napari-unet-progress"
RUN_FILE = "run.json"
ATTRS_KEY = "napari_unet"
_INT32_MAX = 2**31 - 1
# errno values that mean "this output cannot be written": the message says what to do.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG}
# A lock file that never got its content (writer killed between create and write).
_EMPTY_LOCK_STALE_S = 60.0


class OutputError(ValueError):
    """An output cannot be written (folder missing or read-only, disk full, -o = input)."""


class OutputInUseError(FileExistsError):
    """Another run holds the output's lock."""


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
    :func:`napari_unet.io.read_axes`), else axis 0. (No anisotropy: matching compares the
    2D masks of neighbouring planes, which the voxel depth does not change; lower
    ``threshold`` for thick sections instead.)
    """

    axis: int | None = None
    threshold: float = 0.7
    metric: str = "overlap"
    split_ratio: float | None = 0.85


@dataclass(frozen=True)
class ModelRef:
    """A model file and inference settings; workers load it once per process."""

    path: str
    digest: str
    inference_json: str


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# fingerprints

# Windows of this side are hashed from a few planes of each input.
_SAMPLE_SIDE = 256
_SAMPLE_PLANES = 4
# Folders inside an OME-Zarr image that are not the image (ours land in labels/).
_SKIP_IN_ZARR = {"labels", ".zmetadata"}


def _tree_stats(path: Path) -> dict[str, int]:
    """Number, total size and newest mtime of the files making up a zarr folder.

    Chunk files are rewritten in place when data changes, which leaves the folder's own
    mtime alone: every file must be looked at. ``labels/`` is skipped, as writing labels
    into an OME-Zarr input must not make it look changed.
    """
    files = size = newest = 0
    for root, dirs, names in os.walk(path):
        if Path(root) == path:
            dirs[:] = [d for d in dirs if d not in _SKIP_IN_ZARR and not d.startswith(".")]
        for name in names:
            if root == str(path) and name in _SKIP_IN_ZARR:
                continue
            st = os.stat(os.path.join(root, name))
            files += 1
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return {"files": files, "bytes": size, "mtime_ns": newest}


def _sample_hash(image: da.Array, keys: list[tuple]) -> str:
    """SHA-256 of a centred window of a few evenly spaced planes (all channels)."""
    h = hashlib.sha256()
    picks = sorted({round(i * (len(keys) - 1) / max(_SAMPLE_PLANES - 1, 1))
                    for i in range(_SAMPLE_PLANES)}) if keys else []
    ys, xs = image.shape[-2:]
    win = (slice(max(ys // 2 - _SAMPLE_SIDE // 2, 0), ys // 2 + _SAMPLE_SIDE // 2),
           slice(max(xs // 2 - _SAMPLE_SIDE // 2, 0), xs // 2 + _SAMPLE_SIDE // 2))
    for i in picks:
        key = keys[i][:-2] + win
        block = np.ascontiguousarray(image[key].compute(scheduler="synchronous"))
        h.update(str(i).encode())
        h.update(block.tobytes())
    return h.hexdigest()[:16]


def input_fingerprint(path: Path, image: da.Array, keys: list[tuple]) -> dict[str, Any]:
    """What identifies an input's content: path, shape, dtype, file stats, sampled pixels."""
    fp: dict[str, Any] = {"path": str(path.resolve()), "shape": list(image.shape),
                          "dtype": str(image.dtype)}
    if path.is_dir():
        fp |= _tree_stats(path)
    else:
        st = path.stat()
        fp |= {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    fp["sample"] = _sample_hash(image, keys)
    return fp


def run_fingerprint(input_fp: dict[str, Any], channel_axis: int | None, model: ModelRef,
                    post: PostprocessConfig, stride: int) -> dict[str, Any]:
    """Everything a plane's labels depend on. Device and batch size do not change them, nor
    does where post-processing runs (``post_device``: the same watershed, equal up to rare
    ties; scripts/postprocess_parity.py), so a run may be resumed on another machine."""
    inf = json.loads(model.inference_json)
    return {
        "input": input_fp, "channel_axis": channel_axis, "model": model.digest,
        "plane_stride": stride,
        # Flip averaging changes the maps; recorded only when on, so runs made before the
        # option existed still resume.
        "inference": {k: inf[k] for k in ("tile", "overlap", "margin", "blend", "precision")}
        | ({"tta": True} if inf.get("tta") else {})
        # Likewise the object size: only what differs from measuring it per plane.
        | ({"rescale": False} if inf.get("rescale") is False else {})
        | ({"object_diameter": d} if (d := inf.get("object_diameter")) else {}),
        "postprocess": {k: v for k, v in asdict(post).items() if k != "post_device"},
    }


_WHAT = {"input": "the input", "model": "the model file", "inference": "the tiling settings",
         "postprocess": "the post-processing settings", "channel_axis": "the channel axis",
         "plane_stride": "the label mode", "stitch": "the 3D stitching settings"}
_INPUT_WHAT = {"path": "its path", "shape": "its shape", "dtype": "its dtype",
               "sample": "its pixels", "bytes": "its size", "files": "its files",
               "mtime_ns": "its modification time"}


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A short phrase naming what differs between two fingerprints."""
    if not isinstance(old, dict):
        return "it records no fingerprint (an older version wrote it)"
    parts = []
    for key in new.keys() | old.keys():
        if old.get(key) == new.get(key):
            continue
        if key == "input" and isinstance(old.get("input"), dict):
            sub = [v for k, v in _INPUT_WHAT.items()
                   if old["input"].get(k) != new["input"].get(k)]
            parts.append("the input (" + ", ".join(sub) + ")")
        else:
            parts.append(_WHAT.get(key, key))
    return (", ".join(sorted(parts)) or "nothing") + " changed"


# --------------------------------------------------------------------------------------------
# locks


class OutputLock:
    """An exclusive lock file next to an output: ``{"pid", "host", "started"}``.

    Created with O_EXCL, so two runs cannot both take it. A lock left by a process that is
    gone (same host) is stale and taken over; on another host it cannot be checked, and the
    message says which file to delete.
    """

    def __init__(self, path: Path, output: Path) -> None:
        self.path, self.output = path, output
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            try:
                return time.time() - self.path.stat().st_mtime > _EMPTY_LOCK_STALE_S
            except OSError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
            return False
        return False

    def acquire(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    atomic.remove(self.path)
                    continue
                who = (f"process {holder.get('pid')} on {holder.get('host')}, since "
                       f"{holder.get('started')}") if holder else "another process"
                raise OutputInUseError(
                    f"{self.output} is being written by another napari-unet run ({who}). "
                    f"Wait for it to finish; if that run is gone, delete {self.path}"
                ) from None
            except OSError as exc:
                raise output_error(exc, self.output, "cannot create its lock file") from exc
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return
        raise OutputInUseError(f"could not take the lock {self.path}; delete it and retry")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                atomic.remove(self.path)
            self.held = False


def output_error(exc: OSError, path: Path, doing: str = "") -> OutputError:
    """A message for an OS error while writing ``path`` (disk full, read-only, ...)."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too big",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied"
              }.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write {path}{': ' + doing if doing else ''} ({reason}). Free "
                       "some space or choose a writable folder; finished planes are kept, so "
                       "running the same command again resumes")


# --------------------------------------------------------------------------------------------
# planning


@dataclass
class Plan:
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
    record: dict[str, Any]  # the finished output's fingerprint (run + stitching)
    skip_reason: str | None = None
    remaining: int = 0
    output: str = ""
    rgb: str | None = None  # how colour samples are read (see as_segmented)


def resolve_channel_axis(channel_axis: int | str | None, axes: str | None,
                         ndim: int) -> int | None:
    """An explicit axis wins; "auto" takes the "c" axis recorded in the file, if any."""
    if channel_axis == "auto":
        return axes.index("c") if axes and "c" in axes and len(axes) == ndim else None
    if channel_axis is None:
        return None
    return int(channel_axis) % ndim


def stitch_axis(stitch: StitchSettings, axes: str | None, ndim: int,
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


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_outputs(jobs: list[Job]) -> None:
    """Refuse outputs that are (in) an input, shared, or in a missing/read-only folder;
    before any work, whatever ``overwrite`` says."""
    sources = [Path(j.source) for j in jobs]
    finals = []
    for job in jobs:
        if job.output is None:
            finals.append((Path(job.source).resolve(), job.label_name))
            continue
        out = Path(job.output)
        finals.append(out.resolve())
        for src in sources:
            if _overlaps(out, src):
                where = "is" if out.resolve() == src.resolve() else "is inside or holds"
                raise OutputError(f"the output {out} {where} the input {src}; writing it "
                                  "would destroy the input. Choose another -o path")
        parent = out.resolve().parent
        if not parent.is_dir():
            raise OutputError(f"cannot write {out}: the folder {parent} does not exist. "
                              "Create it first or choose another -o path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {out}: the folder {parent} is not writable. "
                              "Choose another -o path")
    if len(set(finals)) < len(finals):
        raise ValueError("two inputs would write to the same output; give distinct outputs")


def _lock_path(job: Job, final: Path) -> Path:
    if job.output is None:
        src = Path(job.source)
        return src.with_name(f".{src.name}.{job.label_name}.napari-unet.lock")
    return final.with_name(f".{final.name}.napari-unet.lock")


def read_run(store: Path) -> dict[str, Any] | None:
    try:
        return json.loads((store / PROGRESS_DIR / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _finished_record(kind: str, final: Path) -> tuple[bool, dict[str, Any] | None]:
    """(is it a finished napari-unet output, its record) for an existing output path."""
    if kind == "ome":
        try:
            attrs = dict(zarr.open_group(str(final), mode="r").attrs.get(ATTRS_KEY, {}))
        except Exception:  # not a group we can read: not ours
            attrs = {}
    else:
        attrs = dict((io.read_label_attrs(final) or {}).get(ATTRS_KEY, {}))
    return bool(attrs.get("complete")), attrs.get("record")


def _create_store(store: Path, shape: tuple[int, ...], dtype: np.dtype,
                  run: dict[str, Any], stride: int) -> None:
    """A new work store, created whole under a temporary name: a crash (or a full disk)
    never leaves a store without its fingerprint, which no rerun could then resume."""
    with atomic.atomic_path(store) as tmp:
        io.create_label_store(tmp, shape, dtype)
        (tmp / PROGRESS_DIR).mkdir()
        (tmp / PROGRESS_DIR / RUN_FILE).write_text(json.dumps(run, indent=1))
        zarr.open_array(str(tmp), mode="r+").attrs[ATTRS_KEY] = {
            "complete": False, "plane_stride": stride, "source": run["input"]["path"]}


def as_segmented(image: da.Array, path: str | Path, rgb: str | None,
                 channel_axis: int | None) -> da.Array:
    """An input as the run reads it: colour samples converted to grey with ``rgb="gray"``,
    kept with ``"none"``, refused otherwise (:func:`napari_unet.normalize.resolve_rgb`)."""
    return resolve_rgb(image, channel_axis=channel_axis, rgb=rgb,
                       photometric_rgb=file_is_rgb(path), name=str(path), option="--rgb {}")


def plan_job(job: Job, model: ModelRef, in_channels: int, post: PostprocessConfig,
             channel_axis: int | str | None, stitch: StitchSettings | None,
             overwrite: bool, rgb: str | None = None) -> Plan:
    """Decide what is left to do for one input (the caller holds the output's lock)."""
    src = Path(job.source)
    image = io.read_image(src)
    axes = io.read_axes(src)
    ch = resolve_channel_axis(channel_axis, axes, image.ndim)
    # The fingerprint is taken of what is segmented (grey when converted), so a run with
    # another --rgb never resumes this one.
    converted = as_segmented(image, src, rgb, ch)
    if converted is not image:
        image, axes = converted, (axes[:-1] if axes else None)
    shape = tuple(int(s) for s in image.shape)
    check_image(shape, ch, name=str(src))
    check_channels(in_channels, shape[ch] if ch is not None else 1, what=str(src))
    out_shape = output_shape(shape, ch)
    st_axis = None
    if stitch is not None:
        if post.mode != "instances":
            raise ValueError("3D stitching needs instance labels, not semantic classes")
        if len(out_shape) >= 3:  # a single plane in a batch of stacks is left as it is
            st_axis = stitch_axis(stitch, axes, len(shape), ch)

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
    # Whatever a killed writer of this output left (we hold its lock, so none is live).
    atomic.remove_stale_temporaries(final)

    keys = list(plane_indices(shape, ch))
    instances = post.mode == "instances"
    stride = PLANE_STRIDE if instances else 0
    dtype = np.dtype(np.int32 if len(keys) * stride <= _INT32_MAX else np.int64)
    if not instances:
        dtype = np.dtype(np.uint8)
    run = run_fingerprint(input_fingerprint(src, image, keys), ch, model, post, stride)
    record = run | {"stitch": asdict(stitch) if st_axis is not None else None}
    plan = Plan(job, kind, final, store, out_shape, keys, [], ch, st_axis, stride, record,
                rgb=rgb)

    if not overwrite and (final.exists() or final.is_symlink()):
        complete, old = _finished_record(kind, final)
        if complete and old == record:
            plan.skip_reason = f"{final} is up to date (--overwrite redoes it)"
            return plan
        if complete:
            raise FileExistsError(
                f"{final} was made from something else ({describe_changes(old, record)}); "
                "pass --overwrite to redo it, or choose another output")
        if kind != "zarr" or read_run(final) is None:
            raise FileExistsError(
                f"{final} exists and was not written by napari-unet (or not completely); "
                "pass --overwrite to replace it, or choose another path")

    previous = None if overwrite else read_run(store)
    if previous is not None and previous != run:
        if kind == "zarr":
            raise ValueError(
                f"{store} holds an interrupted run with other settings "
                f"({describe_changes(previous, run)}); pass --overwrite to start again")
        previous = None  # our own temporary store: start again
    if previous is None:
        if kind == "zarr" and (final.exists() or final.is_symlink()):
            io._check_target(final, True, want_dir=True)  # never replace a foreign folder
        _create_store(store, out_shape, dtype, run, stride)
    done = done_planes(store)
    plan.todo = [i for i in range(len(keys)) if i not in done]
    plan.remaining = len(plan.todo)
    return plan


def plan_jobs(stack: ExitStack, jobs: list[Job], model: ModelRef, in_channels: int,
              post: PostprocessConfig, channel_axis: int | str | None,
              stitch: StitchSettings | None, overwrite: bool,
              rgb: str | None = None) -> list[Plan]:
    """Check every output, lock it (released when ``stack`` closes) and plan every input,
    so a bad file or path fails before hours of work."""
    check_outputs(jobs)
    plans = []
    for job in jobs:
        final = Path(job.output) if job.output is not None else (
            Path(job.source) / "labels" / job.label_name)
        lock = OutputLock(_lock_path(job, final), final)
        lock.acquire()
        stack.callback(lock.release)
        try:
            plans.append(plan_job(job, model, in_channels, post, channel_axis, stitch,
                                  overwrite, rgb))
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                raise output_error(exc, final, "preparing the output") from exc
            raise
    return plans


# --------------------------------------------------------------------------------------------
# progress markers


_DONE = re.compile(r"^(\d+)\.done$")


def mark_done(store: Path, index: int, n_objects: int) -> None:
    """Written after the plane's labels, atomically: a marker means the plane is complete,
    even if the worker is killed at any moment."""
    atomic.write_text(store / PROGRESS_DIR / f"{index}.done", str(n_objects))


def done_planes(store: Path) -> set[int]:
    folder = store / PROGRESS_DIR
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for name in os.listdir(folder) if (m := _DONE.match(name))}


# --------------------------------------------------------------------------------------------
# finalising


def renumber_consecutively(store: Any, keys: list[tuple], band: int = 2048) -> None:
    """Plane-offset ids (``local + i * PLANE_STRIDE``) -> consecutive ids in plane order, in
    place, one plane (``keys``: the plane's leading indices) at a time, in bands of ``band``
    rows (a whole-slide plane is never held whole).

    Safe to repeat after an interruption: each plane's ids are a run of ``n`` consecutive
    values (1..n locally), so its smallest id tells whether it is still plane-offset.
    """
    offset = 0
    for key in keys:
        height = store.shape[len(key)]
        rows = [(*key, slice(y, min(y + band, height))) for y in range(0, height, band)]
        low, high = None, 0
        for r in rows:
            labels = np.asarray(store[r])
            fg = labels[labels > 0]
            if fg.size:
                low = int(fg.min()) if low is None else min(low, int(fg.min()))
                high = max(high, int(fg.max()))
        if low is None:
            continue
        if low != offset + 1:  # not renumbered yet
            shift = offset - (low - 1)
            for r in rows:
                labels = np.asarray(store[r])
                labels[labels > 0] += shift
                store[r] = labels
        offset += high - low + 1


def finalise(plan: Plan, stitch: StitchSettings | None, overwrite: bool):
    """Stitch, then turn the work store into the output; yields after each plane stitched.

    Sets ``plan.output`` when done. The output records ``plan.record`` so a rerun can tell
    it is up to date.
    """
    # Streaming the store must run here, not on the cluster a Client may have made default.
    with dask.config.set(scheduler="threads"):
        store = zarr.open_array(str(plan.store), mode="r+")
        info = dict(store.attrs.get(ATTRS_KEY, {}))
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
            store.attrs[ATTRS_KEY] = info | {"stitching": todo}
            yield from stitch_planes_iter(store, out=store, **todo)
            info.pop("stitching", None)
        elif plan.stride:
            renumber_consecutively(store, [
                tuple(i for i in label_key(k, plan.channel_axis) if isinstance(i, int))
                for k in plan.keys])
        done = info | {"complete": True, "record": plan.record}
        if plan.kind == "zarr":
            store.attrs[ATTRS_KEY] = done
            atomic.remove(plan.store / PROGRESS_DIR)
            plan.output = str(plan.final)
            return
        labels = da.from_zarr(store)
        if plan.kind == "tiff":
            io.write_labels(plan.final, labels, overwrite=overwrite, attrs={ATTRS_KEY: done})
            plan.output = str(plan.final)
        else:
            plan.output = io.write_ome_zarr_labels(plan.job.source, labels,
                                                   plan.job.label_name, overwrite=overwrite)
            zarr.open_group(plan.output, mode="r+").attrs[ATTRS_KEY] = done
        atomic.remove(plan.store)
