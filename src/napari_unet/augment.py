"""Training augmentation on batches of tensors, on the training device.

Elastic deformation follows the U-Net paper: random displacement vectors on a coarse grid
(Gaussian, ``alpha`` pixels standard deviation), smoothly (bicubically) interpolated to a
dense field, applied identically to image, targets and weights — bilinear for the image and
weights, nearest-neighbour for class targets so labels never blend. Running on torch tensors
batches the work and keeps it on the GPU when there is one, so it cannot starve training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .params import check, param
from .targets import IGNORE_INDEX


@dataclass
class AugmentConfig:
    """Augmentation strengths; ``elastic_alpha=0`` switches elastic deformation off."""

    elastic_alpha: float = param(10.0, min=0, max=50, label="elastic strength",
                                 help="elastic deformation: displacement s.d. in pixels "
                                 "(0 = off)")
    elastic_grid: int = param(3, min=2, max=16, advanced=True,
                              help="coarse grid of random displacements (points per side)")
    flips: bool = param(True, help="random mirror flips", advanced=True)
    rot90: bool = param(True, help="random 90-degree rotations", advanced=True)
    intensity: float = param(0.1, min=0, max=1, advanced=True,
                             help="random gain/offset of normalised intensities")
    noise: float = param(0.02, min=0, max=1, advanced=True,
                         help="largest s.d. of added Gaussian noise (normalised units)")

    def __post_init__(self) -> None:
        check(self)

    @property
    def margin(self) -> int:
        """Context (pixels) a patch needs on each side so deformation never samples outside."""
        return int(round(3 * self.elastic_alpha)) if self.elastic_alpha > 0 else 0


def elastic_grid(
    batch: int,
    size: tuple[int, int],
    alpha: float,
    grid: int = 3,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ``grid_sample`` sampling grid (B, H, W, 2) for a smooth random deformation."""
    h, w = size
    coarse = torch.randn(batch, 2, grid, grid, generator=generator, device=device) * alpha
    dense = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    base_y, base_x = torch.meshgrid(ys, xs, indexing="ij")
    # Pixels -> normalised [-1, 1] coordinates (align_corners=True convention).
    gx = base_x + dense[:, 0] * (2.0 / max(w - 1, 1))
    gy = base_y + dense[:, 1] * (2.0 / max(h - 1, 1))
    return torch.stack([gx, gy], dim=-1)


def elastic_deform(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    grid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp image (B,C,H,W), target (B,H,W, long) and weight with one sampling grid.

    ``weight`` is (B,H,W) loss weights or (B,K,H,W): loss weights followed by continuous
    per-pixel targets (a distance map), all warped bilinearly.
    """
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=True)
    maps = weight if weight.ndim == 4 else weight[:, None]
    maps = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    weight = maps if weight.ndim == 4 else maps[:, 0]
    # Shift so "ignore" is 0: pixels pulled in from outside the patch become ignored.
    shifted = (target - IGNORE_INDEX).to(image.dtype)[:, None]
    target = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros",
                           align_corners=True)[:, 0].round().long() + IGNORE_INDEX
    return image, target, weight


def augment_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    config: AugmentConfig,
    out_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deform, crop the central ``out_size`` square, flip/rotate and jitter intensities.

    Inputs carry ``config.margin`` extra pixels on each side beyond ``out_size``. ``weight``
    is (B,H,W) or (B,K,H,W) (see :func:`elastic_deform`).
    """
    dev = image.device
    b, _, h, w = image.shape
    if config.elastic_alpha > 0:
        grid = elastic_grid(b, (h, w), config.elastic_alpha, config.elastic_grid,
                            generator=generator, device=dev)
        image, target, weight = elastic_deform(image, target, weight, grid)
    top, left = (h - out_size) // 2, (w - out_size) // 2
    crop = (slice(top, top + out_size), slice(left, left + out_size))
    image, target, weight = image[..., crop[0], crop[1]], target[..., crop[0], crop[1]], weight[
        ..., crop[0], crop[1]
    ]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    if config.flips or config.rot90:
        images, targets, weights = [], [], []
        for i in range(b):
            im, t, wt = image[i], target[i], weight[i]
            if config.flips and rand(1).item() < 0.5:
                im, t, wt = im.flip(-1), t.flip(-1), wt.flip(-1)
            if config.rot90:
                k = int(rand(1).item() * 4)
                im, t, wt = (torch.rot90(x, k, dims=(-2, -1)) for x in (im, t, wt))
            images.append(im)
            targets.append(t)
            weights.append(wt)
        image, target, weight = torch.stack(images), torch.stack(targets), torch.stack(weights)
    if config.intensity > 0:
        gain = 1 + (rand(b, 1, 1, 1) * 2 - 1) * config.intensity
        offset = (rand(b, 1, 1, 1) * 2 - 1) * config.intensity
        image = image * gain + offset
    if config.noise > 0:
        sigma = rand(b, 1, 1, 1) * config.noise
        image = image + sigma * torch.randn(image.shape, generator=generator, device=dev)
    return image.contiguous(), target.contiguous(), weight.contiguous()
