"""The U-Net (Ronneberger et al. 2015) and its safe on-disk format.

A model file is a single ``.safetensors`` file: tensors only, with the architecture,
normalisation, class names and training provenance stored as JSON in the header's
metadata. ``safetensors`` never unpickles, so loading cannot run code from the file.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .atomic import atomic_path
from .postprocess import check_recommended

FORMAT = "napari-unet/1"
CLASSES = ("background", "interior", "boundary")
BUNDLED_MODEL = "nuclei_cells_v2.safetensors"


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
    # Post-processing thresholds this model works best with (``postprocess.CALIBRATED``),
    # calibrated on the user's held-out cells after fine-tuning; Segment, the CLI and the
    # Python API start from them. Empty: the PostprocessConfig defaults.
    postprocess: dict[str, float] = field(default_factory=dict)
    # Objects wider than this (pixels) are segmented in a plane shrunk until they are this
    # wide (rescale.py): the size range the model learnt. None: planes are never resized.
    object_diameter: float | None = None
    # A fine-tuned model: the object diameter measured in the images it was fine-tuned on
    # (which were resized by it). Segment resizes every plane by it rather than measuring
    # each one. None: each plane is measured.
    fit_diameter: float | None = None
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


def check_model_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check where a model file will go (suffix, folder, existing file) before training."""
    from .outputs import check_output

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path}: model files end in .safetensors, not "
                             f"{path.suffix or '(no suffix)'!r}; e.g. -o {path.stem}.safetensors")
    return check_output(path, suffixes=(".safetensors",), what="model file",
                        overwrite=overwrite)


def save_model(model: UNet, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write weights + JSON config atomically; refuses to replace a file unless asked."""
    path = check_model_output(path, overwrite=overwrite)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            save_file(state, str(tmp),
                      metadata={"format": FORMAT, "config": model.config.to_json()})
    except SafetensorError as exc:
        # safetensors reports I/O failures (disk full, read-only) as its own error type;
        # as an OSError they get the same handling as any other failed write.
        code = re.search(r"os error (\d+)", str(exc))
        err = int(code.group(1)) if code else errno.EIO
        raise OSError(err, os.strerror(err), str(path)) from exc
    return path


# Limits of the model-file schema. Generous for a 2D U-Net (the bundled model: depth 4, base
# width 16, 0.48 M parameters), but small enough that a hostile or corrupt file cannot make
# the loader allocate gigabytes.
MAX_PARAMETERS = 50_000_000
_INT_FIELDS = {"in_channels": (1, 16), "n_classes": (1, 16), "depth": (1, 8),
               "base_channels": (1, 512)}


def _schema_error(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"{path}: invalid model metadata: {what}; the file is damaged or "
                          "was not written by napari-unet")


def config_from_metadata(text: str, path: Path) -> ModelConfig:
    """Parse and validate a model file's JSON config (types and ranges) without building it."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise _schema_error(path, f"config is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _schema_error(path, f"config must be a JSON object, got {type(raw).__name__}")
    for key, (lo, hi) in _INT_FIELDS.items():
        if key in raw:
            v = raw[key]
            # bool is an int to Python, but "depth": true is not a depth.
            if type(v) is not int or not lo <= v <= hi:
                raise _schema_error(path, f"{key} = {v!r} must be an integer in [{lo}, {hi}]")
    n_classes = raw.get("n_classes", ModelConfig.n_classes)
    if "classes" in raw:
        cls = raw["classes"]
        if not (isinstance(cls, list) and all(isinstance(c, str) for c in cls)):
            raise _schema_error(path, f"classes = {cls!r} must be a list of names")
    if "norm_percentiles" in raw:
        pr = raw["norm_percentiles"]
        if not (isinstance(pr, list) and len(pr) == 2
                and all(type(x) in (int, float) and math.isfinite(x) for x in pr)
                and 0 <= pr[0] < pr[1] <= 100):
            raise _schema_error(path, f"norm_percentiles = {pr!r} must be two numbers "
                                "0 <= low < high <= 100")
    if "provenance" in raw and not isinstance(raw["provenance"], dict):
        raise _schema_error(path, "provenance must be a JSON object")
    # Optional output of newer models (an extra distance channel); old files lack it.
    if "distance" in raw and type(raw["distance"]) is not bool:
        raise _schema_error(path, f"distance = {raw['distance']!r} must be true or false")
    for key in ("object_diameter", "fit_diameter"):
        d = raw.get(key)
        if d is not None and not (type(d) in (int, float) and 0 < d <= 100_000):
            raise _schema_error(path, f"{key} = {d!r} must be null or a number of pixels in "
                                "(0, 100000]")
    if "postprocess" in raw and (why := check_recommended(raw["postprocess"])) is not None:
        raise _schema_error(path, why)
    known = {k: raw[k] for k in ModelConfig.__dataclass_fields__ if k in raw}
    for key in ("classes", "norm_percentiles"):
        if key in known:
            known[key] = tuple(known[key])
    config = ModelConfig(**known)
    if "classes" in raw and len(config.classes) != n_classes:
        raise _schema_error(path, f"{len(config.classes)} class name(s) for n_classes = "
                            f"{n_classes}")
    return config


def _expected_state(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights of ``UNet(config)``, built on the meta device.

    Meta tensors have shapes but no storage, so this costs nothing whatever the config says.
    """
    with torch.device("meta"):
        net = UNet(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_architecture(config: ModelConfig, stored: dict[str, tuple[int, ...]],
                       path: Path) -> None:
    """Raise ModelFileError unless ``UNet(config)`` stays within the parameter budget and
    has exactly the weights (names and shapes) ``stored`` holds; builds nothing."""
    expected = _expected_state(config)
    n_params = sum(math.prod(s) for k, s in expected.items() if "running_" not in k
                   and not k.endswith("num_batches_tracked"))
    if n_params > MAX_PARAMETERS:
        raise _schema_error(path, f"its architecture has {n_params / 1e6:.0f} M parameters, "
                            f"more than the {MAX_PARAMETERS // 1_000_000} M a model may have")
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = [f"{k} {stored[k]} (expected {expected[k]})" for k in expected
             if k in stored and stored[k] != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            missing and f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""),
            extra and f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""),
            wrong and "wrong shape " + ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""),
        ]))
        raise ModelFileError(f"{path}: the stored weights do not match the architecture in "
                             f"its metadata: {detail}")


def inspect_model_file(path: str | os.PathLike) -> ModelConfig:
    """Validate a model file from its header alone: format, config schema, parameter budget
    and stored tensor shapes. Reads no weights and builds no network.

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelFileError: anything else wrong with the file (the message says what).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a napari-unet model file (safetensors expected): {exc}"
        ) from exc
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a napari-unet model")
    config = config_from_metadata(meta["config"], path)
    check_architecture(config, {k: shape for k, (shape, _) in stored.items()}, path)
    not_float = [k for k, (_, dt) in stored.items()
                 if not k.endswith("num_batches_tracked") and dt not in ("F16", "BF16", "F32",
                                                                         "F64")]
    if not_float:
        raise ModelFileError(f"{path}: weight {not_float[0]} is stored as "
                             f"{stored[not_float[0]][1]}, not floating point")
    return config


def is_package_path(path: Path) -> bool:
    """A bioimage.io package (zip, rdf.yaml or folder) rather than a .safetensors file."""
    return path.suffix.lower() in (".zip", ".yaml") or path.is_dir()


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> UNet:
    """Load a model file (the bundled model when ``path`` is None) in eval mode.

    The file is checked (:func:`inspect_model_file`) before any weight is read or any network
    is built, and weights holding NaN or infinity are refused.
    """
    path = bundled_model_path() if path is None else Path(path)
    if is_package_path(path):
        # A bioimage.io package (napari-unet exported it): same model, other container.
        from .bioimageio import load_package_model

        return load_package_model(path, device)
    config = inspect_model_file(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read the weights: {exc}") from exc
    return model_from_state(config, state, path, device)


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], path: Path,
                     device: str | torch.device = "cpu") -> UNet:
    """The network of a checked ``config`` with ``state`` loaded, in eval mode; weights
    holding NaN or infinity are refused (any container: model file or package)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: weight {name} holds NaN or infinite values; the "
                                 "model is broken (e.g. saved after training diverged)")
    model = UNet(config)
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
