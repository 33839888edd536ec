"""npe2 reader for napari-unet models: opening one makes it the widgets' model.

Accepted: napari-unet ``.safetensors`` model files and bioimage.io packages (``.zip``, or
the ``rdf.yaml`` of an unzipped package: napari matches folders by name, so the manifest
does not claim folders, which would make napari ask about every folder opened). Other
safetensors files (any other tool's weights) and zips that are not bioimage.io packages get
``None``, so napari offers them to other readers. A model is not a layer: the reader
registers it with the widgets (it appears, selected, in the Segment and Train widgets' model
choice) and returns napari's "no layers" sentinel ``[(None,)]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_SUFFIX = ".safetensors"


def is_napari_unet_file(path: str | Path) -> bool:
    """True for a ``.safetensors`` file whose header says it is a napari-unet model.

    Reads only the JSON header (a few kB), never the weights.
    """
    from safetensors import SafetensorError, safe_open

    from .model import FORMAT

    p = Path(path)
    if p.suffix != MODEL_SUFFIX or not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return meta.get("format") == FORMAT


def _is_model(path: str | Path) -> bool:
    from .bioimageio import is_package

    return is_napari_unet_file(path) or is_package(path)


def get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """Return :func:`read_model` for napari-unet models and bioimage.io packages, else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if paths and all(_is_model(p) for p in paths):
        return read_model
    return None


def read_model(path: str | list[str]) -> list[tuple]:
    """Load each model into the widgets' model registry; no layers are created."""
    from ._widgets._common import load_model_file, notify_error, notify_info
    from .bioimageio import is_package, napari_unet_config

    paths = [path] if isinstance(path, str | Path) else list(path)
    for p in paths:
        p = Path(p)
        if is_package(p) and napari_unet_config(p) is None:
            # The widgets fine-tune and tile napari-unet's own U-Net; another tool's network
            # can only be run as a whole, which the command line does.
            notify_error(
                f"{p.name} is a bioimage.io model made by another tool: the napari-unet "
                "widgets use napari-unet models only. Run it with `napari-unet segment IMAGE "
                f"--model {p.name}` (2D models through bioimageio.core).")
            continue
        entry = load_model_file(p)
        if entry is not None:
            notify_info(f"model {p.name} loaded: pick {entry.label!r} in the Segment "
                        "or Train widget")
    return [(None,)]
