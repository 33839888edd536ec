"""Segment widget: run a model over an image layer (2D, Z/T stacks) in a worker thread.

One click with the defaults segments the whole image with the bundled model. The result goes
into the plugin's own Labels layer "<image> labels" (tagged in ``layer.metadata``), which a
re-run replaces; a user's layer is never overwritten.

Image layers may be lazy (dask, zarr, multiscale OME-Zarr: the full-resolution level is
segmented); planes are read one at a time. Labels too large for memory are written plane by
plane into a zarr store the user picks and shown as a lazy Labels layer. Stacks can be
stitched into 3D objects along a chosen axis after the per-plane segmentation.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import io
from ..device import select_device
from ..model import ModelFileError, UNet, check_channels
from ..postprocess import PostprocessConfig
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
from . import _common as c

WHOLE, CURRENT = "whole image / stack", "current slice"
NO_STITCH = "no: objects per plane"


def memory_budget() -> int:
    """Bytes of labels the widget holds in memory before it asks for an on-disk store."""
    try:
        import psutil  # a napari dependency
    except ImportError:
        return 2**31
    return int(psutil.virtual_memory().available) // 4


@dataclass
class _SegmentJob:
    image_name: str
    channel_axis: int | None
    scope: str
    out: Any
    probabilities: Any
    key: tuple | None
    store: Path | None = None
    linking: bool = False  # stitching started: it runs to the end
    stop: bool = False
    last: SegmentProgress | None = None
    started: float = field(default_factory=time.perf_counter)

    def cancel(self) -> bool:
        return self.stop


def _segment_job(model: UNet, config: InferenceConfig, image: Any, *,
                 stitch: dict[str, Any] | None, cancel: Any, **kwargs: Any) -> Any:
    """The worker's generator: put the model on its device, segment plane by plane, then
    optionally link the planes' objects into 3D objects (in place)."""
    predictor = Predictor(model, config)
    out = yield from segment_image(image, predictor, cancel=cancel, **kwargs)
    if stitch is not None and not cancel():
        # Once started, stitching runs to the end: its second pass renumbers the planes in
        # place, and stopping half-way would leave old and new ids mixed.
        out = yield from stitch_planes_iter(out, out=out, **stitch)
    return out


class SegmentWidget(QWidget):
    """Segment an image layer with the bundled, a just fine-tuned or a file model."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.job: _SegmentJob | None = None
        self._live: dict[str, Any] = {}

        d, p = InferenceConfig(), PostprocessConfig()
        self.image_combo = c.LayerCombo(napari_viewer, (Image,))
        self.channel_combo = c.ChannelAxisCombo()
        self.model_picker = c.ModelPicker()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([WHOLE, CURRENT])
        # 0 shows "auto": tile and batch chosen from the device (InferenceConfig None).
        self.tile_spin = _spin(0, 8192, d.tile or 0, 16,
                               "tile size in pixels (a multiple of 16); auto: from the device")
        self.tile_spin.setSpecialValueText("auto")
        self.overlap_spin = _spin(2 * d.margin, 1024, d.overlap, 8,
                                  f"overlap between tiles in pixels (at least {2 * d.margin})")
        self.batch_spin = _spin(0, 256, d.batch_size or 0, 1,
                                "tiles per forward pass; auto: from the device")
        self.batch_spin.setSpecialValueText("auto")
        self.device_combo = c.device_combo()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["instances", "semantic"])
        self.mode_combo.setToolTip("instances: one label per cell; semantic: 0 background, "
                                   "1 interior, 2 boundary")
        self.min_size_spin = _spin(0, 1_000_000, p.min_size, 4,
                                   "objects smaller than this (pixels) are dropped")
        self.probs_check = QCheckBox("Also add class probabilities (Image layer)")
        self.stitch_combo = QComboBox()
        self.stitch_combo.setToolTip("link each plane's objects to the overlapping objects of "
                                     "the neighbouring planes along this axis (3D objects)")
        self.anisotropy_spin = QDoubleSpinBox()
        self.anisotropy_spin.setRange(0.01, 1000.0)
        self.anisotropy_spin.setDecimals(3)
        self.anisotropy_spin.setValue(1.0)
        self.anisotropy_spin.setToolTip("voxel depth along the stitching axis / pixel size "
                                        "(from the layer's scale); recorded with the labels")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("in memory")
        self.store_edit.setToolTip("a .zarr folder to write the labels into plane by plane, "
                                   "for stacks whose labels do not fit in memory; shown as a "
                                   "lazy Labels layer")
        store_button = QPushButton("…")
        store_button.setMaximumWidth(32)
        store_button.clicked.connect(self._ask_store)
        store_row = QHBoxLayout()
        store_row.setContentsMargins(0, 0, 0, 0)
        store_row.addWidget(self.store_edit)
        store_row.addWidget(store_button)
        self.store_box = QWidget()
        self.store_box.setLayout(store_row)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Channel axis", self.channel_combo)
        form.addRow("Model", self.model_picker)
        form.addRow("Segment", self.scope_combo)
        form.addRow("Tile", self.tile_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Batch", self.batch_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Output", self.mode_combo)
        form.addRow("Min size", self.min_size_spin)
        form.addRow("3D objects", self.stitch_combo)
        form.addRow("Anisotropy", self.anisotropy_spin)
        form.addRow("Labels store", self.store_box)
        form.addRow(self.probs_check)

        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.channel_combo.currentIndexChanged.connect(self._on_channel_changed)
        self.mode_combo.currentIndexChanged.connect(self._update_scope)
        self.scope_combo.currentIndexChanged.connect(self._update_scope)
        self.stitch_combo.currentIndexChanged.connect(self._update_anisotropy)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.destroyed.connect(functools.partial(_stop_live, self._live))
        self._on_image_changed()

    # ------------------------------------------------------------ state

    def _on_image_changed(self, *_: Any) -> None:
        image = self.image_combo.layer()
        shape = () if image is None or image.rgb else tuple(c.layer_array(image).shape)
        self.channel_combo.set_shape(shape, c.default_channel_axis(image))
        self._update_scope()

    def _on_channel_changed(self, *_: Any) -> None:
        image = self.image_combo.layer()
        if image is not None and not image.rgb:
            c.remember_channel_axis(image, self.channel_combo.value())
        self._update_scope()

    def _update_scope(self, *_: Any) -> None:
        image = self.image_combo.layer()
        shape = () if image is None or image.rgb else \
            c.label_shape(image, self.channel_combo.value())
        stack = len(shape) > 2
        self.scope_combo.setEnabled(stack)
        whole = not stack or self.scope_combo.currentText() == WHOLE
        instances = self.mode_combo.currentText() == "instances"
        self.min_size_spin.setEnabled(instances)
        # The stitching axis is a leading axis of the labels; default: the one just before
        # Y (Z of a ZYX or TZYX stack).
        previous = self.stitch_combo.currentData()
        self.stitch_combo.blockSignals(True)
        self.stitch_combo.clear()
        self.stitch_combo.addItem(NO_STITCH, None)
        for axis in range(len(shape) - 2):
            self.stitch_combo.addItem(f"link planes along axis {axis} ({shape[axis]})", axis)
        if previous is not None and previous < len(shape) - 2:
            self.stitch_combo.setCurrentIndex(previous + 1)
        self.stitch_combo.blockSignals(False)
        self.stitch_combo.setEnabled(stack and whole and instances)
        self.store_box.setEnabled(whole)
        self._update_anisotropy()

    def _update_anisotropy(self, *_: Any) -> None:
        image, axis = self.image_combo.layer(), self.stitch_combo.currentData()
        self.anisotropy_spin.setEnabled(axis is not None and self.stitch_combo.isEnabled())
        if image is None or axis is None:
            return
        ndim = len(c.label_shape(image, self.channel_combo.value()))
        scale, _ = c.spatial_transform(image, self.channel_combo.value(), ndim)
        self.anisotropy_spin.setValue(float(scale[axis]) / float(scale[-1]))

    def _ask_store(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Write the labels into a zarr store", "",
                                              "Zarr store (*.zarr)")
        if path:
            self.store_edit.setText(path if path.endswith(".zarr") else f"{path}.zarr")

    def is_running(self) -> bool:
        return self.worker is not None

    # ------------------------------------------------------------ run

    def run(self) -> Any:
        """Validate the inputs and start segmenting in a worker; returns it (or None)."""
        if self.is_running():
            c.notify_warning("a segmentation is already running; cancel it first")
            return None
        image = self.image_combo.layer()
        problem = c.image_problem(image)
        if problem:
            c.notify_error(problem)
            return None
        data = c.layer_array(image)
        shape = tuple(data.shape)
        axis = self.channel_combo.value()
        try:
            check_image(shape, axis, repr(image.name))
            model = self.model_picker.model()
            check_channels(model.config.in_channels, 1 if axis is None else shape[axis],
                           f"image {image.name!r}")
            select_device(self.device_combo.currentText())
        except (ModelFileError, FileNotFoundError, ValueError) as exc:
            c.notify_error(str(exc))
            return None
        config = InferenceConfig(tile=self.tile_spin.value() or None,
                                 overlap=self.overlap_spin.value(),
                                 batch_size=self.batch_spin.value() or None,
                                 device=self.device_combo.currentText())
        if (config.tile is not None and (config.tile % model.config.divisor
                                         or config.overlap >= config.tile)) or \
                config.overlap < 2 * config.margin:
            c.notify_error(f"tile ({config.tile}) must be a multiple of "
                           f"{model.config.divisor} and larger than the overlap "
                           f"({config.overlap}), which must be at least {2 * config.margin}")
            return None
        post = PostprocessConfig(mode=self.mode_combo.currentText(),
                                 min_size=self.min_size_spin.value())
        out_shape = output_shape(shape, axis)
        scope = CURRENT if self.scope_combo.isEnabled() and \
            self.scope_combo.currentText() == CURRENT else WHOLE
        want_probs = self.probs_check.isChecked()
        n_classes = model.config.n_classes
        stitch_axis = self.stitch_combo.currentData() if self.stitch_combo.isEnabled() else None
        stitch = None if stitch_axis is None else {
            "axis": stitch_axis, "anisotropy": self.anisotropy_spin.value()}
        store = Path(self.store_edit.text()).expanduser() \
            if scope == WHOLE and self.store_edit.text().strip() else None
        if scope == CURRENT:
            key = c.plane_key(self.viewer, image, axis)
            out, probs, planes = PlaneSink(), PlaneSink() if want_probs else None, [key]
        else:
            key, planes = None, None
            out = self._whole_output(image.name, out_shape, store, want_probs, n_classes)
            if out is None:
                return None
            probs = np.zeros((n_classes, *out_shape), np.float32) if want_probs else None
        self.job = job = _SegmentJob(image.name, axis, scope, out, probs, key, store=store)
        gen = _segment_job(model, config, data, channel_axis=axis, postprocess=post, out=out,
                           probabilities_out=probs, planes=planes, cancel=job.cancel,
                           stitch=stitch)
        worker = c.make_worker(gen, yielded=self._on_progress, returned=self._on_returned,
                               errored=self._on_error, finished=self._on_finished)
        self.worker = worker
        self._live.update(job=job, worker=worker)
        self.progress.setValue(0)
        self.status.setText("loading the model…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()
        return worker

    def _whole_output(self, image_name: str, shape: tuple[int, ...], store: Path | None,
                      want_probs: bool, n_classes: int) -> Any:
        """The array the whole image's labels go into: in memory, or the chosen zarr store
        (None, after a notification, when neither works)."""
        need = int(np.prod(shape, dtype=np.int64)) * (4 + 4 * n_classes * want_probs)
        if store is None:
            if need > memory_budget():
                c.notify_error(
                    f"the labels of {image_name!r} (shape {shape}) need {need / 2**30:.1f} "
                    "GiB, more than a quarter of the free memory: pick a .zarr folder under "
                    "'Labels store' to write them to disk plane by plane"
                    + (" (without class probabilities)" if want_probs else ""))
                return None
            return np.zeros(shape, np.int32)
        if want_probs:
            c.notify_error("class probabilities are only kept in memory: untick them to "
                           "write the labels into a store")
            return None
        if store.suffix.lower() != ".zarr":
            c.notify_error(f"the labels store must be a folder ending in .zarr, not {store}")
            return None
        overwrite = store.exists()
        if overwrite and not c.confirm(self, f"{store} exists. Replace it?"):
            c.notify_warning(f"{store} exists: pick another labels store")
            return None
        try:
            return io.create_label_store(store, shape, np.int32, overwrite=overwrite)
        except (OSError, ValueError) as exc:
            c.notify_error(f"cannot create the labels store {store}: {exc}")
            return None

    def cancel(self) -> None:
        """Stop after the current tile; planes already done are kept."""
        if self.job is not None:
            self.job.stop = True
            self.status.setText("cancelling…")

    # ------------------------------------------------------------ worker signals

    def _on_progress(self, p: SegmentProgress | StitchProgress) -> None:
        if isinstance(p, StitchProgress):
            if self.job is not None:
                self.job.linking = True
            self.progress.setValue(int(round(1000 * p.fraction)))
            self.status.setText(f"linking planes into 3D objects: {p.step}/{p.total} "
                                "plane reads (runs to the end once started)")
            return
        if self.job is not None:
            self.job.last = p
        self.progress.setValue(int(round(1000 * p.fraction)))
        left = p.elapsed / p.fraction * (1 - p.fraction) if p.fraction > 0 else float("inf")
        self.status.setText(f"plane {p.plane + 1}/{p.n_planes} · tile {p.tiles_done}/"
                            f"{p.tiles_total} · ETA {c.format_seconds(left)}")

    def _on_returned(self, out: Any) -> None:
        if isinstance(out, c.Failure):
            self._on_error(out.error)
            return
        job = self.job
        if job is None or job.image_name not in self.viewer.layers:
            c.notify_warning("the image layer was removed; the segmentation was discarded")
            return
        image = self.viewer.layers[job.image_name]
        if job.scope == CURRENT:
            labels, probs = self._merge_plane(image, job)
            if labels is None:
                self.status.setText("cancelled: nothing changed")
                return
        else:
            labels, probs = out, job.probabilities
        layer = c.put_output(self.viewer, labels, image, "labels", channel_axis=job.channel_axis)
        if probs is not None:
            c.put_output(self.viewer, probs, image, "probabilities", kind="image",
                         channel_axis=job.channel_axis, colormap="magma",
                         contrast_limits=(0.0, 1.0), visible=False)
        elapsed = time.perf_counter() - job.started
        done = job.last.plane + 1 if job.last else 0
        n = job.last.n_planes if job.last else 0
        cancelled = job.stop and not job.linking
        prefix = f"cancelled after {done - 1} of {n} plane(s); kept those" if cancelled \
            else f"done in {c.format_seconds(elapsed)}"
        if job.store is not None:
            # Counting would read the whole store back: just say where the labels are.
            detail = f"written to {job.store}"
        else:
            top = int(labels.max()) if labels.size else 0
            what = "3D objects" if job.linking else \
                "cells" if self.mode_combo.currentText() == "instances" else "max class"
            detail = f"{what}: {top}"
        self.status.setText(f"{prefix}: {layer.name!r} ({detail})")
        if not cancelled:
            self.progress.setValue(1000)

    def _merge_plane(self, image: Any, job: _SegmentJob) -> tuple[Any, Any]:
        """Write one segmented plane into our labels layer (or a new one of full shape)."""
        assert isinstance(job.out, PlaneSink) and job.key is not None
        out_key = label_key(job.key, job.channel_axis)
        plane = job.out.get(out_key)
        if plane is None:
            return None, None
        out_shape = output_shape(tuple(c.layer_array(image).shape), job.channel_axis)
        own = c.owned_layer(self.viewer, "labels", image.name)
        if own is not None and tuple(own.data.shape) == out_shape:
            labels = own.data
            if plane.max() > 0 and self.mode_combo.currentText() == "instances":
                labels[out_key] = 0
                offset = int(labels.max())  # keep ids unique across slices
                plane = np.where(plane > 0, plane + offset, 0)
        else:
            labels = np.zeros(out_shape, np.int32)
        labels[out_key] = plane
        probs = None
        plane_probs = job.probabilities.get((slice(None), *out_key)) \
            if isinstance(job.probabilities, PlaneSink) else None
        if plane_probs is not None:
            own_p = c.owned_layer(self.viewer, "probabilities", image.name)
            shape = (plane_probs.shape[0], *out_shape)
            probs = own_p.data if own_p is not None and own_p.data.shape == shape \
                else np.zeros(shape, np.float32)
            probs[(slice(None), *out_key)] = plane_probs
        return labels, probs

    def _on_error(self, exc: BaseException) -> None:
        message = f"segmentation failed: {exc}"
        self.status.setText(message)
        c.notify_error(message)

    def _on_finished(self) -> None:
        self.worker = None
        self._live.clear()
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)


def _spin(lo: int, hi: int, value: int, step: int, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setSingleStep(step)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _stop_live(live: dict[str, Any], *_: Any) -> None:
    """Cancel a running job when its widget is destroyed (holds no reference to the widget)."""
    job, worker = live.get("job"), live.get("worker")
    if job is not None:
        job.stop = True
    if worker is not None:
        with contextlib.suppress(RuntimeError):
            worker.quit()


__all__ = ["SegmentWidget"]
