"""Fine-tuning / training on sparse annotations, as a generator that yields progress.

``Trainer.run`` yields a :class:`TrainProgress` after every step and honours a cancel
callback. The model passed in is never modified: training works on a copy, and
``Trainer.model`` always holds the last good weights (a snapshot taken every few steps with
a finite loss), so stopping, a NaN loss or a crash never loses the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment import AugmentConfig, augment_batch
from .device import autocast, resolve_precision, select_device, to_device
from .losses import (
    distance_loss,
    prior_consistency,
    prior_distance_consistency,
    weighted_cross_entropy,
)
from .model import UNet, check_channels, save_model
from .normalize import check_image_dtype, normalize, resolve_rgb
from .params import check, check_multiple, param
from .rescale import rescale_pair, scale_for
from .targets import (
    FIRST_CELL,
    IGNORE_INDEX,
    check_annotation,
    check_label_dtype,
    distance_target,
    make_targets,
    painted_cells,
)
from .validation import (
    MIN_CALIBRATION_CELLS,
    Calibration,
    ValidationScore,
    Validator,
    split_validation,
    summary,
)


@dataclass
class TrainingPair:
    """One 2D image plane, (H, W) or (C, H, W), with its sparse annotation (H, W)."""

    image: np.ndarray
    annotation: np.ndarray
    complete: np.ndarray | None = None  # bool (H, W): unpainted pixels here are background
    name: str = "image"
    # bool (H, W): pixels the user corrected (correct.Edit.changed); their loss weight is
    # multiplied by TrainConfig.edited_weight, above the untouched predictions.
    edited: np.ndarray | None = None
    # bool (H, W): regions the user marked for validation only (e.g. drawn rectangles);
    # when any pair has one, they replace the automatic hold-out (TrainConfig.val_share).
    validation: np.ndarray | None = None
    sample_weight: float = 1.0  # relative share of training patches (e.g. per data set)
    scale: float = 1.0  # the factor the plane was resized by (at_model_size); 1: as painted


@dataclass
class TrainConfig:
    """Training settings; defaults suit fine-tuning the bundled model on a laptop CPU."""

    # Few, sure steps: on the few-label benchmark validation mostly kept step 25-125 of
    # ~800-step runs (benchmarks/README.md); 200 steps take a quarter of the time.
    steps: int = param(200, min=1, max=10**9, help="optimisation steps")
    lr: float = param(2e-4, min=0, max=1, min_exclusive=True, label="learning rate",
                      help="learning rate (AdamW)")
    batch_size: int = param(4, min=1, max=1024, label="batch", help="patches per step")
    tile: int = param(128, min=0, min_exclusive=True, multiple_of=8, label="patch size",
                      help="training patch size in pixels (a multiple of the model's divisor)")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    w0: float = param(10.0, min=0, max=100, advanced=True,
                      help="border weight w0 between touching cells (U-Net paper)")
    sigma: float = param(5.0, min=0, max=100, min_exclusive=True, advanced=True,
                         help="border weight width sigma in pixels (U-Net paper)")
    device: str = param("auto", help="auto, cuda, cuda:N, mps or cpu")
    precision: str = param("auto", choices=("auto", "fp32", "bf16", "fp16"), advanced=True,
                           help="compute precision (auto: bf16/fp16 where the device is fast "
                           "at it)")
    # Fine-tuning with a handful of small patches gives poor batch statistics; keeping the
    # pretrained BatchNorm statistics fixed is the usual remedy. From scratch: False.
    freeze_norm: bool = param(True, advanced=True,
                              help="keep the starting model's BatchNorm statistics")
    snapshot_every: int = param(10, min=1, advanced=True,
                                help="steps between snapshots of the last good model")
    checkpoint_path: str | None = param(None, optional=True, advanced=True,
                                        help="model file refreshed during training")
    checkpoint_every: int = param(100, min=1, advanced=True,
                                  help="steps between checkpoint writes")
    seed: int = param(0, min=0, advanced=True, help="random seed")
    cosine: bool = param(False, advanced=True,
                         help="cosine learning-rate decay (long runs); constant suits "
                         "fine-tuning")
    # Without the pull towards the starting model a few painted cells made the AP of the
    # bundled model swing by up to 0.8 between snapshots (benchmarks/README.md).
    keep_prior: float = param(1.0, min=0, max=100, advanced=True,
                              help="weight of the pull towards the starting model's "
                              "predictions on unannotated pixels (0 = off)")
    image_balance: float = param(1.0, min=0, max=1, advanced=True,
                                 help="images are sampled in proportion to (annotated pixels)"
                                 " ** this: 1 = every annotated pixel alike, 0 = every image "
                                 "alike")
    edited_weight: float = param(3.0, min=0, max=100, advanced=True,
                                 help="loss weight of the objects you corrected, relative to "
                                 "predictions you left as they were")
    # Scoring snapshots on held-out cells lets training keep the best one, and return the
    # starting model when fine-tuning made things worse.
    val_share: float = param(0.25, min=0, max=0.9, label="validation share",
                             help="share of the painted cells held out to score the starting "
                             "model and the snapshots (0 = off; needs 'validate from' painted "
                             "cells)")
    # Thresholds tuned on a few hundred validation images need not suit the user's cells
    # (dense tissue: objects 15-30 % too large), but 5 held-out cells rarely tell: of 5
    # few-label runs (20 painted cells) where calibration moved a threshold, all 5 lost
    # 0.018-0.038 AP on other images (benchmarks/README.md). Off unless asked for.
    calibrate: bool = param(False, advanced=True, label="calibrate thresholds",
                            help="after training, tune the post-processing thresholds on the "
                            "held-out cells and store them in the model (best with many "
                            "held-out cells)")
    validate_every: int = param(25, min=1, advanced=True,
                                help="steps between validation scores")
    val_min_cells: int = param(5, min=5, max=10**6, advanced=True,
                               label="validate from",
                               help="painted cells needed before some are held out")
    # A few painted cells cannot retrain the whole network without forgetting: adapting
    # only the decoder keeps the pretrained features and skips the encoder's backward pass.
    adapt: str = param("all", choices=("all", "decoder"), advanced=True,
                       help="layers fine-tuning changes: all, or the decoder only (the "
                       "encoder keeps the starting model's features)")
    # Interpolating between the starting and the fine-tuned weights (WiSE-FT, Wortsman et
    # al. 2022) keeps most of the gain on the painted cells and loses less elsewhere.
    average: float = param(0.5, min=0, max=1, min_exclusive=True, advanced=True,
                           label="weight share",
                           help="share of the fine-tuned weights in the model handed back "
                           "(the rest: the starting model's; 1 = the fine-tuned weights)")

    def __post_init__(self) -> None:
        check(self)


def train_config(from_scratch: bool = False, **kwargs: Any) -> TrainConfig:
    """Settings to fine-tune a model (default) or to train a new one from scratch, which has
    no batch statistics or predictions worth keeping."""
    if from_scratch:
        kwargs.setdefault("freeze_norm", False)
        kwargs.setdefault("keep_prior", 0.0)
        kwargs.setdefault("val_share", 0.0)
        kwargs.setdefault("average", 1.0)  # no starting weights worth blending in
    return TrainConfig(**kwargs)


@dataclass
class TrainProgress:
    """What a training step reports."""

    step: int
    total_steps: int
    loss: float
    loss_avg: float
    elapsed: float
    steps_per_s: float
    preview: np.ndarray | None = None
    validation: ValidationScore | None = None  # scored at this step
    reference: ValidationScore | None = None  # the starting model's score (a reference line)
    best_step: int | None = None  # the snapshot training would return now (0 = the start)
    message: str | None = None  # the closing sentence, on the last step

    @property
    def eta(self) -> float:
        """Seconds left at the current rate."""
        return (self.total_steps - self.step) / self.steps_per_s if self.steps_per_s else math.inf


@dataclass
class _Prepared:
    image: np.ndarray  # (C, H, W) float32, normalised, mirror-padded by the patch margin
    target: np.ndarray  # (H, W) int64, padded with IGNORE_INDEX
    weight: np.ndarray  # (H, W) float32, padded with 0
    distance: np.ndarray | None  # (H, W) float32 distance target, padded with 0, if wanted
    annotated: np.ndarray  # flat indices of annotated pixels in the padded frame
    sample_weight: float = 1.0


def _as_chw(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        return image
    raise ValueError(
        f"{name}: training takes 2D planes (H, W) or (C, H, W), got shape {image.shape}; "
        "pass the annotated slices of a stack one by one"
    )


def prepare_pairs(
    pairs: Sequence[TrainingPair],
    in_channels: int,
    crop: int,
    margin: int,
    percentiles: tuple[float, float],
    w0: float,
    sigma: float,
    distance: bool = False,
    edited_weight: float = 1.0,
) -> list[_Prepared]:
    """Validate, normalise, build targets and mirror-pad every pair for patch sampling."""
    if not pairs:
        raise ValueError("no training data: give at least one image with its annotation")
    prepared, n_cells = [], 0
    for pair in pairs:
        image = _as_chw(pair.image, pair.name)
        check_image_dtype(image.dtype, f"image {pair.name}")
        check_annotation(pair.annotation, image.shape[1:])
        for what, mask in (("fully-annotated", pair.complete), ("edited", pair.edited)):
            if mask is not None and mask.shape != image.shape[1:]:
                raise ValueError(
                    f"{pair.name}: {what} mask shape {mask.shape} does not match image shape "
                    f"{image.shape[1:]}"
                )
        if image.shape[0] != in_channels:
            raise ValueError(
                f"{pair.name}: the model expects {in_channels} channel(s), the image has "
                f"{image.shape[0]} (shape {image.shape})"
            )
        n_cells += int((pair.annotation >= FIRST_CELL).any())
        target, weight = make_targets(pair.annotation, pair.complete, w0=w0, sigma=sigma)
        if pair.edited is not None and edited_weight != 1.0:
            weight = np.where(np.asarray(pair.edited, bool), weight * edited_weight, weight)
        if not (target != IGNORE_INDEX).any():
            continue
        dist = distance_target(painted_cells(pair.annotation)) if distance else None
        norm = normalize(image, percentiles)
        h, w = target.shape
        # Enough padding that a crop (tile + 2 margins) centred anywhere fits.
        py, px = max(margin, crop - h, 0) + margin, max(margin, crop - w, 0) + margin
        norm = np.pad(norm, ((0, 0), (py, py), (px, px)), mode="reflect")
        target = np.pad(target, ((py, py), (px, px)), constant_values=IGNORE_INDEX)
        weight = np.pad(weight, ((py, py), (px, px)))
        if dist is not None:
            dist = np.pad(dist, ((py, py), (px, px)))
        prepared.append(_Prepared(norm, target, weight, dist, np.flatnonzero(target >= 0),
                                  pair.sample_weight))
    if n_cells == 0:
        raise ValueError(
            "the annotation has no cells: paint at least one cell with a label >= 2 "
            "(0 = not annotated, 1 = background)"
        )
    return prepared


def pairs_from_arrays(
    image: np.ndarray,
    annotation: np.ndarray,
    *,
    channel_axis: int | None = None,
    complete: np.ndarray | None = None,
    name: str = "image",
    rgb: str | None = None,
    rgb_option: str = "rgb={!r}",
    photometric_rgb: bool = False,
    edited: np.ndarray | None = None,
    validation: np.ndarray | None = None,
) -> list[TrainingPair]:
    """Split an N-D image + annotation into the 2D planes that carry any annotation.

    ``complete``, ``edited`` and ``validation`` (same shape as the annotation, bool) mark
    fully annotated, user-corrected and validation-only pixels. ``rgb``: how a colour image
    is read (see :func:`napari_unet.normalize.resolve_rgb`; None refuses one with a message
    naming the choices, spelled as ``rgb_option``; ``photometric_rgb``: the file says it is a
    colour image).
    """
    from .segment import check_image, label_key, output_shape, plane_indices, read_plane

    check_image_dtype(image.dtype, f"image {name}")
    image = resolve_rgb(image, channel_axis=channel_axis, rgb=rgb, name=name,
                        option=rgb_option, photometric_rgb=photometric_rgb)
    shape = tuple(image.shape)
    check_image(shape, channel_axis, name)
    if channel_axis is not None:
        channel_axis %= len(shape)
    expected = output_shape(shape, channel_axis)
    check_label_dtype(annotation.dtype)
    if tuple(annotation.shape) != expected:
        raise ValueError(
            f"{name}: annotation shape {tuple(annotation.shape)} does not match the image "
            f"shape {expected} (without its channel axis); annotate the image itself"
        )
    pairs = []
    for key in plane_indices(shape, channel_axis):
        out_key = label_key(key, channel_axis)
        ann = np.asarray(annotation[out_key])
        done = None if complete is None else np.asarray(complete[out_key], bool)
        if not ann.any() and (done is None or not done.any()):
            continue
        plane = read_plane(image, key, channel_axis)
        where = [k for k in out_key if isinstance(k, int)]
        fixed, val = (None if m is None else np.asarray(m[out_key], bool)
                      for m in (edited, validation))
        pairs.append(TrainingPair(plane, ann, done, f"{name}{where}" if where else name,
                                  edited=fixed, validation=val))
    return pairs


class PatchSampler:
    """Random patches centred on annotated pixels, with context for elastic deformation."""

    def __init__(self, data: list[_Prepared], size: int, rng: np.random.Generator,
                 balance: float = 1.0) -> None:
        self.data, self.size, self.rng = data, size, rng
        # Sample images in proportion to how much of them is annotated (balance 1), or
        # flatter: many small images should not be drowned by a few large ones.
        counts = np.array([len(d.annotated) ** balance * d.sample_weight for d in data],
                          np.float64)
        self.p = counts / counts.sum()

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ims, tgs, wts = [], [], []
        s = self.size
        for _ in range(batch):
            d = self.data[self.rng.choice(len(self.data), p=self.p)]
            h, w = d.target.shape
            cy, cx = divmod(int(self.rng.choice(d.annotated)), w)
            y0 = int(np.clip(cy - s // 2 + self.rng.integers(-s // 4, s // 4 + 1), 0, h - s))
            x0 = int(np.clip(cx - s // 2 + self.rng.integers(-s // 4, s // 4 + 1), 0, w - s))
            ims.append(d.image[:, y0 : y0 + s, x0 : x0 + s])
            tgs.append(d.target[y0 : y0 + s, x0 : x0 + s])
            wt = d.weight[y0 : y0 + s, x0 : x0 + s]
            if d.distance is not None:
                # Loss weight and distance target travel together through augmentation.
                wt = np.stack([wt, d.distance[y0 : y0 + s, x0 : x0 + s]])
            wts.append(wt)
        return np.stack(ims), np.stack(tgs), np.stack(wts)


def _set_norm_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """Trains a copy of ``model`` on sparse annotations; see the module docstring."""

    def __init__(self, model: UNet, pairs: Sequence[TrainingPair], config: TrainConfig) -> None:
        if pairs:
            check_channels(model.config.in_channels,
                           _as_chw(pairs[0].image, pairs[0].name).shape[0], pairs[0].name)
        # Checked here, not in the first step: a raw torch size mismatch says nothing useful.
        check_multiple("TrainConfig", "tile", config.tile, model.config.divisor,
                       f"a model of depth {model.config.depth}")
        self.config = config
        self.device = select_device(config.device)
        self.amp = resolve_precision(self.device, config.precision)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        margin = config.augment.margin
        # Training sees the objects at the size inference will (rescale.py).
        pairs, self.fit_diameter = at_model_size(model, pairs, config.device)
        # Validation pixels leave the training annotation before targets are built.
        train_pairs, held, self.validation_note = split_validation(pairs, config.val_share,
                                                                   config.seed,
                                                                   config.val_min_cells)
        if shrunk := [f"{p.name} to {p.scale:.2f}" for p in pairs if p.scale != 1.0]:
            self.validation_note += (f"; objects wider than the model's "
                                     f"{model.config.object_diameter:g} px: trains on "
                                     f"{', '.join(shrunk)} of the size")
        data = prepare_pairs(train_pairs, model.config.in_channels, config.tile + 2 * margin,
                             margin, model.config.norm_percentiles, config.w0, config.sigma,
                             distance=model.config.distance,
                             edited_weight=config.edited_weight)
        self.sampler = PatchSampler(data, config.tile + 2 * margin, self.rng,
                                    config.image_balance)
        self.net = to_device(copy.deepcopy(model), self.device)
        # Snapshots keep the measure their images were resized by (rescale.py).
        self.net.config.fit_diameter = self.fit_diameter
        self.prior = to_device(copy.deepcopy(model), self.device).eval() \
            if config.keep_prior > 0 else None
        self.model: UNet = copy.deepcopy(self.net).cpu().eval()  # last good weights
        self.step = 0
        self.good_step = 0  # the step self.model holds
        self.losses: list[float] = []
        self.validator = Validator.from_pairs(pairs, held, model.config.norm_percentiles,
                                              self.device) if held else None
        self.history: list[ValidationScore] = []  # [0]: the starting model
        self.best: UNet = copy.deepcopy(model).cpu().eval()  # what run() returns
        self.best_score: ValidationScore | None = None
        self.message = self.validation_note
        if config.adapt == "decoder":
            for p in self.net.down.parameters():
                p.requires_grad_(False)
        # Starting weights for the interpolation in _snapshot (CPU, float like the model).
        self.start_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} \
            if config.average < 1.0 else None
        self._trained: UNet | None = None  # the snapshot unblended, for validation
        self.best_blended = False  # whether self.best is a blend with the starting weights
        self.calibration: Calibration | None = None  # set by run() when it calibrates
        self.optimizer = torch.optim.AdamW(
            [p for p in self.net.parameters() if p.requires_grad], lr=config.lr,
            weight_decay=1e-5)

    def _snapshot(self) -> None:
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        if self.start_state is not None:
            a = self.config.average
            state = {k: torch.lerp(self.start_state[k], v, a) if v.is_floating_point() else v
                     for k, v in state.items()}
        self.model.load_state_dict(state)
        self.model.eval()
        self.good_step = self.step

    def save_state(self, path: str | Path) -> None:
        """Everything needed to resume this run: weights, optimiser, step, loss history."""
        state = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": torch.tensor(self.step), "losses": torch.tensor(self.losses)}
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_state(self, path: str | Path) -> None:
        """Resume from :meth:`save_state` (tensors only: ``weights_only`` never unpickles
        code)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        # A resumed run must not replay the patches it already saw.
        self.rng = self.sampler.rng = np.random.default_rng([self.config.seed, self.step])
        self.generator.manual_seed(self.config.seed * 1_000_003 + self.step)
        self._snapshot()

    def _checkpoint(self) -> None:
        if self.config.checkpoint_path:
            save_model(self.selected, Path(self.config.checkpoint_path), overwrite=True)

    @property
    def selected(self) -> UNet:
        """The model training hands back: the best by validation, else the last good one."""
        return self.best if self.validator is not None else self.model

    def _validate(self) -> ValidationScore:
        """Score the last good snapshot; keep it when it beats the best so far.

        With ``average`` < 1 the snapshot is scored blended with the starting weights, and,
        while the blend does not beat the starting model, also as trained: blending guards a
        few labels against forgetting, but where the model must change a lot (e.g. learn to
        split cells it merged) half-way can be worse than either end.
        """
        assert self.validator is not None
        candidate = self.model
        score = self.validator.score(candidate, self.step)
        n = self.validator.n_cells
        start = self.history[0] if self.history else None
        if self.start_state is not None and start is not None and not score.beats(start, n):
            if self._trained is None:
                self._trained = copy.deepcopy(self.model)
            self._trained.load_state_dict({k: v.detach().cpu() for k, v in
                                           self.net.state_dict().items()})
            self._trained.eval()
            trained = self.validator.score(self._trained, self.step)
            seconds = score.seconds + trained.seconds
            # Only then, and only on a higher AP (a pixel-IoU edge on a few cells is noise):
            # where the blend beats the start, the weights as trained chosen on one more
            # held-out cell lost up to 0.05 AP on other dense-tissue images (16 runs of 20
            # painted cells; benchmarks/README.md).
            if trained.ap > start.ap + 1e-9:
                candidate, score = self._trained, trained
            score = dataclasses.replace(score, seconds=seconds)
        self.history.append(score)
        # The start is replaced only by a snapshot that beats it; a snapshot by any later
        # one that scores no worse: where a few held-out cells cannot tell snapshots apart,
        # the one trained longer on the painted cells is the better bet (few-label
        # benchmark: keeping the first of equals kept step 50 of NIH3T3 at 0.812 AP on the
        # evaluation images where steps 75-200 scored 0.861).
        best = self.best_score
        if best is None or score.beats(best, n) or (best.step > 0 and not best.beats(score, n)):
            self.best_score = score
            if self.step > 0:
                self.best.load_state_dict(candidate.state_dict())
                self.best.config.fit_diameter = self.fit_diameter
                self.best_blended = candidate is self.model and self.start_state is not None
        self.message = summary(self.history, self.best_score, self.validator.n_cells)
        if self.best_blended and self.best_score.step > 0:
            self.message += " (blended half-way with the starting weights)" \
                if self.config.average == 0.5 else \
                f" (a {self.config.average:g} share of it, blended with the starting weights)"
        return score

    def _calibrate(self) -> None:
        """Tune the returned snapshot's post-processing thresholds on the held-out cells.

        Only a fine-tuned snapshot is calibrated: when the starting model is kept, it is
        kept as it was."""
        if (self.validator is None or not self.config.calibrate or self.best_score is None
                or self.best_score.step == 0 or self.validator.n_cells < MIN_CALIBRATION_CELLS):
            return
        self.calibration = self.validator.calibrate(self.best)
        self.best.config.postprocess = dict(self.calibration.settings)
        self.message += "; " + self.calibration.sentence()

    def _save_after_failure(self) -> str:
        """Write the last good model where asked after a stop or failure; says where it is."""
        if not self.config.checkpoint_path:
            return f"the last good model (step {self.good_step}) is in Trainer.model"
        try:
            self._checkpoint()
        except OSError as exc:  # e.g. the disk is full: report both problems, keep the first
            return (f"the last good model (step {self.good_step}) could not be written to "
                    f"{self.config.checkpoint_path}: {exc}")
        return f"the last good model (step {self.good_step}) was written to " \
               f"{self.config.checkpoint_path}"

    def train_step(self) -> float:
        """One optimisation step on a freshly sampled, augmented batch; returns the loss."""
        c = self.config
        image, target, weight = (torch.from_numpy(a).to(self.device)
                                 for a in self.sampler.sample(c.batch_size))
        # Augment where the model runs: on a GPU this costs next to nothing.
        image, target, weight = augment_batch(image, target, weight, c.augment, c.tile,
                                              self.generator)
        image = image.contiguous(memory_format=torch.channels_last)
        self.net.train()
        if c.freeze_norm:
            _set_norm_eval(self.net)
        # A short warm-up keeps the first steps on a new domain from wrecking pretrained weights.
        scale = min(1.0, (self.step + 1) / 20)
        if c.cosine:
            scale *= 0.5 * (1 + math.cos(math.pi * self.step / c.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * scale
        with autocast(self.device, self.amp):
            out = self.net(image)
        k = self.net.config.n_classes
        distance = weight[:, 1] if weight.ndim == 4 else None
        if distance is not None:
            weight = weight[:, 0]
        loss = weighted_cross_entropy(out[:, :k], target, weight)
        if distance is not None:
            loss = loss + distance_loss(out[:, k], distance, target)
        if self.prior is not None:
            with torch.no_grad(), autocast(self.device, self.amp):
                prior = self.prior(image)
            loss = loss + c.keep_prior * prior_consistency(out[:, :k], prior[:, :k], target)
            if distance is not None:
                loss = loss + c.keep_prior * prior_distance_consistency(out[:, k], prior[:, k],
                                                                       target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(
        self,
        cancel: Callable[[], bool] | None = None,
        preview: Callable[[UNet], np.ndarray] | None = None,
        preview_every_s: float = 3.0,
    ) -> Generator[TrainProgress, None, UNet]:
        """Train for the configured steps; yields progress, returns the selected model.

        With validation (:mod:`validation`) the starting model is scored first, then the
        snapshot every ``validate_every`` steps and at the end; the best one is returned (the
        starting model when none beats it) and ``self.message`` says so in one sentence.
        Without it the last good model is returned.

        ``preview``, if given, is called with the last good model every ``preview_every_s``
        seconds and its result travels in ``TrainProgress.preview``.
        """
        c = self.config
        start = time.perf_counter()
        last_preview = -math.inf
        if self.validator is not None and not self.history:
            self._validate()  # the reference: the starting model, step 0
        try:
            while self.step < c.steps:
                if cancel is not None and cancel():
                    break
                loss = self.train_step()
                if not math.isfinite(loss):
                    where = self._save_after_failure()
                    raise FloatingPointError(
                        f"training diverged at step {self.step + 1} (loss {loss}); {where}; "
                        "lower the learning rate (--lr) and train again"
                    )
                self.step += 1
                self.losses.append(loss)
                validate = self.validator is not None and (
                    self.step % c.validate_every == 0 or self.step == c.steps)
                if validate or self.step % c.snapshot_every == 0 or self.step == c.steps:
                    self._snapshot()
                score = self._validate() if validate else None
                if c.checkpoint_path and self.step % c.checkpoint_every == 0:
                    self._checkpoint()
                elapsed = time.perf_counter() - start
                progress = TrainProgress(self.step, c.steps, loss,
                                         float(np.mean(self.losses[-20:])), elapsed,
                                         self.step / elapsed)
                if self.validator is not None:
                    progress.validation, progress.reference = score, self.history[0]
                    progress.best_step = self.best_score.step
                if self.step == c.steps:
                    progress.message = self.message
                if preview is not None and elapsed - last_preview >= preview_every_s:
                    last_preview = elapsed
                    progress.preview = preview(self.model)
                yield progress
            # Stopped or finished with a finite last loss: the current weights are good.
            self._snapshot()
            if self.validator is not None and self.history[-1].step != self.step:
                self._validate()  # stopped between scores: the last weights get their say
            self._calibrate()
        except FloatingPointError:
            raise  # already saved, and its message says where
        except (Exception, KeyboardInterrupt, GeneratorExit) as exc:
            # A crash, Ctrl-C or the consumer closing us: keep the last good model on disk.
            where = self._save_after_failure()
            if not isinstance(exc, GeneratorExit):
                exc.add_note(where)
            raise
        self._checkpoint()
        return self.selected


def at_model_size(model: UNet, pairs: Sequence[TrainingPair], device: str = "cpu"
                  ) -> tuple[list[TrainingPair], float | None]:
    """The pairs resized for ``model`` (``scale`` set), all by the median object diameter
    measured in them, which is returned (None: the model does not resize)."""
    if not model.config.object_diameter:
        return list(pairs), None
    images = [_as_chw(p.image, p.name) for p in pairs]
    fit = model.config.fit_diameter  # fine-tuning a fine-tuned model: its measure stays
    if fit is None:
        from .segment import InferenceConfig, Predictor

        predictor = Predictor(model, InferenceConfig(device=device))
        for p, image in zip(pairs, images, strict=True):
            check_channels(model.config.in_channels, image.shape[0], p.name)
        known = [d for d in map(predictor.measure_diameter, images) if d is not None]
        fit = float(np.median(known)) if known else None
    scales = [scale_for(fit, model.config.object_diameter, image.shape) for image in images]
    return [dataclasses.replace(rescale_pair(p, scale), scale=scale)
            for p, scale in zip(pairs, scales, strict=True)], fit


def train(
    model: UNet,
    pairs: Sequence[TrainingPair],
    config: TrainConfig | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Generator[TrainProgress, None, UNet]:
    """Convenience wrapper: ``model = yield from train(...)``."""
    return (yield from Trainer(model, pairs, config or TrainConfig()).run(cancel))
