"""npe2 reader for napari-unet model files: opening one makes it the widgets' model.

A model is not a layer, so the reader registers the model with the widgets (it appears,
selected, in the Segment and Train widgets' model choice) and returns napari's "no layers"
sentinel ``[(None,)]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_SUFFIX = ".safetensors"


def get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """Return :func:`read_model` for ``*.safetensors`` paths, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(str(p).endswith(MODEL_SUFFIX) for p in paths):
        return read_model
    return None


def read_model(path: str | list[str]) -> list[tuple]:
    """Load each model file into the widgets' model registry; no layers are created."""
    from ._widgets._common import load_model_file, notify_info

    paths = [path] if isinstance(path, str) else list(path)
    for p in paths:
        entry = load_model_file(Path(p))
        if entry is not None:
            notify_info(f"model {Path(p).name} loaded: pick {entry.label!r} in the Segment "
                        "or Train widget")
    return [(None,)]
