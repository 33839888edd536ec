"""Segment widget: run a model over an image layer (2D, Z/T stacks) in a worker thread.

Up front: the image, its channel, the model, whole stack or slice on screen, 3D objects,
and Segment. Tiling, device, post-processing, the labels store and probabilities are under
"Advanced" (forms generated from InferenceConfig / PostprocessConfig). The result goes into
the plugin's own Labels layer "<image> labels", which a re-run replaces; a user's layer is
never overwritten. Stacks default to linking the planes' cells into 3D objects along Z.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

from .. import io
from ..device import select_device
from ..model import ModelFileError, UNet
from ..params import ConfigError
from ..postprocess import CALIBRATED, PostprocessConfig, recommended
from ..segment import (
    InferenceConfig,
    PlaneSink,
    Predictor,
    SegmentProgress,
    check_image,
    label_key,
    output_shape,
    segment_image,
)
from ..stitch import StitchProgress, stitch_planes_iter
from . import _layers as L
from . import _shortcuts as _keys
from . import _ui
from ._forms import ConfigForm, Settings
from ._models import DEVICES, ModelPicker
from ._worker import Job, JobRunner, warm_up

WHOLE, CURRENT = "whole image / stack", "current slice"
NO_STITCH = "no: objects per plane"


def memory_budget() -> int:
    """Bytes of labels the widget holds in memory before it asks for an on-disk store."""
    try:
        import psutil  # a napari dependency
    except ImportError:
        return 2**31
    return int(psutil.virtual_memory().available) // 4


class _Written:
    """Wraps the output array and records which planes the engine wrote (for Cancel)."""

    def __init__(self, out: Any) -> None:
        self.out, self.planes = out, 0
        self.shape, self.dtype, self.ndim = out.shape, out.dtype, out.ndim

    def __setitem__(self, key: Any, value: Any) -> None:
        self.out[key] = value
        self.planes += 1

    def __getitem__(self, key: Any) -> Any:
        return self.out[key]

    def __getattr__(self, name: str) -> Any:  # attrs of a zarr store, chunks, ...
        return getattr(self.out, name)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.out, dtype=dtype)


class _SegmentJob(Job):
    def __init__(self, image_name: str, channel_axis: int | None, scope: str, out: Any,
                 probabilities: Any, key: tuple | None, store: Path | None,
                 mode: str) -> None:
        super().__init__()
        self.image_name, self.channel_axis, self.scope = image_name, channel_axis, scope
        self.out, self.probabilities, self.key, self.store = out, probabilities, key, store
        self.mode = mode
        self.linking = False  # stitching started: it runs to the end
        self.written: Any = None  # the output wrapper counting finished planes
        self.last: SegmentProgress | None = None
        self.placeholders: list[Any] = []  # layers added for this run before it started
        self.top: int | None = None  # largest id after merging the current slice, if known


@dataclass
class _Output:
    """What the worker returns: the output array and, for labels held in memory, their
    compact copy and largest id (worked out in the worker: both read every pixel, tens of
    ms for 2048² that the GUI thread spent before)."""

    out: Any
    labels: Any = None
    top: int | None = None
    offset: int | None = None  # largest id of the existing labels (current slice)


def _segment_job(model: UNet, config: InferenceConfig, image: Any, *,
                 stitch: dict[str, Any] | None, cancel: Any, existing: Any = None,
                 **kwargs: Any) -> Any:
    """The worker's generator: put the model on its device, segment plane by plane, then
    optionally link the planes' objects into 3D objects (in place); returns an
    :class:`_Output`. ``existing``: the labels one slice is added to (their largest id,
    read here, offsets the slice's ids)."""
    predictor = Predictor(model, config)
    out = yield from segment_image(image, predictor, cancel=cancel, **kwargs)
    if stitch is not None and not cancel():
        # Once started, stitching runs to the end: its second pass renumbers the planes in
        # place, and stopping half-way would leave old and new ids mixed.
        out = yield from stitch_planes_iter(out, out=out, **stitch)
    if existing is not None:
        return _Output(out, offset=int(existing.max()) if existing.size else 0)
    raw = out.out if isinstance(out, _Written) else out
    if isinstance(raw, np.ndarray):
        labels = L.compact_labels(raw)
        return _Output(out, labels, int(labels.max()) if labels.size else 0)
    return _Output(out)


class SegmentWidget(_ui.TabbedDock, QWidget):
    """Segment an image layer with the bundled, a just fine-tuned or a file model."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job: _SegmentJob | None = None

        self.image_combo = L.LayerCombo(napari_viewer, (Image,))
        self.channel_combo = L.ChannelPicker()
        self.model_picker = ModelPicker()
        self.model_info = QLabel()  # which model, and how it scored on held-out cells
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # (model label, image name) pairs the user agreed to segment although the model
        # was fine-tuned on other images: asked once each.
        self._confirmed: set[tuple[str, str]] = set()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([WHOLE, CURRENT])
        self.stitch_combo = QComboBox()
        self.stitch_combo.setToolTip("link each plane's cells to the overlapping cells of the "
                                     "neighbouring planes along this axis (3D objects)")
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("stop after the current tile; finished planes are kept "
                                      "(untick 'keep finished planes' to discard them)")
        self.progress = _ui.ProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status = _ui.StatusBox()

        # Advanced: forms generated from the engine's configuration dataclasses.
        self.inference_form = ConfigForm(
            InferenceConfig, [], ["tile", "overlap", "batch_size", "device", "precision",
                                  "blend", "margin", "tta", "rescale", "object_diameter"],
            overrides={"device": {"widget_type": "ComboBox", "choices": list(DEVICES)}})
        self.post_form = ConfigForm(PostprocessConfig, [],
                                    ["mode", "min_size", "foreground_threshold",
                                     "seed_threshold", "min_seed_size", "smooth_sigma",
                                     "fill_holes"])
        self.settings = Settings(self.inference_form, self.post_form)
        self.anisotropy_spin = QDoubleSpinBox()
        self.anisotropy_spin.setRange(0.01, 1000.0)
        self.anisotropy_spin.setDecimals(3)
        self.anisotropy_spin.setValue(1.0)
        self.anisotropy_spin.setToolTip("voxel depth along the linking axis / pixel size "
                                        "(from the layer's scale); recorded with the labels")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("in memory")
        self.store_edit.setToolTip("a .zarr folder to write the labels into plane by plane, "
                                   "for stacks whose labels do not fit in memory; shown as a "
                                   "lazy Labels layer")
        store_button = QPushButton("…")
        store_button.setMaximumWidth(32)
        store_button.clicked.connect(self._ask_store)
        self.store_box = QWidget()
        store_row = QHBoxLayout(self.store_box)
        store_row.setContentsMargins(0, 0, 0, 0)
        store_row.addWidget(self.store_edit)
        store_row.addWidget(store_button)
        self.probs_check = QCheckBox("Also add class probabilities (Image layer)")
        self.keep_partial_check = QCheckBox("Keep finished planes when cancelled")
        self.keep_partial_check.setChecked(True)

        body = QWidget()
        layout = _ui.scrolled(self, body)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Channels", self.channel_combo)
        form.addRow("Model", self.model_picker)
        form.addRow("", self.model_info)
        form.addRow("Segment", self.scope_combo)
        form.addRow("3D objects", self.stitch_combo)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(_keys.key_hint(_keys.SEGMENT))
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        extra = QWidget()
        extra_form = QFormLayout(extra)
        extra_form.setContentsMargins(0, 0, 0, 0)
        extra_form.addRow(self.inference_form.native(advanced=True))
        extra_form.addRow(self.post_form.native(advanced=True))
        extra_form.addRow("Anisotropy", self.anisotropy_spin)
        extra_form.addRow("Labels store", self.store_box)
        extra_form.addRow(self.probs_check)
        extra_form.addRow(self.keep_partial_check)
        self.advanced = _ui.Collapsible("Advanced settings", extra)
        layout.addWidget(self.advanced)
        # Hook for extra actions (e.g. export, measurements) added by other modules.
        self.actions = QWidget()
        QHBoxLayout(self.actions).setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.actions)
        layout.addStretch(1)

        warm_up()
        self.runner = JobRunner(self, self.run_button, self.cancel_button)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.channel_combo.changed.connect(self._update_scope)
        self.post_form["mode"].changed.connect(self._update_scope)
        self.scope_combo.currentIndexChanged.connect(self._update_scope)
        self.stitch_combo.currentIndexChanged.connect(self._update_anisotropy)
        self.model_picker.combo.currentTextChanged.connect(self._update_model_info)
        self.model_picker.combo.currentTextChanged.connect(self._show_recommended)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.key_segment = _keys.bind(self, napari_viewer, _keys.SEGMENT[0], "_key_segment")
        self._on_image_changed()
        self._update_model_info()
        self._show_recommended()
        _ui.fit_width(self)

    # ------------------------------------------------------------ compatibility names

    @property
    def worker(self) -> Any:
        return self.runner.worker

    # ------------------------------------------------------------ state

    def _on_image_changed(self, *_: Any) -> None:
        image = self.image_combo.layer()
        self.channel_combo.set_layer(image)
        self._update_scope(default_link=True)
        self._update_model_info()
        if not self.is_running():
            self.status.set(L.stack_hint(image) or "ready")

    def _foreign_image(self) -> str | None:
        """What the chosen model was fine-tuned on, when that is not the chosen image."""
        entry, image = self.model_picker.entry(), self.image_combo.layer()
        if entry is None or image is None or entry.info.get("kind") != "finetuned":
            return None
        images = entry.info.get("images") or []
        return None if image.name in images else ", ".join(images) or "other images"

    def _update_model_info(self, *_: Any) -> None:
        """Say which model is chosen, its validation score, and whether it was fine-tuned
        on another image than the one chosen (validation only covered that one)."""
        entry = self.model_picker.entry()
        text = entry.describe() if entry is not None else ""
        other = self._foreign_image()
        if other is not None:
            text += (f"\n⚠ fine-tuned on {other}, not on {self.image_combo.layer().name!r}: "
                     "its validation says nothing about this image; check the result (or "
                     "choose 'bundled model' above)")
        self.model_info.setText(text)
        self.model_info.setStyleSheet("color: #e69138" if other is not None else "")

    def _show_recommended(self, *_: Any) -> None:
        """Put the chosen model's recommended thresholds (``ModelConfig.postprocess``,
        calibrated when it was fine-tuned) in the form, or the defaults where it has none."""
        entry = self.model_picker.entry()
        try:
            settings = entry.get().config.postprocess if entry is not None else {}
        except (ModelFileError, FileNotFoundError, OSError):
            settings = {}  # Segment will say what is wrong with the model
        shown = recommended(settings)
        self.post_form.set(**{k: getattr(shown, k) for k in CALIBRATED if k in self.post_form})

    def _update_scope(self, *_: Any, default_link: bool = False) -> None:
        image = self.image_combo.layer()
        shape = () if image is None else L.label_shape(image)
        stack = len(shape) > 2
        self.scope_combo.setEnabled(stack)
        whole = not stack or self.scope_combo.currentText() == WHOLE
        instances = self.post_form["mode"].value == "instances"
        self.post_form["min_size"].enabled = instances
        previous = self.stitch_combo.currentData()
        self.stitch_combo.blockSignals(True)
        self.stitch_combo.clear()
        self.stitch_combo.addItem(NO_STITCH, None)
        for axis in range(len(shape) - 2):
            self.stitch_combo.addItem(f"link planes along axis {axis} ({shape[axis]})", axis)
        choice = _z_axis(image, shape) if default_link else previous
        if choice is not None and choice < len(shape) - 2:
            self.stitch_combo.setCurrentIndex(choice + 1)
        self.stitch_combo.blockSignals(False)
        self.stitch_combo.setEnabled(stack and whole and instances)
        self.store_box.setEnabled(whole)
        self._update_anisotropy()

    def _update_anisotropy(self, *_: Any) -> None:
        image, axis = self.image_combo.layer(), self.stitch_combo.currentData()
        self.anisotropy_spin.setEnabled(axis is not None and self.stitch_combo.isEnabled())
        if image is None or axis is None:
            return
        ndim = len(L.label_shape(image))
        scale, _ = L.spatial_transform(image, L.default_channel_axis(image), ndim)
        self.anisotropy_spin.setValue(float(scale[axis]) / float(scale[-1]))

    def _ask_store(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Write the labels into a zarr store", "",
                                              "Zarr store (*.zarr)")
        if path:
            self.store_edit.setText(path if path.endswith(".zarr") else f"{path}.zarr")

    def is_running(self) -> bool:
        return self.runner.running()

    def _key_segment(self) -> None:
        """Shift+G: segment, or cancel a running segmentation."""
        if self.is_running():
            self.cancel()
        else:
            self.run()

    # ------------------------------------------------------------ run

    def _fail(self, message: str) -> None:
        self.status.error(message)
        return None

    def run(self) -> Any:
        """Validate the inputs and start segmenting in a worker; returns it (or None)."""
        if self.is_running():
            _ui.notify_warning("a segmentation is already running: press Cancel first")
            return None
        self.status.clear_for_run("checking the settings…")
        self.progress.setValue(0)
        image = self.image_combo.layer()
        problem = L.image_problem(image)
        if problem:
            return self._fail(problem)
        data, axis = L.model_input(image)
        shape = tuple(data.shape)
        try:
            config = self.inference_form.build()
            model = self.model_picker.model()
            # The form shows the model's recommended thresholds (_show_recommended) and
            # wins; any it has no control for (the distance threshold) come from the model.
            try:
                post = recommended(model.config.postprocess, **self.post_form.values())
            except ConfigError as exc:
                raise ConfigError(self.post_form.explain(str(exc))) from exc
            check_image(shape, axis, repr(image.name))
            select_device(config.device)
        except ConfigError as exc:
            return self._fail(f"{exc}: change it under 'Advanced settings'")
        except (ModelFileError, FileNotFoundError, ValueError) as exc:
            return self._fail(str(exc))
        other = self._foreign_image()
        pair = (self.model_picker.label(), image.name)
        if other is not None and pair not in self._confirmed:
            question = (f"The model {pair[0]!r} was fine-tuned on {other}, not on "
                        f"{image.name!r}; fine-tuning on a few cells can make a model worse "
                        "on other images. Segment with it anyway?")
            if not _ui.confirm(self, question):
                self.status.warning("not segmented: choose another model under 'Model' "
                                    "(e.g. 'bundled model'), or press Segment and answer "
                                    "Yes to use the fine-tuned one", notify=False)
                return None
            self._confirmed.add(pair)
        n_in = L.model_channels(image)
        if model.config.in_channels != n_in:
            return self._fail(
                f"the model {self.model_picker.label()!r} takes {model.config.in_channels} "
                f"channel(s) but 'Channels' gives {n_in} from {image.name!r}: choose one "
                "channel (or their mean) under 'Channels', or a model trained on "
                f"{n_in} channels under 'Model'")
        div = model.config.divisor
        if config.tile is not None and config.tile % div:
            return self._fail(
                f"'tile' ({config.tile}) must be a multiple of {div} for the model "
                f"{self.model_picker.label()!r}: set 'Advanced settings > tile' to "
                f"{max(config.tile // div, 1) * div}")
        out_shape = output_shape(shape, axis)
        scope = CURRENT if self.scope_combo.isEnabled() and \
            self.scope_combo.currentText() == CURRENT else WHOLE
        want_probs = self.probs_check.isChecked()
        stitch_axis = self.stitch_combo.currentData() if self.stitch_combo.isEnabled() else None
        stitch = None if stitch_axis is None else {
            "axis": stitch_axis, "anisotropy": self.anisotropy_spin.value()}
        store = Path(self.store_edit.text()).expanduser() \
            if scope == WHOLE and self.store_edit.text().strip() else None
        n_classes = model.config.n_outputs  # class probabilities (+ the distance map)
        existing = None
        if scope == CURRENT:
            key = L.input_plane_key(self.viewer, image)
            out, probs, planes = PlaneSink(), PlaneSink() if want_probs else None, [key]
            own = L.owned_layer(self.viewer, "labels", image.name)
            if post.mode == "instances" and own is not None and \
                    isinstance(own.data, np.ndarray) and own.data.shape == out_shape:
                existing = own.data
        else:
            key, planes = None, None
            out = self._whole_output(image.name, out_shape, store, want_probs, n_classes)
            if out is None:
                return None
            probs = np.zeros((n_classes, *out_shape), np.float32) if want_probs else None
        written = _Written(out) if scope == WHOLE else out
        job = _SegmentJob(image.name, axis, scope, out, probs, key, store, post.mode)
        job.written = written
        self.job = job
        if scope == WHOLE:
            job.placeholders = self._prepare_outputs(image, out, probs, store)
        gen = _segment_job(model, config, data, channel_axis=axis, postprocess=post,
                           out=written, probabilities_out=probs, planes=planes,
                           cancel=job.cancel, stitch=stitch, existing=existing)
        self.status.set("loading the model…")
        return self.runner.start(job, gen, on_progress=self._on_progress,
                                 on_done=self._on_returned, on_failure=self._on_error)

    def _whole_output(self, image_name: str, shape: tuple[int, ...], store: Path | None,
                      want_probs: bool, n_classes: int) -> Any:
        """The array the whole image's labels go into: in memory, or the chosen zarr store
        (None, after an error in the status, when neither works)."""
        need = int(np.prod(shape, dtype=np.int64)) * (4 + 4 * n_classes * want_probs)
        if store is None:
            if need > memory_budget():
                return self._fail(
                    f"the labels of {image_name!r} (shape {shape}) need {need / 2**30:.1f} "
                    "GiB, more than a quarter of the free memory: under 'Advanced settings' "
                    "pick a .zarr folder as 'Labels store' (press '…') to write them to disk "
                    "plane by plane" + (", and untick class probabilities" if want_probs
                                        else ""))
            return np.zeros(shape, np.int32)
        if want_probs:
            return self._fail("class probabilities are only kept in memory: untick 'Also "
                              "add class probabilities' to write the labels into a store")
        if store.suffix.lower() != ".zarr":
            return self._fail(f"the labels store must be a folder ending in .zarr, not "
                              f"{store}: change 'Labels store' under 'Advanced settings'")
        overwrite = store.exists()
        if overwrite and not _ui.confirm(self, f"{store} exists. Replace it?"):
            self.status.warning(f"{store} exists and was kept: pick another 'Labels store'")
            return None
        try:
            return io.create_label_store(store, shape, np.int32, overwrite=overwrite)
        except (OSError, ValueError) as exc:
            return self._fail(f"cannot create the labels store {store}: {exc}")

    def _prepare_outputs(self, image: Any, out: Any, probs: Any,
                         store: Path | None) -> list[Any]:
        """Add the result layers now, on the click, when this image has none yet (see
        ``_layers.placeholder_output``): empty labels (uint16 zeros, whose pages the OS
        only allocates where napari reads; the labels store itself when there is one) and
        the probabilities array the worker fills. Returns the layers added."""
        layer_axis = L.default_channel_axis(image)
        labels = out if store is not None else np.zeros(out.shape, np.uint16)
        made = [L.placeholder_output(self.viewer, labels, image, "labels",
                                     channel_axis=layer_axis)]
        if probs is not None:
            made.append(L.placeholder_output(
                self.viewer, probs, image, "probabilities", kind="image",
                channel_axis=layer_axis, colormap="magma", contrast_limits=(0.0, 1.0),
                visible=False))
        return [layer for layer in made if layer is not None]

    def cancel(self) -> None:
        """Stop after the current tile; finished planes are kept or discarded (see status)."""
        if self.runner.stop():
            self.status.set("cancelling after the current tile…")

    # ------------------------------------------------------------ worker signals

    def _on_progress(self, p: SegmentProgress | StitchProgress) -> None:
        if isinstance(p, StitchProgress):
            if self.job is not None:
                self.job.linking = True
            self.progress.setValue(int(round(1000 * p.fraction)))
            self.status.set(f"linking planes into 3D objects: {p.step}/{p.total} plane "
                            "reads (runs to the end once started)")
            return
        if self.job is not None:
            self.job.last = p
        self.progress.setValue(int(round(1000 * p.fraction)))
        left = p.elapsed / p.fraction * (1 - p.fraction) if p.fraction > 0 else float("inf")
        self.status.set(f"plane {p.plane + 1}/{p.n_planes} · tile {p.tiles_done}/"
                        f"{p.tiles_total} · ETA {_ui.format_seconds(left)}")

    def _on_returned(self, result: _Output) -> None:
        job = self.job
        if job is None or job.image_name not in self.viewer.layers:
            if job is not None:
                L.remove_layers(self.viewer, job.placeholders)
            self.status.warning("the image layer was removed: the segmentation was "
                                "discarded")
            return
        out = result.out.out if isinstance(result.out, _Written) else result.out
        image = self.viewer.layers[job.image_name]
        cancelled = job.stop and not job.linking
        if job.scope == CURRENT:
            labels, probs = self._merge_plane(image, job, result.offset)
            if labels is None:
                self.status.set("cancelled before the slice was finished: no layer changed")
                return
        else:
            labels, probs = out, job.probabilities
            if result.labels is not None:
                labels = result.labels
            if cancelled:
                finished, total = job.written.planes, job.last.n_planes if job.last else 0
                if not self.keep_partial_check.isChecked() or finished == 0:
                    L.remove_layers(self.viewer, job.placeholders)
                    where = f"; {job.store} holds {finished} finished plane(s)" \
                        if job.store is not None and finished else ""
                    self.status.set(f"cancelled after {finished} of {total} plane(s): "
                                    f"discarded, no layer added or changed{where}")
                    return
        layer_axis = L.default_channel_axis(image)  # the layer's scale includes this axis
        layer = L.put_output(self.viewer, labels, image, "labels", channel_axis=layer_axis)
        if probs is not None:
            L.put_output(self.viewer, probs, image, "probabilities", kind="image",
                         channel_axis=layer_axis, colormap="magma",
                         contrast_limits=(0.0, 1.0), visible=False)
        if job.store is not None:
            # Counting would read the whole store back: just say where the labels are.
            detail = f"written to {job.store}"
        else:
            top = result.top if result.top is not None else job.top \
                if job.top is not None else int(labels.max()) if labels.size else 0
            what = "3D objects" if job.linking else \
                "cells" if job.mode == "instances" else "max class"
            detail = f"{what}: {top}"
        if cancelled and job.scope == WHOLE:
            finished, total = job.written.planes, job.last.n_planes if job.last else 0
            self.status.set(f"cancelled after {finished} of {total} plane(s): kept the "
                            f"finished planes in {layer.name!r}, the other "
                            f"{total - finished} are empty (0), not linked in 3D ({detail})")
            return
        elapsed = time.perf_counter() - job.started
        self.status.set(f"done in {_ui.format_seconds(elapsed)}: {layer.name!r} ({detail})")
        self.progress.setValue(1000)

    def _merge_plane(self, image: Any, job: _SegmentJob,
                     offset: int | None = None) -> tuple[Any, Any]:
        """Write one segmented plane into our labels layer (or a new one of full shape).

        The plane goes into the layer's own array when its dtype holds the new ids (only
        that plane is written: no copy of the whole stack on the GUI thread); ``offset``,
        the layer's largest id read by the worker, keeps ids unique across slices."""
        assert isinstance(job.out, PlaneSink) and job.key is not None
        out_key = label_key(job.key, job.channel_axis)
        plane = job.out.get(out_key)
        if plane is None:
            return None, None
        out_shape = L.label_shape(image)
        own = L.owned_layer(self.viewer, "labels", image.name)
        same = own is not None and tuple(own.data.shape) == out_shape
        if same and plane.max() > 0 and job.mode == "instances":
            if offset is None:
                offset = int(np.asarray(own.data).max())
            plane = np.where(plane > 0, plane.astype(np.int64) + offset, 0)
        if same and isinstance(own.data, np.ndarray) and own.data.flags.writeable and \
                L.fits_dtype(plane, own.data.dtype):
            labels = own.data  # put_output then only refreshes it
        elif same:
            labels = np.asarray(own.data).astype(np.int32)  # room for new ids
        else:
            labels = np.zeros(out_shape, np.int32)
        labels[out_key] = plane
        if not same or offset is not None:  # the count without reading the whole stack
            job.top = max(offset or 0, int(plane.max()) if plane.size else 0)
        probs = None
        plane_probs = job.probabilities.get((slice(None), *out_key)) \
            if isinstance(job.probabilities, PlaneSink) else None
        if plane_probs is not None:
            own_p = L.owned_layer(self.viewer, "probabilities", image.name)
            shape = (plane_probs.shape[0], *out_shape)
            probs = own_p.data if own_p is not None and own_p.data.shape == shape \
                else np.zeros(shape, np.float32)
            probs[(slice(None), *out_key)] = plane_probs
        return labels, probs

    def _on_error(self, exc: BaseException) -> None:
        if self.job is not None:  # a failed run leaves no empty layer behind
            L.remove_layers(self.viewer, self.job.placeholders)
        name = self.job.image_name if self.job else "the image"
        self.status.error(f"segmenting {name!r} failed: {_ui.gui_message(str(exc))}")


def _z_axis(image: Any, shape: tuple[int, ...]) -> int | None:
    """The leading axis to link 3D objects along by default: the one just before Y,
    unless the layer names it as time."""
    if image is None or len(shape) < 3:
        return None
    axis = len(shape) - 3
    labels = [str(a).lower() for a in getattr(image, "axis_labels", ())][-len(shape):]
    if len(labels) == len(shape) and labels[axis] in ("t", "time"):
        return None
    return axis


__all__ = ["SegmentWidget"]
