"""Loss for sparse, weighted per-pixel classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .targets import IGNORE_INDEX


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Pixel-weighted cross-entropy; pixels with target ``-1`` (not annotated) add nothing.

    Normalised by the summed weight of annotated pixels, so the loss scale does not depend on
    how much of a patch happens to be annotated. A batch with no annotated pixel gives 0.
    """
    valid = target != IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    w = weight * valid
    return (ce * w).sum() / w.sum().clamp_min(1e-6)
