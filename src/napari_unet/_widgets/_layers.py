"""Viewer layers <-> engine arrays: pickers that follow the viewer, the channel choice of an
image layer, plane indices of the slice on screen, and the plugin's own output layers."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QWidget

from ..normalize import to_gray
from ..segment import output_shape

TAG = "napari_unet"  # key of the plugin's entry in layer.metadata
OUTPUT_ROLES = ("labels", "probabilities", "preview")  # layers the plugin writes


def role(layer: Any) -> str | None:
    """The plugin's role tag of a layer (annotation, labels, preview, ...), or None."""
    meta = layer.metadata.get(TAG)
    return meta.get("role") if isinstance(meta, dict) else None


def is_output(layer: Any) -> bool:
    """Whether the plugin made this layer as a result (never offered as an input)."""
    return role(layer) in OUTPUT_ROLES


# ---------------------------------------------------------------- pickers


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types (never the plugin's outputs).

    With ``follow`` it selects a matching layer when it is added or made active, so one
    click after opening an image acts on that image, not on the previous one.
    """

    def __init__(self, viewer: Any, layer_types: tuple[type, ...], *,
                 none_text: str | None = None, follow: bool = True,
                 parent: QWidget | None = None) -> None:
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
        if follow:
            events.inserted.connect(self._on_inserted)
            viewer.layers.selection.events.active.connect(self._on_active)
        self.refresh()
        active = viewer.layers.selection.active
        if follow and active is not None and self.accepts(active):
            self.set_layer(active)

    def accepts(self, layer: Any) -> bool:
        return isinstance(layer, self.layer_types) and not is_output(layer)

    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        with contextlib.suppress(RuntimeError):  # combo already deleted
            self.refresh()

    def _on_inserted(self, event: Any) -> None:
        if self.accepts(event.value):
            with contextlib.suppress(RuntimeError):
                self.set_layer(event.value)

    def _on_active(self, event: Any) -> None:
        layer = event.value
        if layer is not None and self.accepts(layer) and layer in self.viewer.layers:
            with contextlib.suppress(RuntimeError):
                self.set_layer(layer)

    def refresh(self) -> None:
        current = self.currentText()
        names = [lay.name for lay in self.viewer.layers if self.accepts(lay)]
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


# ---------------------------------------------------------------- channels
# The choice is stored in the image layer's metadata, so Annotate, Train and Segment feed
# the model the same thing (an annotation made on channel 1 trains on channel 1).

MEAN, ALL, GRAY = "mean", "all", "gray"


def layer_array(layer: Any) -> Any:
    """The full-resolution data of an image/labels layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _meta(layer: Any) -> dict:
    meta = layer.metadata.get(TAG)
    if not isinstance(meta, dict):
        meta = {}
        layer.metadata[TAG] = meta
    return meta


def channel_axis(layer: Any | None) -> int | None:
    """The axis of an image layer holding channels (the last one for RGB), or None."""
    if layer is None:
        return None
    if getattr(layer, "rgb", False):
        return layer.ndim  # data has one axis more than the layer's (spatial) ndim
    meta = layer.metadata.get(TAG)
    return meta.get("channel_axis") if isinstance(meta, dict) else None


def channel_pick(layer: Any | None) -> int | str:
    """Which channel feeds the model: an index, ``"mean"`` or ``"all"`` (as model input)."""
    meta = layer.metadata.get(TAG) if layer is not None else None
    # RGB becomes grey as the CLI's --rgb gray does (luma, as the bundled model's colour
    # training images were stored).
    default: int | str = GRAY if getattr(layer, "rgb", False) else 0
    return meta.get("channel", default) if isinstance(meta, dict) else default


def remember_channels(layer: Any, axis: int | None, pick: int | str | None = None) -> None:
    """Store the channel axis (ignored for RGB) and the channel choice on the layer."""
    meta = _meta(layer)
    if not getattr(layer, "rgb", False):
        meta["channel_axis"] = axis
    if pick is not None:
        meta["channel"] = pick


def default_channel_axis(layer: Any | None) -> int | None:
    """The channel axis remembered for a (non-RGB) image layer."""
    return None if layer is None or getattr(layer, "rgb", False) else channel_axis(layer)


def remember_channel_axis(layer: Any, axis: int | None) -> None:
    remember_channels(layer, axis)


class ChannelView:
    """A lazy view of an image with its channel axis reduced to one channel or their mean,
    or (``"all"``) moved to the front; reads only the planes asked for."""

    def __init__(self, data: Any, axis: int, pick: int | str) -> None:
        self.data, self.axis, self.pick = data, axis, pick
        shape = list(data.shape)
        n = shape.pop(axis)
        self.shape = tuple([n, *shape] if pick == ALL else shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32) if pick in (MEAN, GRAY) else np.dtype(data.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = list(key) if isinstance(key, tuple) else [key]
        key += [slice(None)] * (self.ndim - len(key))
        if self.pick == ALL:
            c = key.pop(0)
            key.insert(self.axis, c)
            block = np.asarray(self.data[tuple(key)])
            if isinstance(c, int):
                return block
            kept = self.axis - sum(isinstance(k, int) for k in key[: self.axis])
            return np.moveaxis(block, kept, 0)
        key.insert(self.axis, slice(None) if self.pick in (MEAN, GRAY) else int(self.pick))
        block = np.asarray(self.data[tuple(key)])
        if self.pick in (MEAN, GRAY):
            kept = self.axis - sum(isinstance(k, int) for k in key[: self.axis])
            if self.pick == GRAY:
                return to_gray(np.moveaxis(block, kept, -1))
            return block.mean(axis=kept, dtype=np.float32)
        return block

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[tuple([slice(None)] * self.ndim)]
        return out if dtype is None else out.astype(dtype)


def n_channels(layer: Any) -> int:
    """How many channels the image has on its channel axis (1 without one)."""
    axis = channel_axis(layer)
    return 1 if axis is None else int(layer_array(layer).shape[axis])


def model_input(layer: Any) -> tuple[Any, int | None]:
    """(array, channel axis) the engine segments or trains on, per the layer's choice."""
    data, axis = layer_array(layer), channel_axis(layer)
    if axis is None:
        return data, None
    pick = channel_pick(layer)
    if pick == ALL and not getattr(layer, "rgb", False):
        return data, axis
    if isinstance(pick, int) and not 0 <= pick < data.shape[axis]:
        pick = 0
    view = ChannelView(data, axis, pick)
    return view, (0 if pick == ALL else None)


def model_channels(layer: Any) -> int:
    """How many channels the model receives from this layer."""
    return n_channels(layer) if channel_pick(layer) == ALL else 1


class ChannelPicker(QWidget):
    """Channel axis (none, or one of the axes before Y, X; fixed for RGB) and which channel
    of it to use: one channel, their mean, or all of them (a multi-channel model)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip("axis of the image that holds channels (not Z or T); "
                                   "single-channel images have none")
        self.pick_combo = QComboBox()
        self.pick_combo.setToolTip("which channel the model sees: one channel, the mean of "
                                   "all, or all of them (for a model trained on N channels)")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.axis_combo, 1)
        lay.addWidget(self.pick_combo, 1)
        self.layer: Any = None
        self.axis_combo.currentIndexChanged.connect(self._on_axis)
        self.pick_combo.currentIndexChanged.connect(self._on_pick)
        self.changed = self.pick_combo.currentIndexChanged  # emitted on every change
        self.set_layer(None)

    def set_layer(self, layer: Any | None) -> None:
        """Show (and from now on edit) the channel choice of ``layer``."""
        self.layer = layer
        self.axis_combo.blockSignals(True)
        self.axis_combo.clear()
        if layer is not None and getattr(layer, "rgb", False):
            n = layer_array(layer).shape[-1]
            self.axis_combo.addItem(f"RGB ({n} channels)", channel_axis(layer))
        else:
            shape = tuple(layer_array(layer).shape) if layer is not None else ()
            self.axis_combo.addItem("none", None)
            for axis in range(max(len(shape) - 2, 0)):
                self.axis_combo.addItem(f"axis {axis} (size {shape[axis]})", axis)
            idx = self.axis_combo.findData(default_channel_axis(layer))
            self.axis_combo.setCurrentIndex(max(idx, 0))
        self.axis_combo.setEnabled(self.axis_combo.count() > 1)
        self.axis_combo.blockSignals(False)
        self._fill_picks()

    def _fill_picks(self) -> None:
        layer = self.layer
        axis = channel_axis(layer)
        self.pick_combo.blockSignals(True)
        self.pick_combo.clear()
        if layer is not None and axis is not None:
            n = layer_array(layer).shape[axis]
            names = ["red", "green", "blue", "alpha"] if getattr(layer, "rgb", False) else []
            for k in range(n):
                self.pick_combo.addItem(f"channel {k}" + (f" ({names[k]})" if k < len(names)
                                                          else ""), k)
            if getattr(layer, "rgb", False):
                self.pick_combo.addItem("grey (luma)", GRAY)
            self.pick_combo.addItem("mean of channels", MEAN)
            self.pick_combo.addItem(f"all {n} (N-channel model)", ALL)
            idx = self.pick_combo.findData(channel_pick(layer))
            self.pick_combo.setCurrentIndex(max(idx, 0))
        else:
            self.pick_combo.addItem("–", None)
        self.pick_combo.setEnabled(axis is not None)
        self.pick_combo.blockSignals(False)
        self.changed.emit(self.pick_combo.currentIndex())

    def _on_axis(self, *_: Any) -> None:
        if self.layer is not None:
            remember_channels(self.layer, self.axis_combo.currentData())
        self._fill_picks()
        self._on_pick()

    def _on_pick(self, *_: Any) -> None:
        if self.layer is not None and self.pick_combo.currentData() is not None:
            remember_channels(self.layer, default_channel_axis(self.layer),
                              self.pick_combo.currentData())

    def value(self) -> int | None:
        """The channel axis (None: none; for RGB the data's last axis)."""
        return channel_axis(self.layer)

    def set_value(self, axis: int | None) -> None:
        idx = self.axis_combo.findData(axis)
        if idx >= 0:
            self.axis_combo.setCurrentIndex(idx)

    def set_pick(self, pick: int | str) -> None:
        idx = self.pick_combo.findData(pick)
        if idx >= 0:
            self.pick_combo.setCurrentIndex(idx)


def image_problem(layer: Any | None) -> str | None:
    """Why an image layer cannot be fed to the model (in GUI terms), or None."""
    if layer is None:
        return ("no image layer: open an image (File > Open, or File > Open Sample > "
                "napari U-Net) and pick it under 'Image'")
    if layer.ndim < 2:
        return f"layer {layer.name!r} has {layer.ndim} dimension(s); an image needs Y and X"
    return None


def stack_hint(layer: Any | None) -> str | None:
    """A hint when a small leading axis may be channels read as planes, else None."""
    if layer is None or channel_axis(layer) is not None:
        return None
    shape = tuple(layer_array(layer).shape)
    for axis, size in enumerate(shape[:-2]):
        if size <= 4:
            return (f"axis {axis} of {layer.name!r} has {size} planes: they are segmented as "
                    "separate planes; if they are channels, choose that axis under 'Channels'")
    return None


def label_shape(layer: Any, axis: Any = "layer") -> tuple[int, ...]:
    """Shape of an image layer's labels: without its channel axis (or RGB axis)."""
    shape = tuple(layer_array(layer).shape)
    if getattr(layer, "rgb", False):
        return shape[:-1]
    return output_shape(shape, channel_axis(layer) if axis == "layer" else axis)


# ---------------------------------------------------------------- planes on screen


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


def input_plane_key(viewer: Any, layer: Any) -> tuple:
    """The key of the plane on screen in the array :func:`model_input` gives for ``layer``."""
    axis = channel_axis(layer)
    key = plane_key(viewer, layer, axis)
    data, _ = model_input(layer)
    if axis is None or data is layer_array(layer):
        return key
    rest = tuple(k for j, k in enumerate(key) if j != axis)
    return (slice(None), *rest) if channel_pick(layer) == ALL else rest


def lead_index(key: tuple, channel_axis: int | None) -> tuple[int, ...]:
    """The integer (Z/T...) indices of a plane key, without channel/YX axes."""
    return tuple(k for j, k in enumerate(key) if j != channel_axis and isinstance(k, int))


def annotation_plane_key(ann_shape: tuple[int, ...], lead: tuple[int, ...]) -> tuple:
    """Index of one plane in an annotation (no channel axis) from its leading indices."""
    return tuple(lead) + (slice(None),) * (len(ann_shape) - len(lead))


# ---------------------------------------------------------------- output layers


def owned_layer(viewer: Any, role_name: str, image_name: str) -> Any | None:
    """The plugin's own output layer (``role``: labels, probabilities, preview) for an image."""
    for layer in viewer.layers:
        meta = layer.metadata.get(TAG)
        if isinstance(meta, dict) and meta.get("role") == role_name and \
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


def compact_labels(data: Any) -> Any:
    """In-memory labels in the smallest unsigned type that holds them: napari shows uint8 /
    uint16 labels without building a colour lookup over every pixel, which for a 2048² or 3D
    result froze the GUI for seconds. Run it in the worker: it reads every pixel."""
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iu" or data.size == 0:
        return data
    top = int(data.max())
    if data.min() < 0:
        return data
    for dtype in (np.uint8, np.uint16):
        if top <= np.iinfo(dtype).max:
            return data.astype(dtype)
    return data


def fits_dtype(data: np.ndarray, dtype: np.dtype) -> bool:
    """Whether integer ``data`` can be stored as ``dtype`` without changing a value."""
    if data.dtype == dtype:
        return True
    if data.dtype.kind not in "iu" or np.dtype(dtype).kind not in "iu":
        return np.can_cast(data.dtype, dtype, casting="safe")
    if data.size == 0 or np.can_cast(data.dtype, dtype, casting="safe"):
        return True
    info = np.iinfo(dtype)
    return info.min <= int(data.min()) and int(data.max()) <= info.max


def write_in_place(layer: Any, data: Any, *, thumbnail: bool = True) -> bool:
    """Copy ``data`` into the layer's own array and refresh the view; False when the
    layer's array cannot take it (not a writable numpy array, another shape, values its
    dtype cannot hold).

    ``layer.data = ...`` on a Labels layer rebuilds its colormap texture and re-links
    the shader on every call (100-350 ms of the GUI thread under software OpenGL for a
    uint16 layer); a copy plus ``refresh()`` only re-slices and uploads the texture.
    ``thumbnail=False`` also skips the layer-list thumbnail (a zoom of the whole slice).
    """
    old = layer.data
    if not (isinstance(old, np.ndarray) and isinstance(data, np.ndarray)) or old is data \
            or old.shape != data.shape or not old.flags.writeable or \
            not fits_dtype(data, old.dtype):
        return False
    np.copyto(old, data, casting="unsafe")
    layer.refresh(thumbnail=thumbnail)
    return True


def put_output(viewer: Any, data: Any, image_layer: Any, role_name: str, kind: str = "labels",
               channel_axis: int | None = None, *, thumbnail: bool = True,
               **kwargs: Any) -> Any:
    """Replace the data of the plugin's own ``role`` layer for this image, or add one.

    A user's layer that merely has the same name is never touched: the new layer gets a
    free name instead. The layer is tagged ``metadata["napari_unet"] = {"role": role,
    "image": image name}``. An existing layer of the same shape gets the new values in
    place (:func:`write_in_place`): the cheap update for a live preview or a result that
    :func:`placeholder_output` prepared (``thumbnail=False``: without redrawing the
    layer-list thumbnail, for frequent updates such as a live preview).
    """
    scale, translate = spatial_transform(image_layer, channel_axis, np.ndim(data))
    kwargs.setdefault("scale", scale)
    kwargs.setdefault("translate", translate)
    layer = owned_layer(viewer, role_name, image_layer.name)
    if layer is not None and layer.ndim == np.ndim(data):
        # Every property set re-slices the layer and redraws its thumbnail: set only what
        # changed, and the data last.
        for key, value in kwargs.items():
            if key in ("name", "metadata"):
                continue
            with contextlib.suppress(Exception):
                current = getattr(layer, key)
                if not np.array_equal(np.asarray(current, dtype=object),
                                      np.asarray(value, dtype=object)):
                    setattr(layer, key, value)
        old = layer.data
        if data is old:  # the same array (or zarr store) written in place: show it
            layer.refresh()
        elif not write_in_place(layer, data, thumbnail=thumbnail):
            layer.data = data
        return layer
    if layer is not None:  # dimensionality changed: replace our own layer
        kwargs.setdefault("name", layer.name)
        viewer.layers.remove(layer)
    kwargs.setdefault("name", f"{image_layer.name} {role_name}")
    kwargs["name"] = free_name(viewer, kwargs["name"])
    kwargs["metadata"] = {TAG: {"role": role_name, "image": image_layer.name}}
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, **kwargs)


def placeholder_output(viewer: Any, data: Any, image_layer: Any, role_name: str,
                       kind: str = "labels", *, keep_active: bool = False,
                       **kwargs: Any) -> Any | None:
    """Add the plugin's own ``role`` layer for this image, holding ``data`` (zeros, or the
    array the worker fills), before a worker starts; None when one of that
    dimensionality exists already (the result then updates it).

    Adding a layer costs napari 0.2-0.9 s of the GUI thread (controls, overlays, shaders;
    more on a busy CPU): done on the click, before the worker competes for the CPU, the
    result or preview arriving later only updates data (:func:`put_output`).
    ``keep_active``: leave the active layer as it was (someone may be painting).
    """
    own = owned_layer(viewer, role_name, image_layer.name)
    if own is not None and own.ndim == np.ndim(data):
        return None
    active = viewer.layers.selection.active
    with _not_activated(viewer.layers) if keep_active else contextlib.nullcontext():
        layer = put_output(viewer, data, image_layer, role_name, kind=kind, **kwargs)
    if keep_active and active is not None and active in viewer.layers and \
            viewer.layers.selection.active is not active:
        viewer.layers.selection.active = active
    return layer


@contextlib.contextmanager
def _not_activated(layers: Any) -> Any:
    """Insert layers without making them active: each change of the active layer rebuilds
    napari's layer controls (twice, with the restore). Uses napari's private switch where
    it exists; elsewhere the caller restores the active layer afterwards."""
    if not hasattr(layers, "_activate_on_insert"):
        yield
        return
    before = layers._activate_on_insert
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = before


def remove_layers(viewer: Any, layers: list[Any]) -> None:
    """Remove those of ``layers`` still in the viewer (placeholders of a discarded run)."""
    for layer in layers:
        if layer in viewer.layers:
            viewer.layers.remove(layer)
