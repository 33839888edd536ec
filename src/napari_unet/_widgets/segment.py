"""Segment widget: run a model over an image layer (2D, Z/T stacks) in a worker thread.

One click with the defaults segments the whole image with the bundled model. The result goes
into the plugin's own Labels layer "<image> labels" (tagged in ``layer.metadata``), which a
re-run replaces; a user's layer is never overwritten.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..device import select_device
from ..model import ModelFileError, UNet, check_channels
from ..postprocess import PostprocessConfig
from ..segment import (
    InferenceConfig,
    Predictor,
    SegmentProgress,
    check_image,
    label_key,
    output_shape,
    segment_image,
)
from . import _common as c

WHOLE, CURRENT = "whole image / stack", "current slice"


class PlaneSink:
    """Stands in for ``out``/``probabilities_out`` when only some planes are segmented."""

    def __init__(self) -> None:
        self.planes: dict[tuple, np.ndarray] = {}

    @staticmethod
    def _hashable(key: tuple) -> tuple:
        # slices are unhashable before Python 3.12
        return tuple(None if isinstance(k, slice) else k for k in key)

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.planes[self._hashable(key)] = np.asarray(value)

    def get(self, key: tuple) -> np.ndarray | None:
        return self.planes.get(self._hashable(key))


@dataclass
class _SegmentJob:
    image_name: str
    channel_axis: int | None
    scope: str
    out: Any
    probabilities: Any
    key: tuple | None
    stop: bool = False
    last: SegmentProgress | None = None
    started: float = field(default_factory=time.perf_counter)

    def cancel(self) -> bool:
        return self.stop


def _segment_job(model: UNet, config: InferenceConfig, image: Any, **kwargs: Any) -> Any:
    """The worker's generator: put the model on its device, then segment plane by plane."""
    predictor = Predictor(model, config)
    return (yield from segment_image(image, predictor, **kwargs))


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
        self.tile_spin = _spin(64, 8192, d.tile, 16, "tile size in pixels (a multiple of 16)")
        self.overlap_spin = _spin(2 * d.margin, 1024, d.overlap, 8,
                                  f"overlap between tiles in pixels (at least {2 * d.margin})")
        self.batch_spin = _spin(1, 256, d.batch_size, 1, "tiles per forward pass")
        self.device_combo = c.device_combo()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["instances", "semantic"])
        self.mode_combo.setToolTip("instances: one label per cell; semantic: 0 background, "
                                   "1 interior, 2 boundary")
        self.min_size_spin = _spin(0, 1_000_000, p.min_size, 4,
                                   "objects smaller than this (pixels) are dropped")
        self.probs_check = QCheckBox("Also add class probabilities (Image layer)")

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
        self.mode_combo.currentIndexChanged.connect(
            lambda *_: self.min_size_spin.setEnabled(self.mode_combo.currentText()
                                                     == "instances"))
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

    def _update_scope(self) -> None:
        image = self.image_combo.layer()
        stack = image is not None and not image.rgb and \
            len(c.label_shape(image, self.channel_combo.value())) > 2
        self.scope_combo.setEnabled(stack)

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
        config = InferenceConfig(tile=self.tile_spin.value(), overlap=self.overlap_spin.value(),
                                 batch_size=self.batch_spin.value(),
                                 device=self.device_combo.currentText())
        if config.tile % model.config.divisor or config.overlap >= config.tile or \
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
        if scope == CURRENT:
            key = c.plane_key(self.viewer, image, axis)
            out, probs, planes = PlaneSink(), PlaneSink() if want_probs else None, [key]
        else:
            key, planes = None, None
            out = np.zeros(out_shape, np.int32)
            probs = np.zeros((n_classes, *out_shape), np.float32) if want_probs else None
        self.job = job = _SegmentJob(image.name, axis, scope, out, probs, key)
        gen = _segment_job(model, config, data, channel_axis=axis, postprocess=post, out=out,
                           probabilities_out=probs, planes=planes, cancel=job.cancel)
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

    def cancel(self) -> None:
        """Stop after the current tile; planes already done are kept."""
        if self.job is not None:
            self.job.stop = True
            self.status.setText("cancelling…")

    # ------------------------------------------------------------ worker signals

    def _on_progress(self, p: SegmentProgress) -> None:
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
        prefix = f"cancelled after {done - 1} of {n} plane(s); kept those" if job.stop \
            else f"done in {c.format_seconds(elapsed)}"
        n_obj = int(np.asarray(labels).max()) if np.asarray(labels).size else 0
        what = "cells" if self.mode_combo.currentText() == "instances" else "max class"
        self.status.setText(f"{prefix}: {layer.name!r} ({what}: {n_obj})")
        if not job.stop:
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
