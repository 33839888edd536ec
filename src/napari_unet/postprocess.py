"""Class probabilities -> instance or semantic labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed

from .params import check, param
from .targets import BG, INTERIOR


@dataclass
class PostprocessConfig:
    """How probabilities become labels."""

    mode: str = param("instances", choices=("instances", "semantic"),
                      help="instances: one id per cell; semantic: 0 background, 1 interior, "
                      "2 boundary")
    foreground_threshold: float = param(0.5, min=0, max=1, min_exclusive=True,
                                        help="P(cell) above which a pixel belongs to a cell",
                                        advanced=True)
    seed_threshold: float = param(0.4, min=0, max=1, min_exclusive=True,
                                  help="P(interior) above which a core seeds one cell",
                                  advanced=True)
    min_size: int = param(16, min=0, help="objects smaller than this many pixels are dropped")
    min_seed_size: int = param(4, min=0, help="seeds smaller than this many pixels are dropped",
                               advanced=True)
    # Smoothing the interior probability before seeding keeps textured or dim nuclei from
    # breaking into several seeds.
    smooth_sigma: float = param(1.0, min=0, max=20, help="smoothing (pixels) before seeding",
                                advanced=True)
    fill_holes: bool = param(True, help="fill holes inside objects", advanced=True)
    seeds: str = param("auto", choices=("auto", "mix", "distance", "interior"), advanced=True,
                       help="the surface whose cores seed one cell each and which they flood: "
                       "P(interior), the distance map, or their mean (mix; needs a model with "
                       "a distance output); auto: mix when the model has one, else interior")
    distance_threshold: float = param(0.5, min=0, max=1, min_exclusive=True, advanced=True,
                                      help="level of the distance (or mix) surface above "
                                      "which a core seeds one cell")
    # On a GPU the scikit-image watershed (about 1 s per 2048² plane and core) is what
    # limits a stack; postprocess_torch runs the same steps where the maps already are.
    post_device: str = param("auto", choices=("auto", "cpu", "device"), advanced=True,
                             help="where instances are post-processed: on the device that "
                             "predicted (torch) or on the CPU (scikit-image); auto: on a "
                             "CUDA or MPS device, else on the CPU")

    def __post_init__(self) -> None:
        check(self)


# The settings a model file may recommend (``ModelConfig.postprocess``, written when
# fine-tuning calibrates them on the held-out cells, see validation.calibrate): thresholds
# only, which move object size and splitting, the errors a few held-out cells can measure.
CALIBRATED = ("foreground_threshold", "seed_threshold", "distance_threshold")


def recommended(settings: Mapping[str, Any] | None, **given: Any) -> PostprocessConfig:
    """Post-processing for a model: its recommended ``settings`` (``ModelConfig.postprocess``)
    over the defaults, and the settings ``given`` explicitly over both."""
    return PostprocessConfig(**{**(settings or {}), **given})


def describe_recommended(settings: Mapping[str, float]) -> str:
    """"foreground 0.7, seed 0.4": recommended thresholds in words."""
    return ", ".join(f"{k.removesuffix('_threshold')} {v:g}" for k, v in settings.items())


def check_recommended(settings: Any) -> str | None:
    """Why ``settings`` is not a valid ``ModelConfig.postprocess`` (None when it is)."""
    if not isinstance(settings, dict):
        return f"postprocess must be a JSON object, got {type(settings).__name__}"
    for key, value in settings.items():
        if key not in CALIBRATED:
            return f"postprocess.{key} is not a setting a model may recommend ({CALIBRATED})"
        if type(value) not in (int, float):
            return f"postprocess.{key} = {value!r} must be a number"
    try:
        recommended(settings)
    except ValueError as exc:
        return str(exc)
    return None


N_CLASSES = 3  # background, interior, boundary; a 4th channel is the distance map
DISTANCE = N_CLASSES


def semantic_from_probs(probs: np.ndarray) -> np.ndarray:
    """Per-pixel most likely class (uint8); a distance channel, if any, is not a class."""
    return np.argmax(probs[:N_CLASSES], axis=0).astype(np.uint8)


def instances_from_probs(
    probs: np.ndarray, config: PostprocessConfig | None = None
) -> np.ndarray:
    """Seeded watershed: cell cores grow into the foreground (P(cell) above threshold).

    ``probs`` is (3, H, W) class probabilities, optionally followed by the distance map
    (4, H, W). Cores are where the (smoothed) seed surface (``config.seeds``) is high;
    touching cells stay apart because both fall to 0 where cells meet, and each core floods
    down that same surface. Returns int32 labels numbered 1..N.
    """
    c = config or PostprocessConfig()
    if probs.ndim != 3 or probs.shape[0] not in (N_CLASSES, N_CLASSES + 1):
        raise ValueError(
            f"expected (3, H, W) class probabilities or (4, H, W) with a distance map, got "
            f"shape {probs.shape}")
    has_distance = probs.shape[0] > DISTANCE
    seeds = c.seeds if c.seeds != "auto" else ("mix" if has_distance else "interior")
    if seeds != "interior" and not has_distance:
        raise ValueError(f"seeds={seeds!r} needs a model with a distance output; use 'auto'")
    if seeds == "interior":
        surface, level = probs[INTERIOR], c.seed_threshold
    else:
        # The distance map alone splits irregular cells (EM) into several cores; P(interior)
        # alone merges small touching nuclei; their mean did best on the validation sets
        # (scripts/tune_postprocess.py).
        surface = probs[DISTANCE] if seeds == "distance" else 0.5 * (probs[INTERIOR]
                                                                     + probs[DISTANCE])
        level = c.distance_threshold
    if c.smooth_sigma > 0:
        surface = ndi.gaussian_filter(surface, c.smooth_sigma)
    foreground = (1.0 - probs[BG]) > c.foreground_threshold
    seeds, _ = ndi.label((surface > level) & foreground)
    if c.min_seed_size > 1:
        seeds = remove_small(seeds, c.min_seed_size)
    labels = watershed(-surface, seeds, mask=foreground)
    if c.min_size > 1:
        labels = remove_small(labels, c.min_size)
    if c.fill_holes:
        labels = _fill_holes(labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero every object with fewer than ``min_size`` pixels."""
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return labels


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        filled = ndi.binary_fill_holes(labels[sl] == lab)
        region = out[sl]
        region[filled & (region == 0)] = lab
    return out


def labels_from_probs(probs: np.ndarray, config: PostprocessConfig | None = None) -> np.ndarray:
    """Dispatch on ``config.mode``."""
    c = config or PostprocessConfig()
    if c.mode == "semantic":
        return semantic_from_probs(probs)
    if c.mode == "instances":
        return instances_from_probs(probs, c)
    raise ValueError(f"postprocessing mode must be 'instances' or 'semantic', got {c.mode!r}")
