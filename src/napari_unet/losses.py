"""Loss for sparse, weighted per-pixel classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .targets import BG, BOUNDARY, IGNORE_INDEX, OUTSIDE_CELL


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Pixel-weighted cross-entropy; pixels with target ``-1`` (not annotated) add nothing.

    A pixel with target :data:`~napari_unet.targets.OUTSIDE_CELL` is known only not to be
    cell interior: its loss is ``-log(p_background + p_boundary)``.

    Normalised by the summed weight of annotated pixels, so the loss scale does not depend on
    how much of a patch happens to be annotated. A batch with no annotated pixel gives 0.
    """
    valid = target != IGNORE_INDEX
    logits = logits.float()
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    outside = target == OUTSIDE_CELL
    if bool(outside.any()):
        not_interior = torch.logsumexp(logits[:, [BG, BOUNDARY]], dim=1)
        ce = torch.where(outside, torch.logsumexp(logits, dim=1) - not_interior, ce)
    w = weight * valid
    return (ce * w).sum() / w.sum().clamp_min(1e-6)


def prior_consistency(
    logits: torch.Tensor, prior_logits: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """KL divergence from the starting model's predictions, on unannotated pixels only.

    Fine-tuning on a few painted cells says nothing about the unpainted rest of the image;
    this term keeps the model's answer there where it started (knowledge distillation), so a
    handful of labels corrects the model instead of overwriting what it knew. 0 when every
    pixel is annotated.
    """
    free = target == IGNORE_INDEX
    if not bool(free.any()):
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits.float(), dim=1)
    log_q = F.log_softmax(prior_logits.float(), dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return kl[free].mean()


def distance_loss(
    logit: torch.Tensor, distance: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy of the distance logit (B,h,w) against the soft [0, 1] distance
    map, on annotated pixels only (background pixels have distance 0)."""
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logit.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logit.float(), distance.float(), reduction="none")
    return bce[valid].mean()


def prior_distance_consistency(
    logit: torch.Tensor, prior_logit: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Squared difference of the distance maps from the starting model's, on unannotated
    pixels only (the distance-channel counterpart of :func:`prior_consistency`)."""
    free = target == IGNORE_INDEX
    if not bool(free.any()):
        return logit.sum() * 0.0
    diff = torch.sigmoid(logit.float()) - torch.sigmoid(prior_logit.float())
    return (diff[free] ** 2).mean()
