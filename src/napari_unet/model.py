"""The U-Net (Ronneberger et al. 2015) and its safe on-disk format.

A model file is a single ``.safetensors`` file: tensors only, with the architecture,
normalisation, class names and training provenance stored as JSON in the header's
metadata. ``safetensors`` never unpickles, so loading cannot run code from the file.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

FORMAT = "napari-unet/1"
CLASSES = ("background", "interior", "boundary")
BUNDLED_MODEL = "nuclei_cells_v1.safetensors"


class ModelFileError(ValueError):
    """A file that is not a napari-unet model, or a model that does not fit the data."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and feed it data the way it was trained."""

    in_channels: int = 1
    n_classes: int = 3
    depth: int = 4
    base_channels: int = 16
    classes: tuple[str, ...] = CLASSES
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    # An extra output channel regressing each pixel's distance to its cell's edge,
    # normalised per cell to [0, 1] (1 at the cell's most interior pixel). It seeds the
    # watershed: its cores stay apart where touching cells meet. Files written before it
    # existed have no such key and load with False.
    distance: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_outputs(self) -> int:
        """Output channels of the network: class logits, then the distance logit if any."""
        return self.n_classes + int(self.distance)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (one factor 2 per max-pool)."""
        return 2 ** (self.depth - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for key in ("classes", "norm_percentiles"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    # BatchNorm (not Group/InstanceNorm): in eval mode it is a per-pixel affine map, so a
    # tile's output does not depend on which other pixels share the tile; that is what
    # lets tiled inference reproduce whole-image inference exactly.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """2D U-Net: 3x3 conv pairs, 2x2 max-pool down, 2x2 up-convolution + skip concat up."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        widths = [c.base_channels * 2**i for i in range(c.depth)]
        self.down = nn.ModuleList()
        cin = c.in_channels
        for w in widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconv.append(nn.ConvTranspose2d(w * 2, w, 2, stride=2))
            self.up.append(_double_conv(w * 2, w))
        self.head = nn.Conv2d(widths[0], c.n_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = block(torch.cat([skips.pop(), upconv(x)], dim=1))
        return self.head(x)


def activate(config: ModelConfig, raw: torch.Tensor) -> torch.Tensor:
    """Network output (B, n_outputs, h, w) -> maps: class probabilities (softmax over the
    class channels), then the distance map in [0, 1] (sigmoid) when the model has one."""
    raw = raw.float()
    probs = torch.softmax(raw[:, : config.n_classes], dim=1)
    if not config.distance:
        return probs
    return torch.cat([probs, torch.sigmoid(raw[:, config.n_classes :])], dim=1)


def fuse_batchnorm(model: UNet) -> UNet:
    """An inference-only copy with each BatchNorm folded into the convolution before it.

    Same outputs up to float rounding, one memory pass fewer per layer (CPU inference is
    memory-bound on these small layers).
    """
    fused = copy.deepcopy(model).eval()
    for block in [*fused.down, *fused.up]:
        for i in (0, 3):
            conv, bn = block[i], block[i + 1]
            block[i] = fuse_conv_bn_eval(conv, bn)
            block[i + 1] = nn.Identity()
    return fused


def bundled_model_path() -> Path:
    """Path of the pretrained model shipped inside the package."""
    return Path(str(resources.files("napari_unet") / "models" / BUNDLED_MODEL))


def save_model(model: UNet, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write weights + JSON config atomically; refuses to replace a file unless asked."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model files end in .safetensors, got {path.name!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "config": model.config.to_json()})
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> UNet:
    """Load a model file (the bundled model when ``path`` is None) in eval mode."""
    path = bundled_model_path() if path is None else Path(path)
    if path.suffix.lower() in (".zip", ".yaml") or path.is_dir():
        # A bioimage.io package (napari-unet exported it): same model, other container.
        from .bioimageio import load_package_model

        return load_package_model(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a napari-unet model file (safetensors expected): {exc}"
        ) from exc
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a napari-unet model")
    model = UNet(ModelConfig.from_json(meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match its architecture: {exc}") from exc
    return model.to(device).eval()


def check_channels(expected: int, n_channels: int, what: str = "image") -> None:
    """Raise a clear error when data and model disagree on the number of channels."""
    if n_channels != expected:
        raise ModelFileError(
            f"the model expects {expected} channel(s) but the {what} has "
            f"{n_channels}; pick the channel axis (or a single channel) that matches, or "
            "use a model trained for this many channels"
        )
