"""Validation while fine-tuning: hold out part of the annotation and score snapshots on it.

:func:`split_validation` takes a share of the painted cells (each with the painted
background around it) out of the training annotation, or the regions the user marked for
validation (``TrainingPair.validation``). :class:`Validator` segments small crops around the
held-out pixels with a snapshot and scores them with :mod:`evaluate`: instance AP@0.5 and
foreground pixel IoU, pooled over the crops. Only the annotated pixels count: a predicted
object is scored when most of it lies on held-out pixels, so unannotated cells around the
held-out ones are neither false positives nor misses.

The trainer scores the starting model first (the reference), keeps the best snapshot and
returns the starting model when no snapshot beats it (see ``Trainer.run``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage as ndi

from .evaluate import match_instances
from .normalize import normalize
from .postprocess import PostprocessConfig, describe_recommended, labels_from_probs, recommended
from .targets import BACKGROUND, FIRST_CELL, UNLABELED

if TYPE_CHECKING:
    from .model import UNet
    from .train import TrainingPair

# Fewer painted cells than this leave too few to train on: validation is off below it.
# From 5 cells on 2 are held out: a coarse score, but enough to see a snapshot get worse
# than the start on cells it never saw, and to keep the start then (few-label benchmark:
# with 5 cells and no validation, fine-tuning lost up to 0.16 AP on other images).
MIN_CELLS = 5
MIN_VAL_CELLS = 2  # held out at the least
MIN_TRAIN_CELLS = 3  # kept for training at the least
RING = 6  # px of painted background around a held-out cell that go with it
CONTEXT = 32  # px of image around held-out pixels fed to the model (its receptive field)
# Foreground thresholds tried when calibrating post-processing on the held-out cells, and
# the gain in matched quality a new one needs over the model's current settings (a few
# cells are a noisy measure: without a margin the thresholds would follow the noise).
CALIBRATION_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
CALIBRATION_MARGIN = 0.01
MIN_CALIBRATION_CELLS = 4
# Below this many held-out cells a tie in AP is not broken by pixel IoU: on two or three
# cells a fine-tuned snapshot's IoU rises almost always (it learns the painted shapes) and
# says nothing about other images (few-label benchmark, k = 5: the snapshots kept on an IoU
# edge alone gained 0 / 0 / -0.023 / -0.029 AP on the evaluation images).
MIN_TIE_CELLS = 4


@dataclass
class ValidationScore:
    """The held-out scores of one model."""

    step: int  # training step of the snapshot (0 = the starting model)
    ap: float  # instance AP@0.5 = tp / (tp + fp + fn), pooled over the held-out crops
    pixel_iou: float  # foreground IoU on the held-out pixels
    seconds: float  # time this scoring took

    def beats(self, other: ValidationScore, n_cells: int, iou_margin: float = 0.005) -> bool:
        """Higher AP, or the same AP and a clearly higher pixel IoU on ``n_cells`` held-out
        cells (at least :data:`MIN_TIE_CELLS`)."""
        if self.ap > other.ap + 1e-9:
            return True
        return (n_cells >= MIN_TIE_CELLS and abs(self.ap - other.ap) <= 1e-9
                and self.pixel_iou > other.pixel_iou + iou_margin)


@dataclass
class _Crop:
    image: np.ndarray  # (C, h, w) float32, normalised like training
    gt: np.ndarray  # (h, w) int32 instances of the held-out cells, 0 elsewhere
    valid: np.ndarray  # (h, w) bool: the held-out pixels (cells + painted background)


def _cells(annotation: np.ndarray) -> np.ndarray:
    ids = np.unique(annotation)
    return ids[ids >= FIRST_CELL]


def split_validation(
    pairs: Sequence[TrainingPair], share: float, seed: int = 0, min_cells: int = MIN_CELLS
) -> tuple[list[TrainingPair], list[tuple[int, np.ndarray]], str]:
    """Take validation pixels out of the training pairs.

    Returns the training pairs (held-out pixels unannotated), ``(pair index, held-out mask)``
    per pair with held-out pixels, and a sentence saying what was held out (or why
    nothing was). User-marked regions (``pair.validation``) win over ``share``.
    """
    marked = any(getattr(p, "validation", None) is not None for p in pairs)
    held_masks: list[np.ndarray | None] = [None] * len(pairs)
    if marked:
        for i, p in enumerate(pairs):
            if p.validation is None:
                continue
            ann = np.asarray(p.annotation)
            region = np.asarray(p.validation, bool)
            if region.shape != ann.shape:
                raise ValueError(f"{p.name}: validation mask shape {region.shape} does not "
                                 f"match the annotation {ann.shape}")
            cut = _cells(ann[region])
            region = region | np.isin(ann, cut)  # whole cells, never half of one
            painted = ann > UNLABELED
            if p.complete is not None:
                painted |= np.asarray(p.complete, bool)
            held_masks[i] = region & painted
        n_held = sum(len(_cells(np.asarray(p.annotation)[m])) for p, m in
                     zip(pairs, held_masks, strict=True) if m is not None)
        note = f"validating on {n_held} cell(s) in the marked validation regions"
        if n_held == 0:
            raise ValueError("the validation regions hold no painted cell: mark regions "
                             "with cells, or leave them out to hold out cells automatically")
    else:
        if share <= 0:
            return list(pairs), [], "validation off"
        # Cells the user corrected and cells left as predicted are held out in the same
        # share: after "correct from segmentation" the untouched cells are the starting
        # model's own output (it scores perfectly there), the corrected ones are where it
        # was wrong. Validation then asks: better on corrections, no worse elsewhere.
        strata: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
        for i, p in enumerate(pairs):
            ann = np.asarray(p.annotation)
            touched = set() if p.edited is None else set(
                _cells(ann[np.asarray(p.edited, bool)]).tolist())
            for c in _cells(ann).tolist():
                strata[c in touched].append((i, c))
        n_cells = sum(len(v) for v in strata.values())
        rng = np.random.default_rng(seed)
        if n_cells < max(min_cells, MIN_VAL_CELLS + MIN_TRAIN_CELLS):
            return list(pairs), [], (f"validation off: {n_cells} painted cell(s) are too "
                                     f"few to hold some out (paint at least {min_cells})")
        chosen = [cells[j] for cells in strata.values()
                  for j in rng.permutation(len(cells))[:int(round(share * len(cells)))]]
        # Rounding per stratum may leave fewer than the minimum: top up from the rest.
        rest = [c for cells in strata.values() for c in cells if c not in chosen]
        for j in rng.permutation(len(rest))[:max(MIN_VAL_CELLS - len(chosen), 0)]:
            chosen.append(rest[j])
        chosen = chosen[:n_cells - MIN_TRAIN_CELLS]
        n_held, n_deleted = len(chosen), 0
        for i, p in enumerate(pairs):
            ids = [c for k, c in chosen if k == i]
            ann = np.asarray(p.annotation)
            held = np.isin(ann, ids)
            background = ann == BACKGROUND
            if p.complete is not None:
                background |= np.asarray(p.complete, bool) & (ann == UNLABELED)
            grown = ndi.binary_dilation(held, np.ones((3, 3), bool), iterations=RING)
            mask = held | (grown & background)
            if p.edited is not None:
                # Deleted objects (background the user painted over a false positive) are
                # held out in the same share: a snapshot that predicts them again loses AP.
                gone, n = ndi.label(np.asarray(p.edited, bool) & (ann == BACKGROUND))
                pick = rng.permutation(n)[:int(round(share * n))] + 1
                mask |= np.isin(gone, pick)
                n_deleted += len(pick)
            if mask.any():
                held_masks[i] = mask
        n_edited = sum(1 for i, c in chosen if (i, c) in set(strata[True]))
        note = (f"holding out {n_held} of {n_cells} painted cells (with the background "
                "around them) to score each snapshot"
                + (f"; {n_edited} of them corrected by you" if strata[True] else "")
                + (f"; and {n_deleted} deleted object(s)" if n_deleted else ""))
    train_pairs, held = [], []
    for i, (p, m) in enumerate(zip(pairs, held_masks, strict=True)):
        if m is None or not m.any():
            train_pairs.append(p)
            continue
        ann = np.array(p.annotation, copy=True)
        ann[m] = UNLABELED
        complete = None if p.complete is None else np.asarray(p.complete, bool) & ~m
        train_pairs.append(dataclasses.replace(p, annotation=ann, complete=complete))
        held.append((i, m))
    return train_pairs, held, note


class Validator:
    """Scores models on held-out pixels; build with :meth:`from_pairs`."""

    def __init__(self, crops: list[_Crop], device: torch.device | str = "cpu") -> None:
        self.crops, self.device = crops, device
        self.n_cells = sum(int(len(np.unique(c.gt)) - 1) for c in crops)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[TrainingPair],
        held: list[tuple[int, np.ndarray]],
        percentiles: tuple[float, float],
        device: torch.device | str = "cpu",
        context: int = CONTEXT,
    ) -> Validator:
        """Crops of the (whole-image normalised) planes around each held-out region."""
        crops = []
        for i, mask in held:
            p = pairs[i]
            image = np.asarray(p.image)
            image = image[None] if image.ndim == 2 else image
            # Normalise the whole plane, as training does, before cropping.
            norm = normalize(image, percentiles)
            ann = np.asarray(p.annotation)
            gt_all = np.where(mask & (ann >= FIRST_CELL), ann, 0)  # cells keep their ids
            h, w = ann.shape
            boxes = np.zeros((h, w), bool)
            for sl in ndi.find_objects(ndi.label(mask)[0]):
                boxes[max(sl[0].start - context, 0) : sl[0].stop + context,
                      max(sl[1].start - context, 0) : sl[1].stop + context] = True
            for sl in ndi.find_objects(ndi.label(boxes)[0]):
                crops.append(_Crop(norm[(slice(None), *sl)], gt_all[sl].astype(np.int32),
                                   mask[sl]))
        return cls(crops, device)

    @torch.inference_mode()
    def maps(self, model: UNet) -> list[np.ndarray]:
        """The model's (K, h, w) maps of every crop (inference as in Segment)."""
        from .segment import InferenceConfig, Predictor

        predictor = Predictor(model, InferenceConfig(device=str(self.device)))
        div = model.config.divisor
        out = []
        for crop in self.crops:
            _, h, w = crop.image.shape
            ph, pw = -h % div, -w % div
            x = np.pad(crop.image, ((0, 0), (0, ph), (0, pw)),
                       mode="reflect" if min(h, w) > max(ph, pw) else "symmetric")
            probs = predictor(torch.from_numpy(np.ascontiguousarray(x))[None])
            out.append(probs[0, :, :h, :w].float().cpu().numpy())
        return out

    def _tally(self, maps: list[np.ndarray], post: PostprocessConfig) -> _Tally:
        t = _Tally()
        for crop, probs in zip(self.crops, maps, strict=True):
            pred = _objects_on(labels_from_probs(probs, post), crop.valid)
            m = match_instances(pred, crop.gt)
            t.tp, t.fp, t.fn = t.tp + m["tp"], t.fp + m["fp"], t.fn + m["fn"]
            t.matched_iou += m["mean_matched_iou"] * m["tp"]
            p, g = (pred > 0) & crop.valid, (crop.gt > 0) & crop.valid
            t.inter += int(np.count_nonzero(p & g))
            t.union += int(np.count_nonzero(p | g))
        return t

    def score(self, model: UNet, step: int) -> ValidationScore:
        """Segment every crop with ``model`` (post-processing as in Segment) and score it."""
        t = time.perf_counter()
        tally = self._tally(self.maps(model), recommended(model.config.postprocess))
        return ValidationScore(step, tally.ap, tally.pixel_iou, time.perf_counter() - t)

    def calibrate(self, model: UNet, margin: float = CALIBRATION_MARGIN) -> Calibration:
        """The post-processing thresholds that segment the held-out cells best.

        A grid over the foreground threshold, scored by matched quality (see
        :class:`Calibration`): finer than AP, which a handful of cells saturates, and
        sensitive to object size. The seed threshold is left alone: it decides splits and
        merges, and held-out cells among unpainted neighbours cannot judge those (a cell
        merged with an unpainted neighbour is dropped as not on held-out pixels; few-label
        benchmark, dense tissue: a seed threshold of 0.7 chosen on 5 cells cost 0.04 AP).
        The model's current settings are kept unless another point beats them by
        ``margin`` without losing AP; among equals the point nearest to them wins.
        """
        t = time.perf_counter()
        current = recommended(model.config.postprocess)
        maps = self.maps(model)
        base = self._tally(maps, current)
        grid = [{"foreground_threshold": fg} for fg in CALIBRATION_GRID]
        scored = [({}, base)] + [(p, self._tally(maps, dataclasses.replace(current, **p)))
                                 for p in grid]

        def rank(candidate: tuple[dict[str, float], _Tally]) -> tuple[float, float]:
            point, tally = candidate  # the highest quality, then the nearest to now
            moved = sum(abs(v - getattr(current, k)) for k, v in point.items())
            return round(tally.quality, 9), -moved

        best, best_tally = max((c for c in scored if c[1].ap >= base.ap - 1e-9), key=rank)
        if best_tally.quality < base.quality + margin:
            best, best_tally = {}, base
        settings = {**model.config.postprocess, **best}
        return Calibration(settings, bool(best), base.quality, best_tally.quality, base.ap,
                           best_tally.ap, self.n_cells, time.perf_counter() - t)


@dataclass
class _Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    matched_iou: float = 0.0  # sum over matched pairs
    inter: int = 0
    union: int = 0

    @property
    def ap(self) -> float:
        n = self.tp + self.fp + self.fn
        return self.tp / n if n else 1.0

    @property
    def quality(self) -> float:
        n = self.tp + self.fp + self.fn
        return self.matched_iou / n if n else 1.0

    @property
    def pixel_iou(self) -> float:
        return self.inter / self.union if self.union else 1.0


@dataclass
class Calibration:
    """What :meth:`Validator.calibrate` found.

    Quality = (sum of the IoUs of matched pairs) / (tp + fp + fn): AP@0.5 with each match
    counted by how well it fits, so a threshold that makes every cell 20 % too large
    scores lower even when all still match.
    """

    settings: dict[str, float]  # the model's ``postprocess`` recommendation from now on
    changed: bool  # whether calibration moved a threshold
    quality_before: float
    quality_after: float
    ap_before: float
    ap_after: float
    n_cells: int
    seconds: float

    def sentence(self) -> str:
        """How post-processing was calibrated, for the closing message."""
        if not self.changed:
            return (f"post-processing thresholds kept (no setting fit the {self.n_cells} "
                    f"held-out cell(s) better by {CALIBRATION_MARGIN:g})")
        return (f"post-processing calibrated on them: {describe_recommended(self.settings)} "
                f"(matched quality "
                f"{self.quality_before:.2f} → {self.quality_after:.2f}, AP "
                f"{self.ap_before:.2f} → {self.ap_after:.2f})")


def _objects_on(pred: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Keep the predicted objects that lie mostly on held-out (annotated) pixels."""
    if not pred.any():
        return pred
    n = int(pred.max()) + 1
    total = np.bincount(pred.ravel(), minlength=n)
    inside = np.bincount(pred[valid], minlength=n)
    keep = inside * 2 >= total
    keep[0] = False
    return np.where(keep[pred], pred, 0)


def summary(history: Sequence[ValidationScore], best: ValidationScore, n_cells: int) -> str:
    """The one sentence that ends a validated training run (``history[0]``: the start)."""
    reference, trained = history[0], history[1:]
    if best.step == 0:
        if not trained:
            return (f"validation AP {reference.ap:.2f} on {n_cells} held-out cell(s); no "
                    "snapshot was scored; keeping the starting model")
        top = max(trained, key=lambda s: (s.ap, s.pixel_iou))
        return (f"validation AP {reference.ap:.2f} → {top.ap:.2f} at best (step {top.step}) "
                f"on {n_cells} held-out cell(s): fine-tuning did not beat the starting "
                "model; keeping the starting model")
    iou = (f", pixel IoU {reference.pixel_iou:.3f} → {best.pixel_iou:.3f}"
           if abs(best.ap - reference.ap) <= 1e-9 else "")  # the IoU decided it
    return (f"validation AP {reference.ap:.2f} → {best.ap:.2f} ({best.ap - reference.ap:+.2f})"
            f"{iou} on {n_cells} held-out cell(s); keeping step {best.step}")
