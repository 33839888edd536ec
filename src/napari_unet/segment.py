"""Segment 2D planes and N-D stacks with a model: the engine behind the CLI and widgets.

Stacks (Z, T, channels, ...) are processed one 2D plane at a time, read lazily from numpy,
dask or zarr arrays and written into ``out`` (which may be an on-disk zarr array), so memory
stays bounded by a few planes whatever the stack size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .device import autocast, resolve_precision, select_device, to_device
from .model import UNet, activate, check_channels, fuse_batchnorm
from .normalize import check_finite, check_image_dtype, normalize, resolve_rgb
from .params import ConfigError, check, check_multiple, param
from .postprocess import PostprocessConfig, labels_from_probs
from .tiling import drain, sliding_window_iter


@dataclass
class InferenceConfig:
    """Tiling, batching, device and precision for prediction."""

    # 256-pixel tiles ran fastest on a 2-core CPU (cache-friendly); GPUs like larger
    # tiles and batches: raise them there.
    tile: int = param(256, min=0, min_exclusive=True, multiple_of=8,
                      help="tile size in pixels (a multiple of the model's divisor)")
    overlap: int = param(48, min=0, multiple_of=8, help="overlap between tiles in pixels",
                         advanced=True)
    margin: int = param(16, min=0, help="pixels at each tile edge given no weight (context)",
                        advanced=True)
    batch_size: int = param(4, min=1, max=1024, help="tiles per forward pass", label="batch")
    blend: str = param("cosine", choices=("cosine", "linear", "constant"),
                       help="how overlapping tiles are blended", advanced=True)
    device: str = param("auto", help="auto, cuda, cuda:N, mps or cpu")
    precision: str = param("auto", choices=("auto", "fp32", "bf16", "fp16"),
                           help="compute precision (auto: bf16/fp16 where the device is fast "
                           "at it)", advanced=True)

    def __post_init__(self) -> None:
        check(self)
        if self.overlap < 2 * self.margin or self.overlap >= self.tile:
            raise ConfigError(
                f"InferenceConfig: overlap ({self.overlap}) must be at least 2 x margin "
                f"({2 * self.margin}) and smaller than the tile ({self.tile})")


def check_against_model(config: InferenceConfig, model_config: Any) -> None:
    """Raise ConfigError unless tile and overlap fit the model (multiples of its divisor)."""
    why, divisor = f"a model of depth {model_config.depth}", model_config.divisor
    check_multiple("InferenceConfig", "tile", config.tile, divisor, why)
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


class Predictor:
    """A model on its device in the fastest safe layout/precision; maps planes to probabilities."""

    def __init__(self, model: UNet, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.model_config = model.config
        check_against_model(self.config, model.config)
        self.device = select_device(self.config.device)
        self.amp = resolve_precision(self.device, self.config.precision)
        # A private (fused) copy: the caller's model may keep training in another thread.
        self.net = to_device(fuse_batchnorm(model), self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised tiles -> (B, K, h, w) maps (see :func:`model.activate`)."""
        batch = batch.to(self.device, memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            logits = self.net(batch)
        return activate(self.model_config, logits)

    def predict_iter(self, plane: np.ndarray) -> Generator[tuple[int, int], None, np.ndarray]:
        """Normalise one (H, W) or (C, H, W) plane and predict it tile by tile."""
        plane = np.asarray(plane)
        if plane.ndim == 2:
            plane = plane[None]
        check_channels(self.model_config.in_channels, plane.shape[0])
        c = self.config
        norm = normalize(plane, self.model_config.norm_percentiles)
        return (
            yield from sliding_window_iter(
                norm, self, tile=c.tile, overlap=c.overlap, margin=c.margin,
                batch_size=c.batch_size, blend=c.blend, divisor=self.model_config.divisor,
                device=self.device,
            )
        )

    def predict(self, plane: np.ndarray) -> np.ndarray:
        """(K, H, W) float32 class probabilities for one plane."""
        return drain(self.predict_iter(plane))


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
) -> Generator[SegmentProgress, None, Any]:
    """Segment every plane of an N-D image; yields progress, returns the label array.

    ``image``: numpy, dask or zarr array whose last two axes are Y, X. ``out``: an array of
    the output shape to write into (default: a new int32 numpy array). Instance ids are
    offset plane by plane so they are unique across the stack. ``planes`` restricts the work
    to some plane keys (e.g. the slice on screen). On cancel, planes done so far are kept.
    """
    shape = tuple(image.shape)
    check_image(shape, channel_axis)
    if channel_axis is not None:
        channel_axis %= len(shape)
    post = postprocess or PostprocessConfig()
    if out is None:
        out = np.zeros(output_shape(shape, channel_axis), np.int32)
    keys = list(planes) if planes is not None else list(plane_indices(shape, channel_axis))
    start, offset = time.perf_counter(), 0
    for i, key in enumerate(keys):
        if cancel is not None and cancel():
            break
        plane = read_plane(image, key, channel_axis)
        check_finite(plane, f"plane {i} of the image")
        gen = predictor.predict_iter(plane)
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                probs = stop.value
                break
            yield SegmentProgress(i, len(keys), done, total, time.perf_counter() - start)
            if cancel is not None and cancel():
                gen.close()
                return out
        labels = labels_from_probs(probs, post)
        out_key = label_key(key, channel_axis)
        if post.mode == "instances" and labels.max() > 0:
            labels = np.where(labels > 0, labels + offset, 0).astype(np.int32)
            offset = int(labels.max())
        out[out_key] = labels
        if probabilities_out is not None:
            probabilities_out[(slice(None),) + out_key] = probs
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
