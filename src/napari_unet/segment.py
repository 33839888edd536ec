"""Segment 2D planes and N-D stacks with a model: the engine behind the CLI and widgets.

Stacks (Z, T, channels, ...) are processed one 2D plane at a time, read lazily from numpy,
dask or zarr arrays and written into ``out`` (which may be an on-disk zarr array), so memory
stays bounded by a few planes whatever the stack size.

One plane: :func:`segment_plane` = :func:`infer_plane` (on the device: upload, normalise,
tile, predict, blend, reduce to what post-processing reads; on a GPU the watershed too,
``PostprocessConfig.post_device``) + :func:`finish_plane` (on the host: watershed, or
nothing left to do). :func:`segment_image` runs the two halves of successive planes
at the same time (see there); :func:`offset_ids` keeps instance ids unique across planes.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import blocks, rescale
from .device import auto_tiling, autocast, resolve_precision, select_device, to_device
from .model import ModelConfig, UNet, activate, check_channels, fuse_batchnorm, load_model
from .normalize import _MAX_SAMPLES, check_finite, check_image_dtype, normalize, resolve_rgb
from .params import ConfigError, check, check_multiple, param
from .postprocess import DISTANCE, PostprocessConfig, labels_from_probs, recommended
from .postprocess_torch import instances_from_maps, resolve_post_device
from .targets import BG, INTERIOR
from .tiling import check_tiling, drain, relay, sliding_window_iter


@dataclass
class InferenceConfig:
    """Tiling, batching, device and precision for prediction."""

    # None: chosen from the device (device.auto_tiling): 256-pixel tiles in batches of 4 on
    # a CPU, 512 and up to 16 (from the free memory) on a GPU. Explicit values win.
    tile: int | None = param(None, optional=True, kind=int, min=0, min_exclusive=True,
                             multiple_of=8, help="tile size in pixels, a multiple of the "
                             "model's divisor (default: chosen from the device)")
    overlap: int = param(48, min=0, multiple_of=8, help="overlap between tiles in pixels",
                         advanced=True)
    margin: int = param(16, min=0, help="pixels at each tile edge given no weight (context)",
                        advanced=True)
    batch_size: int | None = param(None, optional=True, kind=int, min=1, max=1024,
                                   label="batch", help="tiles per forward pass (default: "
                                   "chosen from the device)")
    blend: str = param("cosine", choices=("cosine", "linear", "constant"),
                       help="how overlapping tiles are blended", advanced=True)
    device: str = param("auto", help="auto, cuda, cuda:N, mps or cpu")
    precision: str = param("auto", choices=("auto", "fp32", "bf16", "fp16"),
                           help="compute precision (auto: bf16/fp16 where the device is fast "
                           "at it)", advanced=True)
    tta: bool = param(False, label="flip averaging", advanced=True,
                      help="test-time augmentation: average each tile's maps over it and its "
                      "3 mirror images (4x slower; fewer splits and false objects)")
    rescale: bool = param(True, label="shrink large objects", advanced=True,
                          help="segment planes whose objects are wider than the model's "
                          "object size shrunk to that size (objects measured per plane by a "
                          "quick pass at half size; a fine-tuned model keeps the size "
                          "measured in its training images; or from 'object diameter')")
    object_diameter: float | None = param(None, optional=True, kind=float, min=0,
                                          min_exclusive=True, advanced=True,
                                          help="typical diameter of your objects in pixels "
                                          "(default: measured per plane, or the "
                                          "fine-tuned model's)")

    def __post_init__(self) -> None:
        check(self)
        if self.overlap < 2 * self.margin or (self.tile is not None
                                               and self.overlap >= self.tile):
            raise ConfigError(
                f"InferenceConfig: overlap ({self.overlap}) must be at least 2 x margin "
                f"({2 * self.margin}) and smaller than the tile ({self.tile})")


def check_against_model(config: InferenceConfig, model_config: Any) -> None:
    """Raise ConfigError unless the tile (when given) and overlap fit the model (multiples
    of its divisor, overlap smaller than the tile); an automatic tile is checked once it is
    chosen."""
    why, divisor = f"a model of depth {model_config.depth}", model_config.divisor
    tile = config.tile
    if tile is not None:
        check_multiple("InferenceConfig", "tile", tile, divisor, why)
        if config.overlap >= tile:
            raise ConfigError(f"InferenceConfig: overlap ({config.overlap}) must be smaller "
                              f"than the tile ({tile})")
    check_multiple("InferenceConfig", "overlap", config.overlap, divisor, why)


@dataclass
class SegmentProgress:
    """Planes done (fractional within the current plane) out of the total."""

    plane: int
    n_planes: int
    tiles_done: int
    tiles_total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return (self.plane + self.tiles_done / max(self.tiles_total, 1)) / max(self.n_planes, 1)


def instance_channels(model_config: ModelConfig, n_outputs: int) -> dict[int, torch.dtype]:
    """The maps instance post-processing reads, and the dtype each is copied back in.

    P(background) (thresholded: float32, as float16 rounding flipped single pixels at the
    threshold), P(interior) (smoothed before use: float16 gave identical labels on the
    tested images, tests/test_segment_postprocess.py) and every extra channel (distance;
    float32 until shown otherwise). Only these are blended and copied to the host; the
    others reach :func:`labels_from_probs` as zeros, so a post-processing that reads another
    channel must add it here.
    """
    extra = dict.fromkeys(range(model_config.n_classes, n_outputs), torch.float32)
    return {BG: torch.float32, INTERIOR: torch.float16, **extra}


# numpy dtypes torch cannot move to a GPU as they are, and the same-size type whose bits
# are uploaded instead (converted back exactly on the device).
_UPLOAD_AS = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32,
              np.dtype(np.bool_): np.uint8}
_TORCH_NATIVE = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64,
                                       np.float16, np.float32, np.float64)}


def _device_values(raw: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """The uploaded bits of a plane of numpy ``dtype`` as float32 (what ``astype`` gives)."""
    if dtype == np.uint16:
        return (raw.to(torch.int32) & 0xFFFF).float()
    if dtype == np.uint32:
        return (raw.to(torch.int64) & 0xFFFFFFFF).float()
    return raw.float()


def percentile_range_tensor(values: torch.Tensor, percentiles: Sequence[float]
                            ) -> tuple[float, float]:
    """:func:`normalize.percentile_range` of a tensor on its device: the same strided
    subsample and numpy's "linear" interpolation, so the range matches the host's."""
    flat = values.reshape(-1)
    if flat.numel() > _MAX_SAMPLES:
        flat = flat[:: flat.numel() // _MAX_SAMPLES]
    exact = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS: no fp64
    v = torch.sort(flat.to(exact)).values
    n = v.numel()
    pos = []
    for p in percentiles:
        vi = n * (p / 100) + (1 - p / 100) - 1  # numpy's virtual index for "linear"
        lo = min(max(int(np.floor(vi)), 0), n - 1)
        pos += [lo, min(lo + 1, n - 1)]
    picked = v[torch.tensor(pos, device=v.device)].tolist()  # one device sync
    out = []
    for j, p in enumerate(percentiles):
        vi = n * (p / 100) + (1 - p / 100) - 1
        g = vi - np.floor(vi)
        a, b = picked[2 * j], picked[2 * j + 1]
        d = b - a
        out.append(b - d * (1 - g) if g >= 0.5 else a + d * g)  # numpy's _lerp
    return float(out[0]), float(out[1])


def normalize_tensor(values: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """:func:`normalize.normalize` of a float32 tensor on its device (same range, same
    float32 arithmetic)."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        bad = int(values.numel() - torch.isfinite(values).sum())
        raise ValueError(
            f"the image contains {bad} NaN or infinite pixel(s); replace them (for example "
            "with numpy.nan_to_num) before segmenting or training")
    lo, hi = percentile_range_tensor(values, percentiles)
    scale = 1.0 / max(hi - lo, 1e-6)
    return (values - float(np.float32(lo))) * float(np.float32(scale))


# Tests set this to run the staging-buffer upload (CUDA's path, unpinned) on a CPU.
_STAGE_ON_CPU = False


# Flip-averaging (``InferenceConfig.tta``): the tile itself and its three mirror images.
_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class Predictor:
    """A model on its device in the fastest safe layout/precision; maps planes to probabilities."""

    def __init__(self, model: UNet, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.model_config = model.config
        check_against_model(self.config, model.config)
        self.device = select_device(self.config.device)
        self.amp = resolve_precision(self.device, self.config.precision)
        self.tile, self.batch_size = auto_tiling(
            self.device, model.config.base_channels, self.config.tile, self.config.batch_size,
            self.amp)
        # An auto tile is only known here: check it now rather than at the first plane.
        check_tiling(self.tile, self.config.overlap, self.config.margin, model.config.divisor)
        # Class probabilities plus any extra maps (e.g. distance): not always 3.
        self.n_outputs = int(model.head.out_channels)
        # A private (fused) copy: the caller's model may keep training in another thread.
        self.net = to_device(fuse_batchnorm(model), self.device).eval()
        if self.device.type == "cuda":
            # Tiles have one shape per plane geometry: cuDNN times its kernels once per
            # shape and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        # Normalise on the device (percentiles by a device sort) rather than in numpy; on a
        # CPU numpy's partial sort is the faster of the two.
        self.normalize_on_device = self.device.type != "cpu"
        self._pinned: torch.Tensor | None = None
        self._uploaded: Any = None  # CUDA event: the last upload has left the pinned buffer
        # Set when the device lacked an operation of device post-processing (auto then
        # post-processes on the host from there on).
        self.post_device_failed = False
        self._ruler: Predictor | None = None  # see ruler()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor, channels: Sequence[int] | None = None
                 ) -> torch.Tensor:
        """(B, C, h, w) normalised tiles -> (B, K, h, w) maps (:func:`model.activate`),
        only ``channels`` of them if given."""
        batch = batch.to(self.device, memory_format=torch.channels_last)
        if not self.config.tta:
            maps = self._maps(batch)
        else:
            # Probabilities, not logits, are averaged: each mirror image votes with its maps.
            maps = sum(self._maps(batch.flip(dims)).flip(dims) for dims in _TTA_FLIPS)
            maps = maps / len(_TTA_FLIPS)
        return maps if channels is None else maps[:, list(channels)]

    def _maps(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            logits = self.net(batch)
        return activate(self.model_config, logits)

    def upload(self, plane: np.ndarray) -> torch.Tensor:
        """One plane on the device as float32 (raw intensities, not normalised).

        On CUDA the plane goes through one reused pinned buffer in its own dtype (uint16
        moves half the bytes of float32), asynchronously.
        """
        plane = np.ascontiguousarray(plane)
        if plane.dtype not in _TORCH_NATIVE and plane.dtype not in _UPLOAD_AS:
            plane = plane.astype(np.float32)
        dtype = plane.dtype
        bits = plane.view(_UPLOAD_AS[dtype]) if dtype in _UPLOAD_AS else plane
        if self.device.type == "cpu" and not _STAGE_ON_CPU:
            return _device_values(torch.from_numpy(bits), dtype)
        cuda = self.device.type == "cuda"
        if self._pinned is None or self._pinned.numel() < bits.nbytes:
            self._pinned = torch.empty(bits.nbytes, dtype=torch.uint8, pin_memory=cuda)
        elif self._uploaded is not None:
            self._uploaded.synchronize()  # the previous plane must have left the buffer
        host = self._pinned[: bits.nbytes].view(torch.from_numpy(bits[:0]).dtype)
        host = host.view(bits.shape)
        host.numpy()[...] = bits
        raw = host.to(self.device, non_blocking=cuda)
        if cuda:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        return _device_values(raw, dtype)

    def normalized(self, plane: np.ndarray) -> torch.Tensor:
        """A (C, H, W) plane normalised as in training, on the device (float32)."""
        pct = self.model_config.norm_percentiles
        if not self.normalize_on_device:
            return torch.from_numpy(normalize(plane, pct)).to(self.device)
        return normalize_tensor(self.upload(plane), pct)

    def predict_iter(
        self,
        plane: np.ndarray,
        *,
        channels: Sequence[int] | Mapping[int, torch.dtype] | None = None,
        argmax: bool = False,
        on_device: bool = False,
    ) -> Generator[tuple[int, int], None, Any]:
        """Normalise one (H, W) or (C, H, W) plane and predict it tile by tile.

        Returns (K, H, W) float32 maps on the host: all of them, or only ``channels``; a
        mapping channel -> dtype returns a dict of (H, W) arrays in those dtypes (tensors
        left on the device with ``on_device``). With ``argmax``: the (H, W) uint8 most
        likely class (reduced on the device).
        """
        x = self._input(plane)
        wanted = list(range(self.model_config.n_classes)) if argmax else \
            None if channels is None else list(channels)
        scale = yield from self._measure(x)
        small = rescale.resize(x, rescale.scaled_size(x.shape, scale))
        maps = yield from self._window(small, wanted)
        maps = rescale.resize(maps, tuple(x.shape[-2:]))
        # Reduce/convert on the device, then copy back only that.
        if argmax:
            return maps.argmax(0).to(torch.uint8).cpu().numpy()
        if isinstance(channels, Mapping) and on_device:
            return {ch: m.to(dt) for (ch, dt), m in zip(channels.items(), maps, strict=True)}
        if isinstance(channels, Mapping):
            return {ch: m.to(dt).cpu().numpy()
                    for (ch, dt), m in zip(channels.items(), maps, strict=True)}
        return maps.cpu().numpy()

    def _window(self, x: torch.Tensor, wanted: list[int] | None
                ) -> Generator[tuple[int, int], None, torch.Tensor]:
        c = self.config
        return (yield from sliding_window_iter(
            x, lambda b: self(b, wanted), tile=self.tile, overlap=c.overlap,
            margin=c.margin, batch_size=self.batch_size, blend=c.blend,
            divisor=self.model_config.divisor, device=self.device,
        ))

    def _measure(self, x: torch.Tensor) -> Generator[tuple[int, int], None, float]:
        """The scale a normalised (C, H, W) plane is predicted at (``rescale``): from the
        diameter given, else the model's fit diameter, else measured in the plane."""
        diameter = self.model_config.object_diameter
        shape = tuple(x.shape)
        if not self.config.rescale or not diameter:
            return 1.0
        given = self.config.object_diameter or self.model_config.fit_diameter
        if given is not None:
            return rescale.scale_for(given, diameter, shape)
        if min(shape[-2:]) * rescale.PROBE_SCALE < rescale.MIN_SIDE:
            return 1.0
        here = yield from self._measure_diameter(x)
        return rescale.scale_for(here, diameter, shape)

    def _measure_diameter(self, x: torch.Tensor
                          ) -> Generator[tuple[int, int], None, float | None]:
        """Median object diameter in a normalised plane: the ruler's segmentation of its
        central window at half size (:mod:`rescale`)."""
        where = rescale.probe_window(tuple(x.shape))
        window = x[(..., *where)]
        probe = rescale.resize(window, rescale.scaled_size(window.shape, rescale.PROBE_SCALE))
        ruler = self.ruler()
        maps = yield from ruler._window(probe, None)
        labels = labels_from_probs(maps.float().cpu().numpy(),
                                   recommended(ruler.model_config.postprocess))
        found = rescale.median_diameter(labels, cut=tuple(window.shape) != tuple(x.shape))
        return None if found is None else found / rescale.PROBE_SCALE

    def ruler(self) -> Predictor:
        """The model that measures object sizes: the bundled model, one ruler for every
        model file (and for the images a model is fine-tuned on); this model itself where
        the bundled one cannot read its channels."""
        if self._ruler is None:
            bundled = load_model()
            same = bundled.config.in_channels == self.model_config.in_channels
            # Its own tiling (the caller's tile may not suit its depth), this device.
            self._ruler = Predictor(bundled, InferenceConfig(
                device=self.config.device, precision=self.config.precision,
                rescale=False)) if same else self
        return self._ruler

    def _input(self, plane: np.ndarray) -> torch.Tensor:
        """An (H, W) or (C, H, W) plane, checked and normalised on the device (C, H, W)."""
        plane = np.asarray(plane)
        if plane.ndim == 2:
            plane = plane[None]
        check_channels(self.model_config.in_channels, plane.shape[0])
        return self.normalized(plane)

    def measure_diameter(self, plane: np.ndarray) -> float | None:
        """The median object diameter (pixels) the measuring pass finds in this plane."""
        return drain(self._measure_diameter(self._input(plane)))

    def measure_scale(self, plane: np.ndarray) -> float:
        """The scale :meth:`predict_iter` resizes this (H, W) or (C, H, W) plane by (1: none;
        see :mod:`rescale`)."""
        return drain(self._measure(self._input(plane)))

    def predict(self, plane: np.ndarray) -> np.ndarray:
        """(K, H, W) float32 class probabilities (and any extra maps) for one plane."""
        return drain(self.predict_iter(plane))


@dataclass
class InferredPlane:
    """What inference hands post-processing for one plane (host arrays): ``maps``, all
    (K, H, W) float32 maps or a dict channel -> (H, W) map of the channels post-processing
    reads; or ``labels`` already (semantic labels are the argmax, taken on the device;
    instances when post-processed on the device, see ``PostprocessConfig.post_device``)."""

    maps: np.ndarray | dict[int, np.ndarray] | None
    n_outputs: int
    labels: np.ndarray | None = None


def infer_plane(
    plane: np.ndarray, predictor: Predictor, postprocess: PostprocessConfig, *,
    keep_maps: bool = False,
) -> Generator[tuple[int, int], None, InferredPlane]:
    """The device half of :func:`segment_plane`: predict only what ``postprocess`` needs
    (all maps in float32 with ``keep_maps``); yields (tiles done, total). Instances are
    post-processed here too when ``postprocess.post_device`` puts them on the device."""
    n_out = predictor.n_outputs
    if keep_maps:
        maps = yield from predictor.predict_iter(plane)
        return InferredPlane(maps, n_out)
    if postprocess.mode == "semantic":
        labels = yield from predictor.predict_iter(plane, argmax=True)
        return InferredPlane(None, n_out, labels)
    if postprocess.mode != "instances":
        raise ValueError("postprocessing mode must be 'instances' or 'semantic', got "
                         f"{postprocess.mode!r}")
    channels = instance_channels(predictor.model_config, n_out)
    if post_on_device(predictor, postprocess):
        maps = yield from predictor.predict_iter(plane, channels=channels, on_device=True)
        try:
            labels = instances_from_maps(maps[BG], maps[INTERIOR], maps.get(DISTANCE),
                                         postprocess)
            return InferredPlane(None, n_out, labels)
        except (NotImplementedError, torch.cuda.OutOfMemoryError) as exc:
            # auto: an operation this backend (e.g. MPS) lacks moves post-processing to the
            # host for good; a plane too large for the memory left, this plane only.
            if postprocess.post_device == "device":
                raise
            predictor.post_device_failed = isinstance(exc, NotImplementedError)
            return InferredPlane({ch: m.cpu().numpy() for ch, m in maps.items()}, n_out)
    maps = yield from predictor.predict_iter(plane, channels=channels)
    return InferredPlane(maps, n_out)


def post_on_device(predictor: Predictor, postprocess: PostprocessConfig) -> bool:
    """Whether ``predictor``'s device post-processes instances (``post_device``; auto: CUDA
    and MPS, unless the device lacked an operation before)."""
    if postprocess.mode != "instances" or predictor.post_device_failed:
        return False
    return resolve_post_device(postprocess.post_device, predictor.device)


def finish_plane(inferred: InferredPlane, postprocess: PostprocessConfig) -> np.ndarray:
    """The host half of :func:`segment_plane`: maps -> labels (thread-safe: numpy, scipy
    and scikit-image release the GIL in their heavy loops)."""
    if inferred.labels is not None:
        return inferred.labels
    maps = inferred.maps
    assert maps is not None
    if isinstance(maps, dict):
        # Unread channels stay zero; large np.zeros pages are only mapped when touched.
        shape = next(iter(maps.values())).shape
        full = np.zeros((inferred.n_outputs, *shape), np.float32)
        for ch, m in maps.items():
            full[ch] = m
        maps = full
    return labels_from_probs(maps, postprocess)


def segment_plane(
    plane: np.ndarray,
    predictor: Predictor,
    postprocess: PostprocessConfig | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    return_maps: bool = False,
) -> Generator[tuple[int, int], None, Any]:
    """Segment one (H, W) or (C, H, W) plane; yields (tiles done, total).

    Returns the (H, W) labels (ids 1..n for instances), or ``(labels, maps)`` with
    ``return_maps`` (all (K, H, W) float32 maps); None when ``cancel()`` turned true.
    """
    post = postprocess or recommended(predictor.model_config.postprocess)
    gen = infer_plane(plane, predictor, post, keep_maps=return_maps)
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            inferred = stop.value
            break
        yield progress
        if cancel is not None and cancel():
            gen.close()
            return None
    labels = finish_plane(inferred, post)
    return (labels, inferred.maps) if return_maps else labels


def offset_ids(labels: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """Make instance ids unique across planes: returns ``labels`` with every id > 0 raised
    by ``offset`` (int32; int32 input is changed in place) and the next offset (the largest
    id now used).

    Planes are offset in plane order, each by the largest id of the planes before it; as
    post-processing numbers each plane's cells 1..n, the ids over a stack are 1..N in plane
    order with no gaps. Used by :func:`segment_image`; pass the returned offset to the next
    plane.
    """
    top = int(labels.max()) if labels.size else 0
    if top <= 0:
        return labels, offset
    if offset + top > np.iinfo(np.int32).max:
        raise ValueError(
            f"more than {np.iinfo(np.int32).max} cells over the stack: the int32 labels "
            "cannot hold unique ids; segment fewer planes at a time")
    # In place where possible: a whole-slide plane's labels are hundreds of MB.
    out = labels.astype(np.int32, copy=False)
    if offset:
        out[out > 0] += offset
    return out, offset + top


def post_workers(device: torch.device, on_device: bool = False) -> int:
    """Post-processing threads for :func:`segment_image` on ``device``.

    On a CPU inference already keeps every core busy, so one thread suffices to overlap a
    plane's watershed with the next plane's inference; so it does when post-processing runs
    on the device (``on_device``): the thread only writes finished labels. With an
    accelerator and host post-processing the host cores are otherwise idle, and one GPU
    outpaces several watersheds: all cores but one (which feeds the device), at most 8.
    """
    if device.type == "cpu" or on_device:
        return 1
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def plane_indices(shape: tuple[int, ...], channel_axis: int | None) -> Iterator[tuple]:
    """Index tuples selecting each 2D (or channels x 2D) plane of an N-D array."""
    lead = [i for i in range(len(shape) - 2) if i != channel_axis]
    for idx in np.ndindex(*[shape[i] for i in lead]):
        key: list[Any] = [slice(None)] * len(shape)
        for axis, i in zip(lead, idx, strict=True):
            key[axis] = i
        yield tuple(key)


def output_shape(shape: tuple[int, ...], channel_axis: int | None) -> tuple[int, ...]:
    """Shape of the label image: the input shape without its channel axis."""
    return tuple(n for i, n in enumerate(shape) if i != channel_axis)


def read_plane(image: Any, key: tuple, channel_axis: int | None) -> np.ndarray:
    """Read one plane (only that plane, for lazy arrays); channels first if any."""
    plane = np.asarray(image[key])
    if channel_axis is not None:
        # Integer indices before the channel axis have removed axes in front of it.
        plane = np.moveaxis(plane, channel_axis - sum(isinstance(k, int)
                                                      for k in key[:channel_axis]), 0)
    return plane


def label_key(key: tuple, channel_axis: int | None) -> tuple:
    """The index of a plane's labels in the output (which has no channel axis)."""
    return tuple(k for j, k in enumerate(key) if j != channel_axis)


def check_image(shape: tuple[int, ...], channel_axis: int | None, name: str = "image") -> None:
    """Raise a clear error for shapes that cannot be segmented plane by plane."""
    spatial = len(shape) - (channel_axis is not None)
    if spatial < 2:
        raise ValueError(f"{name} has shape {shape}: at least two spatial axes (Y, X) are needed")
    if channel_axis is not None:
        if not -len(shape) <= channel_axis < len(shape):
            raise ValueError(f"channel axis {channel_axis} is out of range for shape {shape}")
        if channel_axis % len(shape) >= len(shape) - 2:
            raise ValueError(
                f"{name} shape {shape}: the channel axis must come before the last two (Y, X) "
                "axes; move it (e.g. numpy.moveaxis) or pick another axis"
            )


class PlaneSink:
    """Stands in for ``out``/``probabilities_out`` when only some planes are segmented."""

    def __init__(self) -> None:
        self.planes: dict[tuple, np.ndarray] = {}

    @staticmethod
    def _hashable(key: tuple) -> tuple:
        # slices are unhashable before Python 3.12
        return tuple(None if isinstance(k, slice) else k for k in key)

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.planes[self._hashable(key)] = np.asarray(value)

    def get(self, key: tuple) -> np.ndarray | None:
        return self.planes.get(self._hashable(key))


def segment_image(
    image: Any,
    predictor: Predictor,
    *,
    channel_axis: int | None = None,
    postprocess: PostprocessConfig | None = None,
    out: Any | None = None,
    probabilities_out: Any | None = None,
    planes: list[tuple] | None = None,
    cancel: Callable[[], bool] | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
) -> Generator[SegmentProgress, None, Any]:
    """Segment every plane of an N-D image; yields progress, returns the label array.

    ``image``: numpy, dask or zarr array whose last two axes are Y, X. ``out``: an array of
    the output shape to write into (default: a new int32 numpy array). Instance ids are
    made unique across the stack by :func:`offset_ids`. ``planes`` restricts the work to
    some plane keys (e.g. the slice on screen). On cancel, planes done so far are kept.

    Pipelined: while plane i is inferred (in the caller's thread, which yields the
    progress), plane i+1 is read in a thread and earlier planes are post-processed by
    ``workers`` threads (default :func:`post_workers`; 0: serially, in this thread) and
    written in order. Queues are bounded: memory stays a few planes. The labels equal the
    serial path's. ``executor``: a pool of the caller's to post-process in instead (e.g. a
    long-lived ``ProcessPoolExecutor`` where the GIL limits threads); it is not shut down,
    and ``workers`` then bounds how many planes wait in it.
    """
    shape = tuple(image.shape)
    check_image(shape, channel_axis)
    if channel_axis is not None:
        channel_axis %= len(shape)
    post = postprocess or recommended(predictor.model_config.postprocess)
    if out is None:
        out = np.zeros(output_shape(shape, channel_axis), np.int32)
    keys = list(planes) if planes is not None else list(plane_indices(shape, channel_axis))
    if workers is None:
        workers = post_workers(predictor.device, post_on_device(predictor, post))
    keep_maps = probabilities_out is not None
    start, offset = time.perf_counter(), 0
    pending: deque[tuple[tuple, Future[np.ndarray], np.ndarray | None]] = deque()

    def read(i: int) -> np.ndarray:
        plane = read_plane(image, keys[i], channel_axis)
        check_finite(plane, f"plane {i} of the image")
        return plane

    def write(keep_at_most: int | None) -> None:
        """Write finished planes in order: all that are done (None), or block until at
        most ``keep_at_most`` are pending."""
        nonlocal offset
        while pending and (pending[0][1].done() if keep_at_most is None
                           else len(pending) > keep_at_most):
            key, future, maps = pending.popleft()
            labels = future.result()
            if post.mode == "instances":
                labels, offset = offset_ids(labels, offset)
            out_key = label_key(key, channel_axis)
            out[out_key] = labels
            if maps is not None:
                probabilities_out[(slice(None),) + out_key] = maps

    reader = ThreadPoolExecutor(1, thread_name_prefix="napari-unet-read")
    own = executor is None and workers > 0
    pool = ThreadPoolExecutor(workers, thread_name_prefix="napari-unet-post") if own \
        else executor
    workers = max(workers, 1) if executor is not None else workers
    try:
        ahead = reader.submit(read, 0) if keys else None
        for i, key in enumerate(keys):
            if cancel is not None and cancel():
                break
            assert ahead is not None
            try:
                plane = ahead.result()
            except Exception:
                write(0)  # keep the planes before the unreadable one, as the serial path did
                raise
            ahead = reader.submit(read, i + 1) if i + 1 < len(keys) else None
            if not keep_maps and blocks.needs_blocks(plane.shape):
                # A plane over the memory budget (a whole-slide scan): block by block with a
                # halo, its objects merged across block borders; memory is a block's.
                write(0)
                labels = yield from relay(
                    blocks.segment_plane_blocks(plane, predictor, post, cancel=cancel),
                    lambda b, i=i: SegmentProgress(
                        i, len(keys), b.block * b.tiles_total + b.tiles_done,
                        b.n_blocks * max(b.tiles_total, 1), time.perf_counter() - start))
                if cancel is not None and cancel():
                    break
                done_future: Future[np.ndarray] = Future()
                done_future.set_result(labels)
                pending.append((key, done_future, None))
                write(0)
                continue
            gen = infer_plane(plane, predictor, post, keep_maps=keep_maps)
            inferred = None
            while True:
                try:
                    done, total = next(gen)
                except StopIteration as stop:
                    inferred = stop.value
                    break
                yield SegmentProgress(i, len(keys), done, total, time.perf_counter() - start)
                if cancel is not None and cancel():
                    gen.close()
                    break
                write(None)  # while the device works on this plane
            if inferred is None:
                break
            if pool is None:
                future: Future[np.ndarray] = Future()
                future.set_result(finish_plane(inferred, post))
            else:
                future = pool.submit(finish_plane, inferred, post)
            pending.append((key, future, inferred.maps if keep_maps else None))
            write(workers)  # bounded: at most `workers` planes in post-processing
        write(0)  # also after a cancel: every inferred plane is kept
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
    return out


def segment(image: Any, model: UNet, **kwargs: Any) -> Any:
    """Blocking convenience: segment ``image`` with ``model`` and return the labels.

    Keyword arguments go to :class:`InferenceConfig` (tile, overlap, ...) or
    :func:`segment_image` (channel_axis, postprocess, out, ...); ``rgb`` says how a colour
    image is read (see :func:`napari_unet.normalize.resolve_rgb`).
    """
    fields = InferenceConfig.__dataclass_fields__
    config = InferenceConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    check_image_dtype(image.dtype)
    # A colour image is converted (rgb="gray"), read as is (rgb="none") or refused.
    image = resolve_rgb(image, channel_axis=kwargs.get("channel_axis"), rgb=kwargs.pop("rgb", None))
    return drain(segment_image(image, Predictor(model, config), **kwargs))
