"""bioimage.io model packages: export a napari-unet model, import one back, run others.

Export writes a bioimage.io model (spec format 0.5) that any bioimage.io consumer can run:
``pytorch_state_dict`` weights with the architecture's source (generated from
:mod:`napari_unet.model`, so it needs only torch), TorchScript weights for consumers
without Python (deepImageJ, ...), the normalisation as ``scale_range`` preprocessing and
``softmax`` postprocessing, a test input/output pair computed from a real image (the bundled
sample by default), a cover, documentation, citations (the U-Net paper and the training
data, with licences) and the training provenance. The napari-unet configuration travels in
``config.napari-unet`` so that importing the package gives back the very same model.

Import (:func:`load_package_model`) reads such a package back into a :class:`UNet`
(weights loaded with ``torch.load(weights_only=True)``: no code from the package runs).
Other 2D models are run through ``bioimageio.core`` (:class:`ForeignModel`) when their
weights and tensors fit; what does not fit is named in the error.

Everything here works offline: validation skips the checks that download
(``perform_io_checks=False``) and nothing refers to remote files.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import model as model_module
from .model import (
    CLASSES,
    ModelConfig,
    ModelFileError,
    UNet,
    check_architecture,
    config_from_metadata,
    load_model,
    model_from_state,
)
from .tiling import drain

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
CONFIG_KEY = "napari-unet"
ARCH_FILE = "napari_unet_arch.py"
ARCH_CALLABLE = "NapariUNet"
INSTALL_HINT = "bioimage.io support needs the optional extra: pip install 'napari-unet[bioimageio]'"

# Citations and licences of the data sets a model's provenance may name (keys of
# ``provenance['trained_on']``, the folder names of ../shared/data).
UNET_CITATION = {
    "text": "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
    "Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
DATASETS: dict[str, dict[str, Any]] = {
    "dsb2018_nuclei": {
        "name": "Data Science Bowl 2018 nuclei (BBBC038), stage-1 test images",
        "licence": "CC0-1.0",
        "cite": [{"text": "Caicedo et al. Nucleus segmentation across imaging experiments: "
                  "the 2018 Data Science Bowl. Nature Methods 2019.",
                  "doi": "10.1038/s41592-019-0612-7"}],
    },
    "dsb2018_train": {
        "name": "Data Science Bowl 2018 nuclei (BBBC038), stage-1 training images with the "
        "community mask fixes",
        "licence": "CC0-1.0",
        "cite": [{"text": "Caicedo et al. Nucleus segmentation across imaging experiments: "
                  "the 2018 Data Science Bowl. Nature Methods 2019.",
                  "doi": "10.1038/s41592-019-0612-7"}],
    },
    "isbi2012_em": {
        "name": "ISBI 2012 EM segmentation challenge (Drosophila ssTEM)",
        "licence": "free for research use, citing Cardona et al. 2010 and "
        "Arganda-Carreras et al. 2015",
        "cite": [
            {"text": "Cardona et al. An integrated micro- and macroarchitectural analysis of "
             "the Drosophila brain by computer-assisted serial section electron microscopy. "
             "PLoS Biology 2010.", "doi": "10.1371/journal.pbio.1000502"},
            {"text": "Arganda-Carreras et al. Crowdsourcing the creation of image "
             "segmentation algorithms for connectomics. Frontiers in Neuroanatomy 2015.",
             "doi": "10.3389/fnana.2015.00142"},
        ],
    },
    "gowt1_nuclei": {
        "name": "Cell Tracking Challenge Fluo-N2DH-GOWT1",
        "licence": "Cell Tracking Challenge terms of use",
        "cite": [{"text": "Maška et al. The Cell Tracking Challenge: 10 years of objective "
                  "benchmarking. Nature Methods 2023.", "doi": "10.1038/s41592-023-01879-y"}],
    },
    "nih3t3_nuclei": {
        "name": "NIH3T3 nuclei (Coelho et al. 2009)",
        "licence": "research use, citing Coelho et al. 2009",
        "cite": [{"text": "Coelho, Shariff, Murphy. Nuclear segmentation in microscope cell "
                  "images: a hand-segmented dataset and comparison of algorithms. ISBI 2009.",
                  "doi": "10.1109/ISBI.2009.5193098"}],
    },
}


def _require() -> None:
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


def _offline():
    """Validation context that never reaches the network (the package is self-contained)."""
    from bioimageio.spec import ValidationContext

    return ValidationContext(perform_io_checks=False)


# ------------------------------------------------------------------------------ detection


def is_package(path: str | os.PathLike) -> bool:
    """True for a bioimage.io package: a zip holding rdf.yaml, its folder, or the yaml."""
    p = Path(path)
    if p.is_dir():
        return any((p / n).is_file() for n in RDF_NAMES)
    if p.is_file() and p.name.endswith(RDF_NAMES):
        return True
    if p.is_file() and p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as z:
                return any(n in RDF_NAMES for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _read_rdf(path: Path) -> dict[str, Any]:
    """The package's rdf as a dict, without bioimageio (only pyyaml/ruyaml)."""
    import yaml

    if path.is_dir():
        path = next(path / n for n in RDF_NAMES if (path / n).is_file())
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n in RDF_NAMES)
            return yaml.safe_load(z.read(name))
    return yaml.safe_load(path.read_text())


def napari_unet_config(path: str | os.PathLike) -> ModelConfig | None:
    """The napari-unet configuration stored in a package, or None if another tool made it."""
    try:
        rdf = _read_rdf(Path(path))
    except Exception as exc:  # a broken zip/yaml: say which file
        raise ModelFileError(f"{path} is not a readable bioimage.io package: {exc}") from exc
    stored = (rdf.get("config") or {}).get(CONFIG_KEY)
    if not stored or "model_config" not in stored:
        return None
    # The same schema as a model file's metadata: types, ranges, no surprises.
    return config_from_metadata(json.dumps(stored["model_config"]), Path(path))


# ------------------------------------------------------------------------------ export


def architecture_source() -> str:
    """Standalone source of the U-Net (needs only torch) plus the bioimage.io wrapper.

    Generated from :mod:`napari_unet.model` so that it can never drift from the model
    napari-unet trains; the wrapper returns the class logits (softmax is the package's
    postprocessing) and, for models with extra output channels, those activated.
    """
    parts = [
        '"""U-Net architecture of a napari-unet model (generated by napari-unet export)."""',
        "from __future__ import annotations\n",
        "import copy",
        "import json",
        "from dataclasses import asdict, dataclass, field",
        "from typing import Any\n",
        "import torch",
        "from torch import nn\n",
        f"CLASSES = {CLASSES!r}\n",
    ]
    for name in ("ModelConfig", "_double_conv", "UNet"):
        parts.append("\n" + inspect.getsource(getattr(model_module, name)))
    parts.append('''

class NapariUNet(UNet):
    """bioimage.io entry point: keyword arguments are the ModelConfig fields."""

    def __init__(self, **config: Any) -> None:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                 if k in ModelConfig.__dataclass_fields__}
        super().__init__(ModelConfig(**known))
        # Known before tracing, so TorchScript records no shape test.
        head = getattr(self, "head", None)
        self.n_out = getattr(head, "out_channels", None)

    def forward(self, x: torch.Tensor):
        y = super().forward(x)
        k = self.config.n_classes
        if (self.n_out if self.n_out is not None else y.shape[1]) == k:
            return y
        # Extra channels (the distance map) are a second output, in [0, 1] as napari-unet
        # post-processing reads it (model.activate).
        return y[:, :k], torch.sigmoid(y[:, k:])
''')
    return "\n".join(parts)


def _arch_kwargs(config: ModelConfig) -> dict[str, Any]:
    """The ModelConfig fields that shape the network (provenance and the recommended
    post-processing stay in config)."""
    raw = asdict(config)
    raw.pop("provenance", None)
    raw.pop("postprocess", None)
    return json.loads(json.dumps(raw))  # tuples -> lists, YAML-safe


def _extra_channels(model: UNet) -> int:
    with torch.no_grad():
        d = model.config.divisor
        out = model.eval()(torch.zeros(1, model.config.in_channels, 2 * d, 2 * d))
    return int(out.shape[1]) - model.config.n_classes


def _sample_image() -> np.ndarray:
    from .sample import load_sample

    return np.asarray(load_sample()[0])


def _to_cyx(image: np.ndarray, in_channels: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] != in_channels:
        raise ValueError(
            f"test image of shape {image.shape} does not fit a model with {in_channels} input "
            "channel(s): give a (Y, X) image or a (C, Y, X) one with that many channels")
    return image


def _crop_to_divisor(image: np.ndarray, divisor: int, max_size: int = 512) -> np.ndarray:
    """A centred crop whose sides are multiples of the model's divisor (at most max_size)."""
    h, w = image.shape[-2:]
    nh, nw = (min(n, max_size) // divisor * divisor for n in (h, w))
    if nh == 0 or nw == 0:
        raise ValueError(f"test image {image.shape} is smaller than the model's minimum "
                         f"input size {divisor}")
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    return image[..., y0:y0 + nh, x0:x0 + nw]


def _cover(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """2:1 PNG: the test image next to its segmentation drawn over it."""
    import imageio.v3 as iio
    from skimage.color import label2rgb
    from skimage.transform import resize

    from .normalize import normalize

    gray = np.clip(normalize(image[0]), 0, 1)
    gray = resize(gray, (256, 256), order=1)
    lab = resize(labels, (256, 256), order=0, preserve_range=True, anti_aliasing=False)
    overlay = label2rgb(lab.astype(np.int32), image=gray, alpha=0.35, bg_label=0)
    left = np.repeat(gray[..., None], 3, axis=-1)
    cover = (np.concatenate([left, overlay], axis=1) * 255).astype(np.uint8)
    iio.imwrite(path, cover)


BUNDLED_BASES = ("bundled", "bundled model")  # how the CLI and the widget name the base


def _training_data(config: ModelConfig) -> tuple[dict[str, list], str]:
    """The public data sets behind a model (name -> image list) and a note on the rest.

    A model fine-tuned from the bundled one carries the bundled model's data too: its
    licences and citations still apply.
    """
    prov = config.provenance or {}
    if prov.get("trained_on"):
        return dict(prov["trained_on"]), ""
    if str(prov.get("base_model", "")) in BUNDLED_BASES:
        base = load_model().config.provenance or {}
        return dict(base.get("trained_on") or {}), (
            "fine-tuned from napari-unet's bundled model on the user's own annotations")
    return {}, "trained on the user's own annotations"


def _documentation(config: ModelConfig, name: str, extra: int,
                   trained_on: dict[str, list], note: str) -> str:
    prov = config.provenance or {}
    datasets = sorted(trained_on)
    lines = [
        f"# {name}",
        "",
        "A 2D U-Net (Ronneberger et al. 2015) exported by "
        "[napari-unet](https://github.com/napari-unet/napari-unet). It predicts, for every "
        f"pixel, the probabilities of the classes {', '.join(config.classes)}"
        + (f" and {extra} extra output channel(s)" if extra else "") + ".",
        "",
        "## Use",
        "",
        f"- Input: {config.in_channels} channel(s), Y and X multiples of {config.divisor}. "
        f"Intensities are rescaled per image so that the {config.norm_percentiles[0]} and "
        f"{config.norm_percentiles[1]} percentiles map to 0 and 1 (`scale_range`).",
        "- Output `probabilities`: softmax over the classes (channel axis).",
        "- Instances: napari-unet runs overlap-tile inference and a seeded watershed on "
        "`interior` (seeds) inside `interior + boundary` (mask). In napari, open this file "
        "with napari-unet or pass it as `napari-unet segment --model model.zip`.",
        "",
        "## Training",
        "",
    ]
    if datasets:
        for key in datasets:
            d = DATASETS.get(key, {"name": key, "licence": "see the data set's terms"})
            n = len(trained_on.get(key, []))
            lines.append(f"- {d['name']}: {n} image(s); licence: {d['licence']}.")
    if note:
        lines.append(f"- {note[0].upper()}{note[1:]} (see the provenance below).")
    scores = prov.get("validation_scores")
    if scores:
        lines += ["", "Held-out validation (instance AP@0.5 / pixel IoU):", ""]
        for key, s in scores.items():
            if isinstance(s, dict) and "ap50" in s:
                lines.append(f"- {key}: {s['ap50']:.2f} / {s.get('pixel_iou', float('nan')):.2f}")
    lines += [
        "",
        "## Limitations",
        "",
        "Trained on the data above; expect to fine-tune (napari-unet's Train widget) on other "
        "cell types, stains or magnifications. Touching cells are split by the predicted "
        "boundary class; very thin or faint boundaries merge cells.",
        "",
        "## Provenance",
        "",
        "```json",
        json.dumps({k: v for k, v in prov.items() if k not in ("trained_on", "validation")},
                   indent=2, default=str),
        "```",
    ]
    return "\n".join(lines) + "\n"


def export_model(
    model: UNet | str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    test_image: np.ndarray | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a UNet, a model file, or None: the bundled model) as a bioimage.io
    package: a ``.zip`` file, or a folder for any other ``output`` name. Returns its path.

    ``test_image`` (Y, X) or (C, Y, X) gives the test input (default: the bundled sample).
    """
    return drain(export_model_iter(model, output, name=name, description=description,
                                    authors=authors, test_image=test_image,
                                    torchscript=torchscript, overwrite=overwrite))


def export_model_iter(
    model: UNet | str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    test_image: np.ndarray | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
) -> Generator[str, None, Path]:
    """:func:`export_model` as a generator yielding a message per step (for the widgets)."""
    _require()
    from bioimageio.spec import (
        save_bioimageio_package,
        save_bioimageio_package_as_folder,
        update_hashes,
    )
    from bioimageio.spec.model import v0_5

    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another name or pass overwrite=True")
    if not isinstance(model, UNet):
        model = load_model(model)
    # A private CPU copy: the caller's model may live on a GPU or still be training.
    model = copy.deepcopy(model).to("cpu").eval()
    config = model.config
    name = name or str(config.provenance.get("name") or output.name.split(".")[0])
    if len(name) < 5:  # the spec wants a descriptive name (5+ characters)
        name = f"napari-unet {name}"
    extra = _extra_channels(model)

    yield "computing the test output"
    image = test_image if test_image is not None else _sample_image()
    image = _crop_to_divisor(_to_cyx(image, config.in_channels), config.divisor)
    test_in = image[None].astype(np.float32)  # (1, C, Y, X), raw intensities

    with tempfile.TemporaryDirectory(prefix="napari_unet_bioimageio_") as tmp_str:
        tmp = Path(tmp_str)
        (tmp / ARCH_FILE).write_text(architecture_source())
        arch = _load_arch(tmp / ARCH_FILE)(**_arch_kwargs(config))
        arch.load_state_dict(model.state_dict())
        arch.eval()
        test_outs = _reference_outputs(arch, test_in, config)
        np.save(tmp / "test_input.npy", test_in)
        np.save(tmp / "test_output.npy", test_outs[0])
        if extra:
            np.save(tmp / "test_output_extra.npy", test_outs[1])
        torch.save(model.state_dict(), tmp / "weights.pt")

        yield "segmenting the test image for the cover"
        from .postprocess import labels_from_probs

        _cover(image, labels_from_probs(test_outs[0][0]), tmp / "cover.png")
        trained_on, note = _training_data(config)
        datasets = sorted(trained_on)
        (tmp / "README.md").write_text(_documentation(config, name, extra, trained_on, note))

        ts = None
        if torchscript:
            yield "tracing TorchScript weights"
            # torch.jit is deprecated in torch >= 2.10 but TorchScript is still what
            # deepImageJ and other Java/C++ consumers of bioimage.io models load.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(arch, torch.from_numpy(
                    np.zeros((1, config.in_channels, 2 * config.divisor * 4,
                              2 * config.divisor * 4), np.float32)))
            traced.save(str(tmp / "weights_torchscript.pt"))
            ts = v0_5.TorchscriptWeightsDescr(
                source=tmp / "weights_torchscript.pt", pytorch_version=_torch_version(),
                parent="pytorch_state_dict")

        yield "describing the package"
        descr = _describe(tmp, config, name, description, authors, extra, datasets, note, ts)
        descr = update_hashes(descr)  # sha256 of every file, so consumers can verify them
        yield "writing the package"
        tmp_out = output.with_name(f".{output.name}.tmp")
        _remove(tmp_out)
        try:
            if output.suffix.lower() == ".zip":
                save_bioimageio_package(descr, output_path=tmp_out)
            else:
                save_bioimageio_package_as_folder(descr, output_path=tmp_out)
            _remove(output)
            os.replace(tmp_out, output)
        finally:
            _remove(tmp_out)
    return output


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _load_arch(path: Path) -> type:
    import importlib.util
    import sys

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    mod_name = f"_napari_unet_arch_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return getattr(module, ARCH_CALLABLE)


def _bioimageio_normalize(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``scale_range`` as bioimage.io computes it: (x - lo) / (hi - lo + eps) per sample."""
    lo, hi = np.percentile(image, percentiles)
    return ((image - lo) / (hi - lo + 1e-6)).astype(np.float32)


@torch.no_grad()
def _reference_outputs(arch: torch.nn.Module, test_in: np.ndarray,
                       config: ModelConfig) -> list[np.ndarray]:
    x = torch.from_numpy(_bioimageio_normalize(test_in, config.norm_percentiles))
    y = arch(x)
    logits, extra = (y, None) if isinstance(y, torch.Tensor) else y
    outs = [torch.softmax(logits, dim=1).numpy()]
    if extra is not None:
        outs.append(extra.numpy())
    return outs


def _describe(tmp: Path, config: ModelConfig, name: str, description: str | None,
              authors: list[str] | None, extra: int, datasets: list[str], note: str,
              ts: Any) -> Any:
    from bioimageio.spec.model import v0_5

    prov = config.provenance or {}
    d = config.divisor
    in_axes = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier(f"channel{i}")
                                        for i in range(config.in_channels)]),
        v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=v0_5.ParameterizedSize(min=d, step=d)),
        v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=v0_5.ParameterizedSize(min=d, step=d)),
    ]

    def out_axes(names: list[str]) -> list[Any]:
        return [
            v0_5.BatchAxis(),
            v0_5.ChannelAxis(channel_names=[v0_5.Identifier(n) for n in names]),
            v0_5.SpaceOutputAxis(id=v0_5.AxisId("y"), size=v0_5.SizeReference(
                tensor_id=v0_5.TensorId("input"), axis_id=v0_5.AxisId("y"))),
            v0_5.SpaceOutputAxis(id=v0_5.AxisId("x"), size=v0_5.SizeReference(
                tensor_id=v0_5.TensorId("input"), axis_id=v0_5.AxisId("x"))),
        ]

    lo, hi = config.norm_percentiles
    inputs = [v0_5.InputTensorDescr(
        id=v0_5.TensorId("input"),
        description="raw image; rescaled per image by its percentiles",
        axes=in_axes,
        test_tensor=v0_5.FileDescr(source=tmp / "test_input.npy"),
        preprocessing=[
            v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
            v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
                axes=[v0_5.AxisId("channel"), v0_5.AxisId("y"), v0_5.AxisId("x")],
                min_percentile=lo, max_percentile=hi)),
        ],
    )]
    outputs = [v0_5.OutputTensorDescr(
        id=v0_5.TensorId("probabilities"),
        description="class probabilities (softmax over the channel axis)",
        axes=out_axes(list(config.classes)),
        test_tensor=v0_5.FileDescr(source=tmp / "test_output.npy"),
        postprocessing=[v0_5.SoftmaxDescr(kwargs=v0_5.SoftmaxKwargs(
            axis=v0_5.AxisId("channel")))],
    )]
    if extra:
        outputs.append(v0_5.OutputTensorDescr(
            id=v0_5.TensorId("extra"),
            description="extra output channel(s) of the model, e.g. a distance map",
            axes=out_axes([f"extra{i}" for i in range(extra)]),
            test_tensor=v0_5.FileDescr(source=tmp / "test_output_extra.npy"),
        ))

    state = v0_5.PytorchStateDictWeightsDescr(
        source=tmp / "weights.pt",
        architecture=v0_5.ArchitectureFromFileDescr(
            source=tmp / ARCH_FILE, callable=v0_5.Identifier(ARCH_CALLABLE),
            kwargs=_arch_kwargs(config)),
        pytorch_version=_torch_version(),
    )
    cite = [v0_5.CiteEntry(**UNET_CITATION)]
    for key in datasets:
        cite += [v0_5.CiteEntry(**c) for c in DATASETS.get(key, {}).get("cite", [])]
    seen, unique = set(), []
    for c in cite:  # two DSB folders cite the same paper once
        if str(c.doi) not in seen:
            seen.add(str(c.doi))
            unique.append(c)
    training = "; ".join(
        [f"{DATASETS.get(k, {}).get('name', k)} ({DATASETS.get(k, {}).get('licence', '?')})"
         for k in datasets] + ([note] if note else []))
    settings = prov.get("settings") or {}
    bio_config = v0_5.BioimageioConfig(
        architecture_type="U-Net",
        architecture_description=f"2D U-Net, depth {config.depth}, base width "
        f"{config.base_channels}, BatchNorm, {config.n_classes} classes"
        + (f" + {extra} extra channel(s)" if extra else ""),
        modality="fluorescence and electron microscopy",
        target_structure=["cell nuclei", "cells"],
        task="semantic segmentation (classes for instance segmentation)",
        model_parameter_count=sum(p.numel() for p in _params(tmp, config)),
        training=v0_5.TrainingDetails(
            training_preprocessing=f"scale_range {lo}-{hi} percentiles; elastic deformation, "
            "flips, 90 degree rotations, intensity jitter",
            training_epochs=None,
            training_batch_size=settings.get("batch"),
            initial_learning_rate=settings.get("lr"),
            loss_function="border-weighted cross-entropy (Ronneberger et al. 2015)",
            optimizer="AdamW",
        ),
    )
    stored = {"model_config": json.loads(config.to_json()), "format": model_module.FORMAT,
              "training_data": training}
    return v0_5.ModelDescr(
        name=name,
        description=description or (
            f"2D U-Net for cell/nucleus segmentation ({', '.join(config.classes)}) exported by "
            f"napari-unet; training data: {training}."),
        authors=[v0_5.Author(name=a) for a in (authors or ["napari-unet contributors"])],
        cite=unique,
        license="BSD-3-Clause",
        documentation=v0_5.FileDescr(source=tmp / "README.md"),
        covers=[v0_5.FileDescr(source=tmp / "cover.png")],
        tags=["napari-unet", "unet", "2d", "segmentation", "instance-segmentation",
              "nuclei", "cells", "pytorch"],
        version="0.1.0",
        timestamp=v0_5.Datetime(datetime.datetime.now(datetime.UTC)),
        inputs=inputs,
        outputs=outputs,
        weights=v0_5.WeightsDescr(pytorch_state_dict=state, torchscript=ts),
        config=v0_5.Config(bioimageio=bio_config, **{CONFIG_KEY: stored}),
        git_repo="https://github.com/napari-unet/napari-unet",
    )


def _params(tmp: Path, config: ModelConfig):
    return _load_arch(tmp / ARCH_FILE)(**_arch_kwargs(config)).parameters()


# ------------------------------------------------------------------------------ checks


def validate_package(path: str | os.PathLike) -> Any:
    """bioimageio.spec's offline validation summary of a package (status 'valid'/'failed')."""
    _require()
    from bioimageio.spec import load_description

    with _offline():
        descr = load_description(str(path), perform_io_checks=False)
    return descr.validation_summary


def test_package(path: str | os.PathLike, devices: tuple[str, ...] = ("cpu",)) -> Any:
    """Run the package's own test (test input -> test output) with bioimageio.core on CPU."""
    _require()
    from bioimageio.core import test_model

    with _offline():
        return test_model(str(path), devices=list(devices))


# ------------------------------------------------------------------------------ import


def load_package_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> UNet:
    """A napari-unet model from a bioimage.io package that napari-unet exported.

    Reads only the rdf (YAML) and the ``pytorch_state_dict`` weights, which
    ``torch.load(weights_only=True)`` loads without running code. Packages made by other
    tools raise :class:`ModelFileError`; run those with :class:`ForeignModel`.
    """
    p = Path(path)
    config = napari_unet_config(p)
    if config is None:
        raise ModelFileError(
            f"{p} is a bioimage.io package not made by napari-unet; napari-unet can run it "
            "through bioimageio.core (napari_unet.bioimageio.ForeignModel) but cannot "
            "fine-tune it")
    rdf = _read_rdf(p)
    try:
        source = rdf["weights"]["pytorch_state_dict"]["source"]
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{p}: the package has no pytorch_state_dict weights") from exc
    state = _load_state(p, str(source))
    check_architecture(config, {k: tuple(v.shape) for k, v in state.items()}, p)
    return model_from_state(config, state, p, device)


def _load_state(package: Path, source: str) -> dict[str, torch.Tensor]:
    import io as _io

    if package.is_file() and package.suffix.lower() == ".zip":
        with zipfile.ZipFile(package) as z:
            data = z.read(source)
        return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    root = package if package.is_dir() else package.parent
    return torch.load(root / source, map_location="cpu", weights_only=True)


@dataclass
class ForeignSupport:
    """What napari-unet makes of another tool's package: how to turn its output into labels."""

    input_id: str
    output_id: str
    in_channels: int
    output_kind: str  # "labels" | "foreground" | "classes"


class ForeignModel:
    """Run another tool's 2D bioimage.io model through bioimageio.core, plane by plane.

    Supported: one input with axes (batch?, channel?, y, x) and one output of the same
    layout; weights that bioimageio.core runs here (pytorch_state_dict, torchscript, onnx
    if onnxruntime is installed). The output becomes labels: integer outputs are taken as
    labels, one float channel as foreground probability (> 0.5, connected components),
    several channels as class scores (argmax; channel 0 is background). Unsupported (named
    in the error): 3D inputs (a z axis), time axes, several inputs or outputs.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        _require()
        from bioimageio.core import create_prediction_pipeline, load_description
        from bioimageio.spec import InvalidDescr

        with _offline():
            descr = load_description(str(path), perform_io_checks=False)
        if isinstance(descr, InvalidDescr) or getattr(descr, "type", None) != "model":
            summary = getattr(descr, "validation_summary", None)
            raise ModelFileError(f"{path} is not a valid bioimage.io model: "
                                 f"{summary.format() if summary is not None else descr}")
        self.path = Path(path)
        self.descr = descr
        self.support = check_foreign(descr)
        self.pipeline = create_prediction_pipeline(descr, devices=[device])

    def segment_plane(self, plane: np.ndarray) -> np.ndarray:
        """(Y, X) or (C, Y, X) plane -> int32 labels (Y, X)."""
        from bioimageio.core import Sample, Tensor
        from bioimageio.core.axis import AxisId as CoreAxisId

        plane = np.asarray(plane)
        if plane.ndim == 2:
            plane = plane[None]
        if plane.shape[0] != self.support.in_channels:
            raise ModelFileError(
                f"{self.path.name} expects {self.support.in_channels} channel(s), the plane "
                f"has {plane.shape[0]}; pick the channel axis that matches")
        ipt = self.descr.inputs[0]
        axes = [str(a.id) for a in ipt.axes]
        arr = plane.astype(np.float32)
        data = arr[None] if "batch" in axes else arr
        if "channel" not in axes:
            data = data[:, 0] if "batch" in axes else data[0]
        tensor = Tensor(data, dims=tuple(CoreAxisId(a) for a in axes))
        sample = Sample(members={ipt.id: tensor}, stat={}, id="plane")
        out = self.pipeline.predict_sample_without_blocking(sample)
        result = np.asarray(out.members[self.descr.outputs[0].id].data)
        out_axes = [str(a.id) for a in self.descr.outputs[0].axes]
        if "batch" in out_axes:
            result = np.take(result, 0, axis=out_axes.index("batch"))
            out_axes.remove("batch")
        if "channel" in out_axes:
            result = np.moveaxis(result, out_axes.index("channel"), 0)
        else:
            result = result[None]
        return _labels_from_output(result, self.support.output_kind)


def check_foreign(descr: Any) -> ForeignSupport:
    """Which of a package's tensors napari-unet can feed; raises naming what is unsupported."""
    from bioimageio.spec.model import v0_5

    if not isinstance(descr, v0_5.ModelDescr):
        raise ModelFileError(
            f"bioimage.io model format {descr.format_version} is not supported; napari-unet "
            "runs format 0.5 models (update the package with bioimageio.spec.update_format)")
    if len(descr.inputs) != 1 or len(descr.outputs) < 1:
        raise ModelFileError(
            f"model '{descr.name}' has {len(descr.inputs)} inputs: napari-unet runs models "
            "with one image input only")
    ipt, out = descr.inputs[0], descr.outputs[0]
    in_ids = [str(a.id) for a in ipt.axes]
    spatial = [a for a in in_ids if a not in ("batch", "channel")]
    if sorted(spatial) != ["x", "y"]:
        raise ModelFileError(
            f"model '{descr.name}' has input axes {in_ids}: napari-unet runs 2D models "
            "(y, x with optional batch and channel) only; 3D (z) and time axes are not "
            "supported")
    n_ch = 1
    for a in ipt.axes:
        if str(a.id) == "channel":
            n_ch = len(a.channel_names)
    out_ids = [str(a.id) for a in out.axes]
    if sorted(a for a in out_ids if a not in ("batch", "channel")) != ["x", "y"]:
        raise ModelFileError(
            f"model '{descr.name}' has output axes {out_ids}: only 2D (y, x) outputs can "
            "become labels")
    n_out = 1
    for a in out.axes:
        if str(a.id) == "channel":
            n_out = len(a.channel_names)
    dtype = str(getattr(out, "data", None) and getattr(out.data, "type", "float32"))
    if "int" in dtype:
        kind = "labels"
    elif n_out == 1:
        kind = "foreground"
    else:
        kind = "classes"
    return ForeignSupport(str(ipt.id), str(out.id), n_ch, kind)


def _labels_from_output(result: np.ndarray, kind: str) -> np.ndarray:
    from skimage.measure import label

    if kind == "labels":
        return result[0].astype(np.int32)
    if kind == "foreground":
        return label(result[0] > 0.5).astype(np.int32)
    classes = np.argmax(result, axis=0)
    return label(classes > 0).astype(np.int32)
