"""The bundled sample: a real nuclei crop with a sparse annotation (see data/README.md)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import tifffile

SAMPLE_SOURCE = (
    "256x256 crop of StarDist's nuclei2d demo image (BSD-3-Clause), "
    "from the Data Science Bowl 2018 / BBBC038 (CC0)"
)


def _read(name: str) -> np.ndarray:
    with resources.as_file(resources.files("napari_unet") / "data" / name) as path:
        return tifffile.imread(path)


def load_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint16, sparse annotation, full ground-truth labels) of the sample crop."""
    return (_read("nuclei_crop.tif"), _read("nuclei_crop_annotation.tif"),
            _read("nuclei_crop_labels.tif"))
