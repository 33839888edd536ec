"""npe2 sample data: the bundled nuclei crop with its sparse annotation."""

from __future__ import annotations

from typing import Any

from .sample import SAMPLE_SOURCE, load_sample

SAMPLE_NAME = "nuclei"


def nuclei_sample() -> list[tuple[Any, dict, str]]:
    """The sample image and its sparse annotation (0 not annotated, 1 background, >=2 cells)."""
    image, annotation, _truth = load_sample()
    return [
        (image, {"name": SAMPLE_NAME, "metadata": {"source": SAMPLE_SOURCE}}, "image"),
        (annotation, {
            "name": f"{SAMPLE_NAME} annotation",
            "metadata": {"napari_unet": {"role": "annotation", "image": SAMPLE_NAME,
                                         "complete_planes": []},
                         "source": SAMPLE_SOURCE},
            "opacity": 0.6,
        }, "labels"),
    ]
