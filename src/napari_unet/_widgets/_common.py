"""Shared pieces of the napari widgets: layer pickers, the model registry, notifications,
plugin-owned output layers and small helpers that map viewer state to engine arguments.

Nothing here computes anything the engine computes; it only gathers arguments and places
results into layers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QMessageBox,
    QPushButton,
    QWidget,
)

from ..model import ModelFileError, UNet, bundled_model_path, load_model
from ..segment import output_shape

logger = logging.getLogger(__name__)
TAG = "napari_unet"  # key of the plugin's entry in layer.metadata
DEVICES = ("auto", "cuda", "mps", "cpu")
MODEL_FILTER = "napari-unet model (*.safetensors)"
OPEN_MODEL_FILTER = f"{MODEL_FILTER};;bioimage.io package made by napari-unet (*.zip *.yaml)"

# ---------------------------------------------------------------- notifications
# Widgets call these (never napari's functions directly) so tests can capture them.


def notify_error(message: str) -> None:
    """Tell the user something went wrong and what to do about it."""
    show_error(message)


def notify_warning(message: str) -> None:
    show_warning(message)


def notify_info(message: str) -> None:
    show_info(message)


# ---------------------------------------------------------------- model registry


@dataclass
class ModelEntry:
    """A model the widgets can use: the bundled one, one just trained, or one from a file."""

    label: str
    model: UNet | None = None  # None: load lazily from ``path`` (the bundled model)
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def get(self) -> UNet:
        """The model (loaded from ``path`` on first use)."""
        if self.model is None:
            if self.path is None:
                raise ModelFileError(f"model entry {self.label!r} has neither model nor path")
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"model file {self.path} not found; load a model file with 'Load…'"
                )
            self.model = load_model(self.path)
        return self.model


class ModelRegistry:
    """Models shared between the widgets of one session (fine-tuned, or loaded from files)."""

    added = Signal(object)  # ModelEntry

    def __init__(self) -> None:
        self._entries: list[ModelEntry] = []

    def add(self, model: UNet, label: str, path: Path | None = None, **info: Any) -> ModelEntry:
        """Register a model; widgets offering a model choice list it and select it."""
        base, n = label, 2
        while any(e.label == label for e in self._entries):
            label, n = f"{base} ({n})", n + 1
        entry = ModelEntry(label, model, path, info)
        self._entries.append(entry)
        self.added.emit(entry)
        return entry

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def latest(self, kind: str | None = None) -> ModelEntry | None:
        """The newest entry (of ``info['kind'] == kind`` if given)."""
        for entry in reversed(self._entries):
            if kind is None or entry.info.get("kind") == kind:
                return entry
        return None

    def clear(self) -> None:
        self._entries.clear()


REGISTRY = ModelRegistry()
BUNDLED_LABEL = "bundled model"
SCRATCH_LABEL = "new model (from scratch)"


class ModelPicker(QWidget):
    """Combo box of models (bundled, registry entries, optional from-scratch) + 'Load…'."""

    def __init__(self, parent: QWidget | None = None, *, scratch: bool = False) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setToolTip("bundled pretrained model, a model trained in this session, "
                              "or a .safetensors model file")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("load a napari-unet model file (.safetensors)")
        self.load_button.clicked.connect(self._ask_load)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.combo, 1)
        lay.addWidget(self.load_button)
        self._scratch = scratch
        self._entries: dict[str, ModelEntry | None] = {}
        self.refresh()
        REGISTRY.added.connect(self._on_added)  # weak: dropped with this widget

    def refresh(self, select: str | None = None) -> None:
        current = select or self.combo.currentText()
        self._entries = {BUNDLED_LABEL: ModelEntry(BUNDLED_LABEL, path=bundled_model_path())}
        for entry in REGISTRY.entries():
            self._entries[entry.label] = entry
        if self._scratch:
            self._entries[SCRATCH_LABEL] = None
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems(list(self._entries))
        self.combo.blockSignals(False)
        if current in self._entries:
            self.combo.setCurrentText(current)

    def _on_added(self, entry: ModelEntry) -> None:
        with contextlib.suppress(RuntimeError):  # widget already deleted
            self.refresh(select=entry.label)

    def _ask_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load a napari-unet model", "",
                                              OPEN_MODEL_FILTER)
        if path:
            self.load_file(path)

    def load_file(self, path: str | Path) -> ModelEntry | None:
        """Load a model file into the registry and select it; notifies on failure."""
        entry = load_model_file(path)
        if entry is not None:
            self.refresh(select=entry.label)
        return entry

    def label(self) -> str:
        return self.combo.currentText()

    def set_label(self, label: str) -> None:
        self.combo.setCurrentText(label)

    def is_scratch(self) -> bool:
        return self.combo.currentText() == SCRATCH_LABEL

    def model(self) -> UNet | None:
        """The chosen model (None for 'from scratch'); raises ModelFileError/FileNotFoundError."""
        entry = self._entries.get(self.combo.currentText())
        if entry is None:
            if self.is_scratch():
                return None
            raise ModelFileError("no model selected")
        return entry.get()


def load_model_file(path: str | Path) -> ModelEntry | None:
    """Load a model file and register it; None (after notifying) when it is not usable."""
    path = Path(path)
    try:
        model = load_model(path)
    except (ModelFileError, FileNotFoundError, OSError) as exc:
        notify_error(f"cannot use {path.name} as a model: {exc}")
        return None
    return REGISTRY.add(model, f"file: {path.name}", path=path, kind="file")


# ---------------------------------------------------------------- layer pickers


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of some types, kept up to date."""

    def __init__(self, viewer: Any, layer_types: tuple[type, ...], *,
                 none_text: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_types = layer_types
        self.none_text = none_text
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            emitter.connect(self._on_layers_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self.refresh()

    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.refresh()

    def refresh(self) -> None:
        current = self.currentText()
        names = [lay.name for lay in self.viewer.layers if isinstance(lay, self.layer_types)]
        if self.none_text is not None:
            names.insert(0, self.none_text)
        if names == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any | None:
        """The chosen layer, or None."""
        name = self.currentText()
        if not name or name == self.none_text or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        return layer if isinstance(layer, self.layer_types) else None

    def set_layer(self, layer: Any | None) -> None:
        self.refresh()
        self.setCurrentText(self.none_text if layer is None else layer.name)


class ChannelAxisCombo(QComboBox):
    """Which axis of an image holds channels: none, or one of the axes before Y, X."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setToolTip("axis of the image that holds channels (not a Z/T axis); most "
                        "single-channel images have none")
        self.set_shape(())

    def set_shape(self, shape: tuple[int, ...], default: int | None = None) -> None:
        self.blockSignals(True)
        self.clear()
        self.addItem("none", None)
        for axis in range(max(len(shape) - 2, 0)):
            self.addItem(f"axis {axis} (size {shape[axis]})", axis)
        if default is not None and 0 <= default < len(shape) - 2:
            self.setCurrentIndex(default + 1)
        self.blockSignals(False)

    def value(self) -> int | None:
        return self.currentData()

    def set_value(self, axis: int | None) -> None:
        idx = self.findData(axis)
        if idx >= 0:
            self.setCurrentIndex(idx)


def camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def device_combo(parent: QWidget | None = None) -> QComboBox:
    combo = QComboBox(parent)
    combo.addItems(DEVICES)
    combo.setToolTip("auto: CUDA GPU, then Apple MPS, then CPU")
    return combo


# ---------------------------------------------------------------- image layers -> arrays


def layer_array(layer: Any) -> Any:
    """The full-resolution data of an image/labels layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def image_problem(layer: Any | None) -> str | None:
    """Why an image layer cannot be fed to the model, or None."""
    if layer is None:
        return "no image layer: open or pick an image (File > Open) first"
    if getattr(layer, "rgb", False):
        return (f"{layer.name!r} is an RGB image, which the model cannot take: convert it to "
                "a single channel (right-click the layer > Convert > Split RGB, and pick "
                "one channel) or reopen it as grey levels")
    if layer.ndim < 2:
        return f"{layer.name!r} has {layer.ndim} dimension(s); an image needs at least Y, X"
    return None


def label_shape(layer: Any, channel_axis: int | None) -> tuple[int, ...]:
    """Shape of an image layer's labels: without its channel axis (or RGB axis)."""
    shape = tuple(layer_array(layer).shape)
    if getattr(layer, "rgb", False):
        return shape[:-1]
    return output_shape(shape, channel_axis)


def default_channel_axis(layer: Any | None) -> int | None:
    """The channel axis remembered for this image layer (set by any widget)."""
    if layer is None:
        return None
    meta = layer.metadata.get(TAG)
    return meta.get("channel_axis") if isinstance(meta, dict) else None


def remember_channel_axis(layer: Any, axis: int | None) -> None:
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        meta = {}
        layer.metadata[TAG] = meta
    meta["channel_axis"] = axis


def plane_key(viewer: Any, layer: Any, channel_axis: int | None) -> tuple:
    """Index tuple of the plane of ``layer`` shown at the viewer's current position.

    Uses the engine's plane-key convention: an int for every leading axis, ``slice(None)``
    for the channel axis and the last two (Y, X) axes.
    """
    shape = tuple(layer_array(layer).shape)
    nd = len(shape) - (1 if getattr(layer, "rgb", False) else 0)
    data_pos = np.asarray(layer.world_to_data(viewer.dims.point))
    key: list[Any] = [slice(None)] * len(shape)
    for axis in range(nd - 2):
        if axis == channel_axis:
            continue
        key[axis] = int(np.clip(np.round(data_pos[axis]), 0, shape[axis] - 1))
    return tuple(key)


def lead_index(key: tuple, channel_axis: int | None) -> tuple[int, ...]:
    """The integer (Z/T...) indices of a plane key, without channel/YX axes."""
    return tuple(k for j, k in enumerate(key) if j != channel_axis and isinstance(k, int))


def annotation_plane_key(ann_shape: tuple[int, ...], lead: tuple[int, ...]) -> tuple:
    """Index of one plane in an annotation (no channel axis) from its leading indices."""
    return tuple(lead) + (slice(None),) * (len(ann_shape) - len(lead))


# ---------------------------------------------------------------- annotation bookkeeping


def annotation_meta(layer: Any) -> dict:
    """The plugin's metadata dict of an annotation layer (created when missing)."""
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        meta = {"role": "annotation"}
        layer.metadata[TAG] = meta
    return meta


def complete_planes(layer: Any) -> set[tuple[int, ...]]:
    """Leading indices of the planes declared fully annotated (``()`` for a 2D image)."""
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        return set()
    return {tuple(p) for p in meta.get("complete_planes", [])}


def set_plane_complete(layer: Any, lead: tuple[int, ...], complete: bool) -> None:
    planes = complete_planes(layer)
    if complete:
        planes.add(tuple(lead))
    else:
        planes.discard(tuple(lead))
    annotation_meta(layer)["complete_planes"] = sorted(planes)


def regions_layer_name(image_name: str) -> str:
    return f"{image_name} complete regions"


def find_regions_layer(viewer: Any, image_name: str) -> Any | None:
    """The Shapes layer holding an image's fully-annotated rectangles, if any."""
    from napari.layers import Shapes

    name = regions_layer_name(image_name)
    if name in viewer.layers and isinstance(viewer.layers[name], Shapes):
        return viewer.layers[name]
    return None


def complete_mask(viewer: Any, image_name: str, annotation: Any) -> np.ndarray | None:
    """Bool mask (annotation shape) of the pixels declared fully annotated, or None."""
    shape = tuple(annotation.data.shape)
    mask = None
    regions = find_regions_layer(viewer, image_name)
    if regions is not None and len(regions.data):
        if regions.ndim != len(shape):
            raise ValueError(
                f"the complete-regions layer {regions.name!r} has {regions.ndim} dimensions "
                f"but the annotation has {len(shape)}; delete it and draw the rectangles again"
            )
        mask = np.asarray(regions.to_masks(shape)).any(axis=0)
    planes = complete_planes(annotation)
    if planes:
        mask = np.zeros(shape, bool) if mask is None else mask
        for lead in planes:
            if len(lead) == len(shape) - 2:
                mask[annotation_plane_key(shape, lead)] = True
    return mask


# ---------------------------------------------------------------- output layers


def owned_layer(viewer: Any, role: str, image_name: str) -> Any | None:
    """The plugin's own output layer (``role``: labels, probabilities, preview) for an image."""
    for layer in viewer.layers:
        meta = layer.metadata.get(TAG)
        if isinstance(meta, dict) and meta.get("role") == role and \
                meta.get("image") == image_name:
            return layer
    return None


def free_name(viewer: Any, name: str) -> str:
    """``name``, or ``name [n]`` when a layer already has it."""
    if name not in viewer.layers:
        return name
    n = 1
    while f"{name} [{n}]" in viewer.layers:
        n += 1
    return f"{name} [{n}]"


def spatial_transform(image_layer: Any, channel_axis: int | None,
                      ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translate for an ``ndim``-D layer aligned with the image's trailing axes."""
    scale = list(np.asarray(image_layer.scale, float))
    translate = list(np.asarray(image_layer.translate, float))
    if channel_axis is not None and not getattr(image_layer, "rgb", False):
        del scale[channel_axis], translate[channel_axis]
    scale, translate = scale[-ndim:], translate[-ndim:]
    pad = ndim - len(scale)
    return tuple([1.0] * pad + scale), tuple([0.0] * pad + translate)


def put_output(viewer: Any, data: Any, image_layer: Any, role: str, kind: str = "labels",
               channel_axis: int | None = None, **kwargs: Any) -> Any:
    """Replace the data of the plugin's own ``role`` layer for this image, or add one.

    A user's layer that merely has the same name is never touched: the new layer gets a
    free name instead. The layer is tagged ``metadata["napari_unet"] = {"role": role,
    "image": image name}``.
    """
    scale, translate = spatial_transform(image_layer, channel_axis, np.ndim(data))
    kwargs.setdefault("scale", scale)
    kwargs.setdefault("translate", translate)
    layer = owned_layer(viewer, role, image_layer.name)
    if layer is not None and layer.ndim == np.ndim(data):
        layer.data = data
        for key, value in kwargs.items():
            if key not in ("name", "metadata"):
                with contextlib.suppress(Exception):
                    setattr(layer, key, value)
        layer.refresh()
        return layer
    if layer is not None:  # dimensionality changed: replace our own layer
        kwargs.setdefault("name", layer.name)
        viewer.layers.remove(layer)
    kwargs.setdefault("name", f"{image_layer.name} {role}")
    kwargs["name"] = free_name(viewer, kwargs["name"])
    kwargs["metadata"] = {TAG: {"role": role, "image": image_layer.name}}
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, **kwargs)


# ---------------------------------------------------------------- worker helpers


@dataclass
class Failure:
    """What a worker returns instead of raising (see :func:`guarded`)."""

    error: BaseException
    traceback: str = ""


def guarded(gen: Generator) -> Generator:
    """Run a generator in a worker; an exception comes back as a returned :class:`Failure`.

    Two reasons: superqt workers treat a RuntimeError from the generator as "worker deleted"
    and then emit neither ``errored`` nor ``finished`` (torch raises RuntimeError for many
    real failures), and napari's workers relay ``errored`` as a raw traceback notification
    on top of the widget's own explanation.
    """
    try:
        return (yield from gen)
    except Exception as exc:
        text = traceback.format_exc()
        logger.warning("napari-unet worker failed:\n%s", text)
        return Failure(exc, text)


def make_worker(gen: Generator, *, yielded: Callable, returned: Callable, errored: Callable,
                finished: Callable) -> Any:
    """A napari generator worker (not started) running ``gen`` under :func:`guarded`."""
    from napari.qt.threading import create_worker

    worker = create_worker(
        guarded, gen, _start_thread=False,
        _connect={"yielded": yielded, "returned": returned, "errored": errored,
                  "finished": finished},
    )
    return worker


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def file_stem(layer: Any) -> str:
    """A file-name stem for a layer: its source file's stem, else its sanitised name."""
    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        name = Path(path).name
        return name.split(".")[0] or "image"
    return re.sub(r"[^\w.-]+", "_", layer.name).strip("_") or "image"


def confirm(parent: QWidget | None, question: str) -> bool:
    """Yes/No question (default No)."""
    answer = QMessageBox.question(parent, "napari-unet", question,
                                  QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def bold(text: str) -> str:
    return f"<b>{text}</b>"

