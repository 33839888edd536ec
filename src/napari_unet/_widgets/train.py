"""Train widget: fine-tune a model on painted annotations, in a worker thread.

The widget gathers image/annotation pairs and settings, runs ``Trainer.run`` in a napari
``thread_worker`` and shows progress, a loss curve and a live preview of the model on the
slice on screen. The result is shared with the Segment widget through the model registry.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..augment import AugmentConfig
from ..device import select_device
from ..model import ModelConfig, ModelFileError, UNet, check_channels, save_model
from ..segment import read_plane, segment
from ..targets import FIRST_CELL
from ..train import (
    TrainConfig,
    Trainer,
    TrainingPair,
    TrainProgress,
    pairs_from_arrays,
    train_config,
)
from . import _common as c
from .export import ExportButton

PREVIEW_MAX = 384  # preview at most this many pixels square (around the view centre)
PREVIEW_EVERY_S = 3.0
PREVIEW_TILE = 256


class LossPlot(QWidget):
    """A small matplotlib plot of the training loss (per step, and its running mean)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 1.8), dpi=80, layout="tight", facecolor="none")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setStyleSheet("background: transparent")
        self.canvas.setMinimumHeight(140)
        self.ax = self.figure.add_subplot(111, facecolor="none")
        grey = "#9a9a9a"  # readable on napari's dark and light themes
        (self.raw,) = self.ax.plot([], [], lw=0.8, color="#6fa8dc", label="loss")
        (self.avg,) = self.ax.plot([], [], lw=1.8, color="#ff9900", label="mean of 20")
        self.ax.set_xlabel("step", fontsize=8, color=grey)
        self.ax.set_ylabel("loss", fontsize=8, color=grey)
        self.ax.tick_params(labelsize=7, colors=grey)
        for spine in self.ax.spines.values():
            spine.set_color(grey)
        self.ax.grid(True, color=grey, alpha=0.25, lw=0.5)
        legend = self.ax.legend(fontsize=7, loc="upper right", frameon=False)
        for text in legend.get_texts():
            text.set_color(grey)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.means: list[float] = []
        self._drawn_at = 0.0

    def clear(self) -> None:
        self.steps, self.losses, self.means = [], [], []
        self.redraw()

    def add(self, step: int, loss: float, mean: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.means.append(mean)
        if time.perf_counter() - self._drawn_at > 0.5:  # keep the event loop free
            self.redraw()

    def redraw(self) -> None:
        self._drawn_at = time.perf_counter()
        self.raw.set_data(self.steps, self.losses)
        self.avg.set_data(self.steps, self.means)
        if self.steps:
            self.ax.set_xlim(0, max(self.steps[-1], 10))
            hi = float(np.nanpercentile(self.losses, 98)) if len(self.losses) > 5 \
                else max(self.losses)
            self.ax.set_ylim(0, max(hi * 1.1, 1e-6))
        self.canvas.draw_idle()


@dataclass
class _PreviewTarget:
    """What the preview callback segments; written by the GUI thread, read by the worker."""

    image: Any
    key: tuple
    channel_axis: int | None
    crop: tuple[slice, slice]
    device: str


@dataclass
class _TrainJob:
    """State shared between the widget and its worker."""

    names: list[str]
    base: str
    stop: bool = False
    trainer: Trainer | None = None
    preview_target: _PreviewTarget | None = None
    last_preview: tuple[Any, np.ndarray] | None = None  # (target, labels)
    started: float = field(default_factory=time.perf_counter)

    def cancel(self) -> bool:
        return self.stop

    def preview(self, model: UNet) -> np.ndarray | None:
        """Segment the plane on screen (cropped around the view centre) with ``model``."""
        target = self.preview_target
        if target is None:
            return None
        try:
            plane = read_plane(target.image, target.key, target.channel_axis)
            plane = np.asarray(plane[(..., *target.crop)])
            labels = segment(plane, model, tile=PREVIEW_TILE, batch_size=1,
                             device=target.device)
        except Exception:  # a failed preview must not stop training
            c.logger.warning("training preview failed", exc_info=True)
            return None
        self.last_preview = (target, labels)
        return labels


def _train_job(job: _TrainJob, model: UNet, pairs: list[TrainingPair], config: TrainConfig,
               preview: bool) -> Any:
    """The worker's generator: build the trainer (targets, weights) and run it."""
    job.trainer = Trainer(model, pairs, config)
    return (yield from job.trainer.run(cancel=job.cancel,
                                       preview=job.preview if preview else None,
                                       preview_every_s=PREVIEW_EVERY_S))


class TrainWidget(QWidget):
    """Fine-tune (or train from scratch) on annotated images; see the module docstring."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.job: _TrainJob | None = None
        self.model: UNet | None = None  # the last trained model
        self.model_label: str | None = None
        self._preview_image: Image | None = None

        # training data
        data_box = QGroupBox("Training data (image ← annotation)")
        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(90)
        self.pairs_list.setToolTip("checked pairs are used; annotation layers made with the "
                                   "Annotate widget appear here automatically")
        self.image_combo = c.LayerCombo(napari_viewer, (Image,))
        self.annotation_combo = c.LayerCombo(napari_viewer, (Labels,))
        self.add_pair_button = QPushButton("Add pair")
        pick = QHBoxLayout()
        pick.addWidget(self.image_combo, 1)
        pick.addWidget(QLabel("←"))
        pick.addWidget(self.annotation_combo, 1)
        pick.addWidget(self.add_pair_button)
        dl = QVBoxLayout(data_box)
        dl.addWidget(self.pairs_list)
        dl.addLayout(pick)
        self._manual_pairs: list[tuple[str, str]] = []
        self._unchecked: set[tuple[str, str]] = set()

        # settings
        d = TrainConfig()
        self.model_picker = c.ModelPicker(scratch=True)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.steps_spin.setValue(d.steps)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(d.lr)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(d.batch_size)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(32, 2048)
        self.tile_spin.setSingleStep(16)
        self.tile_spin.setValue(d.tile)
        self.tile_spin.setToolTip("training patch size (pixels); a multiple of 16")
        self.elastic_spin = QDoubleSpinBox()
        self.elastic_spin.setRange(0.0, 100.0)
        self.elastic_spin.setValue(d.augment.elastic_alpha)
        self.elastic_spin.setToolTip("elastic deformation strength in pixels (0 = off)")
        self.device_combo = c.device_combo()
        self.preview_check = QCheckBox("Live preview of the slice on screen")
        self.preview_check.setChecked(True)
        form = QFormLayout()
        form.addRow("Start from", self.model_picker)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Elastic strength", self.elastic_spin)
        form.addRow("Device", self.device_combo)
        form.addRow(self.preview_check)

        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("stop training and keep the last good model")
        self.stop_button.setEnabled(False)
        self.save_button = QPushButton("Save model…")
        self.save_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.save_button)
        buttons.addWidget(ExportButton(
            lambda: self.model if self.model is not None else self.model_picker.model()))
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.loss_plot = LossPlot()

        layout = QVBoxLayout(self)
        layout.addWidget(data_box)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.loss_plot)
        layout.addStretch(1)

        self.add_pair_button.clicked.connect(self._add_manual_pair)
        self.image_combo.currentIndexChanged.connect(self._on_image_picked)
        self.pairs_list.itemChanged.connect(self._on_item_changed)
        self.train_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(self._ask_save)
        events = napari_viewer.layers.events
        for emitter in (events.inserted, events.removed):
            emitter.connect(self.refresh_pairs)
        events.inserted.connect(self._watch_name)
        for layer in napari_viewer.layers:
            layer.events.name.connect(self.refresh_pairs)
        napari_viewer.dims.events.current_step.connect(self._update_preview_target)
        c.camera(napari_viewer).events.center.connect(self._update_preview_target)
        self._on_image_picked()
        self.refresh_pairs()
        self._live: dict[str, Any] = {}
        self.destroyed.connect(functools.partial(_stop_live, self._live))

    # ------------------------------------------------------------ pairs

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh_pairs)

    def _on_image_picked(self, *_: Any) -> None:
        image = self.image_combo.layer()
        if image is None:
            return
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and _annotation_of(layer) == image.name:
                self.annotation_combo.set_layer(layer)
                return

    def _add_manual_pair(self) -> None:
        image, ann = self.image_combo.layer(), self.annotation_combo.layer()
        if image is None or ann is None:
            c.notify_error("pick an image layer and its annotation (Labels) layer first")
            return
        pair = (image.name, ann.name)
        if pair not in self._manual_pairs:
            self._manual_pairs.append(pair)
        self._unchecked.discard(pair)
        self.refresh_pairs()

    def detected_pairs(self) -> list[tuple[str, str]]:
        """(image, annotation) layer names: annotation layers made for an open image."""
        pairs = []
        for layer in self.viewer.layers:
            image_name = _annotation_of(layer) if isinstance(layer, Labels) else None
            if image_name and image_name in self.viewer.layers and \
                    isinstance(self.viewer.layers[image_name], Image):
                pairs.append((image_name, layer.name))
        for pair in self._manual_pairs:
            if pair not in pairs and all(n in self.viewer.layers for n in pair):
                pairs.append(pair)
        return pairs

    def refresh_pairs(self, *_: Any) -> None:
        pairs = self.detected_pairs()
        self.pairs_list.blockSignals(True)
        self.pairs_list.clear()
        for pair in pairs:
            item = QListWidgetItem(f"{pair[0]}  ←  {pair[1]}")
            item.setData(Qt.UserRole, pair)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked if pair in self._unchecked else Qt.Checked)
            self.pairs_list.addItem(item)
        self.pairs_list.blockSignals(False)

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        pair = tuple(item.data(Qt.UserRole))
        if item.checkState() == Qt.Checked:
            self._unchecked.discard(pair)
        else:
            self._unchecked.add(pair)

    def set_pairs(self, pairs: list[tuple[Any, Any]]) -> None:
        """Train on exactly these (image, annotation) layers (or names)."""
        names = [(getattr(i, "name", i), getattr(a, "name", a)) for i, a in pairs]
        self._manual_pairs = list(names)
        self.refresh_pairs()
        self._unchecked = {p for p in self.detected_pairs() if p not in names}
        self.refresh_pairs()

    def checked_pairs(self) -> list[tuple[Image, Labels]]:
        out = []
        for row in range(self.pairs_list.count()):
            item = self.pairs_list.item(row)
            if item.checkState() == Qt.Checked:
                image_name, ann_name = item.data(Qt.UserRole)
                if image_name in self.viewer.layers and ann_name in self.viewer.layers:
                    out.append((self.viewer.layers[image_name], self.viewer.layers[ann_name]))
        return out

    # ------------------------------------------------------------ start / stop

    def is_running(self) -> bool:
        return self.worker is not None

    def _collect(self) -> tuple[list[TrainingPair], list[tuple[Image, Labels]]] | None:
        layer_pairs = self.checked_pairs()
        if not layer_pairs:
            c.notify_error("no training data: create an annotation layer with the Annotate "
                           "widget (or pick image ← annotation and press 'Add pair'), "
                           "paint a few cells, and check the pair")
            return None
        pairs: list[TrainingPair] = []
        for image, ann in layer_pairs:
            problem = c.image_problem(image)
            if problem:
                c.notify_error(problem)
                return None
            axis = c.default_channel_axis(image)
            expected = c.label_shape(image, axis)
            if tuple(ann.data.shape) != expected:
                c.notify_error(
                    f"annotation {ann.name!r} has shape {tuple(ann.data.shape)} but image "
                    f"{image.name!r} needs {expected} (its shape without the channel axis); "
                    "create the annotation with the Annotate widget"
                )
                return None
            try:
                complete = c.complete_mask(self.viewer, image.name, ann)
                pairs += pairs_from_arrays(c.layer_array(image), ann.data, channel_axis=axis,
                                           complete=complete, name=image.name)
            except ValueError as exc:
                c.notify_error(str(exc))
                return None
        if not any((p.annotation >= FIRST_CELL).any() for p in pairs):
            c.notify_error("the annotation has no cells: paint at least one cell with a "
                           "label ≥ 2 ('Next free cell id' in the Annotate widget); "
                           "0 = not annotated, 1 = background")
            return None
        return pairs, layer_pairs

    def _config(self, scratch: bool) -> TrainConfig:
        return train_config(
            scratch, steps=self.steps_spin.value(), lr=self.lr_spin.value(),
            batch_size=self.batch_spin.value(), tile=self.tile_spin.value(),
            augment=AugmentConfig(elastic_alpha=self.elastic_spin.value()),
            device=self.device_combo.currentText(),
        )

    def start(self) -> Any:
        """Validate the inputs and start training in a worker; returns the worker or None."""
        if self.is_running():
            c.notify_warning("training is already running; press Stop first")
            return None
        collected = self._collect()
        if collected is None:
            return None
        pairs, layer_pairs = collected
        n_channels = np.asarray(pairs[0].image).shape[0] if np.ndim(pairs[0].image) == 3 else 1
        scratch = self.model_picker.is_scratch()
        try:
            model = UNet(ModelConfig(in_channels=n_channels)) if scratch \
                else self.model_picker.model()
            check_channels(model.config.in_channels, n_channels, repr(pairs[0].name))
            select_device(self.device_combo.currentText())
        except (ModelFileError, FileNotFoundError, ValueError) as exc:
            c.notify_error(str(exc))
            return None
        config = self._config(scratch)
        if config.tile % model.config.divisor:
            c.notify_error(f"tile size {config.tile} must be a multiple of "
                           f"{model.config.divisor} for this model")
            return None

        names = sorted({img.name for img, _ in layer_pairs})
        self.job = job = _TrainJob(names=names, base=self.model_picker.label())
        self._preview_image = layer_pairs[0][0]
        self._update_preview_target()
        gen = _train_job(job, model, pairs, config, self.preview_check.isChecked())
        worker = c.make_worker(gen, yielded=self._on_progress, returned=self._on_returned,
                               errored=self._on_error, finished=self._on_finished)
        self.worker = worker
        self._live.update(job=job, worker=worker)
        self.loss_plot.clear()
        self.progress.setRange(0, config.steps)
        self.progress.setValue(0)
        self.status.setText(f"preparing {len(pairs)} annotated plane(s)…")
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        worker.start()
        return worker

    def stop(self) -> None:
        """Stop after the current step; the last good model is kept."""
        if self.job is not None:
            self.job.stop = True
            self.status.setText("stopping…")

    # ------------------------------------------------------------ preview

    def _update_preview_target(self, *_: Any) -> None:
        job, image = self.job, self._preview_image
        if job is None or image is None or image not in self.viewer.layers:
            return
        axis = c.default_channel_axis(image)
        data = c.layer_array(image)
        key = c.plane_key(self.viewer, image, axis)
        h, w = data.shape[-2:]
        # Centre of the view in the image's data coordinates.
        point = list(self.viewer.dims.point)
        displayed = list(self.viewer.dims.displayed)
        center = list(c.camera(self.viewer).center)[-len(displayed):]
        for d, value in zip(displayed, center, strict=True):
            point[d] = value
        cy, cx = np.asarray(image.world_to_data(point))[-2:]
        crop = []
        for size, centre in ((h, cy), (w, cx)):
            n = min(size, PREVIEW_MAX)
            start = int(np.clip(round(centre) - n // 2, 0, size - n))
            crop.append(slice(start, start + n))
        job.preview_target = _PreviewTarget(data, key, axis, (crop[0], crop[1]),
                                            self.device_combo.currentText())

    def _show_preview(self, labels: np.ndarray) -> None:
        job, image = self.job, self._preview_image
        if job is None or image is None or job.last_preview is None or \
                image not in self.viewer.layers:
            return
        target, last = job.last_preview
        if last is not labels:
            return
        scale, translate = c.spatial_transform(image, target.channel_axis, 2)
        translate = tuple(t + s * sl.start for t, s, sl in
                          zip(translate, scale, target.crop, strict=True))
        # Do not steal the active layer from someone painting while training runs.
        active = self.viewer.layers.selection.active
        c.put_output(self.viewer, labels, image, "preview", kind="labels",
                     scale=scale, translate=translate, opacity=0.5)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    # ------------------------------------------------------------ worker signals

    def _on_progress(self, p: TrainProgress) -> None:
        self.progress.setValue(p.step)
        self.status.setText(
            f"step {p.step}/{p.total_steps} · loss {p.loss_avg:.4f} · "
            f"{p.steps_per_s:.1f} steps/s · ETA {c.format_seconds(p.eta)}"
        )
        self.loss_plot.add(p.step, p.loss, p.loss_avg)
        if p.preview is not None:
            self._show_preview(p.preview)

    def _register(self, model: UNet, steps: int, note: str = "") -> None:
        job = self.job
        names = ", ".join(job.names) if job else "?"
        trainer = job.trainer if job else None
        model.config.provenance = {
            "base_model": job.base if job else "?", "images": job.names if job else [],
            "steps": steps, "final_loss": trainer.losses[-1] if trainer and trainer.losses
            else None, "date": time.strftime("%Y-%m-%d"), "trained_with": "napari widget",
        }
        self.model = model
        entry = c.REGISTRY.add(model, f"fine-tuned on {names} ({steps} steps{note})",
                               kind="finetuned")
        self.model_label = entry.label
        self.save_button.setEnabled(True)

    def _on_returned(self, model: UNet | c.Failure) -> None:
        if isinstance(model, c.Failure):
            self._on_error(model.error)
            return
        job = self.job
        steps = job.trainer.step if job and job.trainer else 0
        stopped = bool(job and job.stop)
        self.loss_plot.redraw()
        self._register(model, steps, ", stopped" if stopped else "")
        elapsed = time.perf_counter() - job.started if job else 0.0
        self.status.setText(
            f"{'stopped' if stopped else 'done'} after {steps} steps "
            f"({c.format_seconds(elapsed)}); the model is available in the Segment widget "
            f"as {self.model_label!r}"
        )

    def _on_error(self, exc: BaseException) -> None:
        job = self.job
        trainer = job.trainer if job else None
        message = f"training failed: {exc}"
        if trainer is not None and trainer.step > 0:
            self._register(trainer.model, trainer.step, ", last good before an error")
            message += f" — the last good model is kept as {self.model_label!r}"
        self.status.setText(message)
        c.notify_error(message)

    def _on_finished(self) -> None:
        self.worker = None
        self._live.clear()
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    # ------------------------------------------------------------ saving

    def _ask_save(self) -> None:
        if self.model is None:
            c.notify_error("no trained model yet: press Train first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "finetuned.safetensors",
                                              c.MODEL_FILTER)
        if path:
            # The dialog has asked about replacing the file it returns; a suffix we add
            # ourselves may name another existing file, which save_model_to asks about.
            confirmed = path.endswith(".safetensors")
            self.save_model_to(path, overwrite=True if confirmed else None)

    def save_model_to(self, path: str, overwrite: bool | None = False) -> str | None:
        """Save the last trained model; ``overwrite=None`` asks before replacing a file."""
        if self.model is None:
            c.notify_error("no trained model yet: press Train first")
            return None
        if not path.endswith(".safetensors"):
            path += ".safetensors"
        try:
            save_model(self.model, path, overwrite=bool(overwrite))
        except FileExistsError:
            if overwrite is None and c.confirm(self, f"{path} exists. Replace it?"):
                return self.save_model_to(path, overwrite=True)
            c.notify_warning(f"not saved: {path} exists")
            return None
        except (OSError, ModelFileError) as exc:
            c.notify_error(f"could not save the model: {exc}")
            return None
        c.notify_info(f"model saved to {path}")
        return path


def _annotation_of(layer: Any) -> str | None:
    """The image name a Labels layer annotates (tagged by the Annotate widget, or by name)."""
    meta = layer.metadata.get(c.TAG)
    if isinstance(meta, dict):
        return meta.get("image") if meta.get("role") == "annotation" else None
    if layer.name.endswith(" annotation"):
        return layer.name[: -len(" annotation")]
    return None


def _stop_live(live: dict[str, Any], *_: Any) -> None:
    """Stop a running job when its widget is destroyed (holds no reference to the widget)."""
    job, worker = live.get("job"), live.get("worker")
    if job is not None:
        job.stop = True
    if worker is not None:
        with contextlib.suppress(RuntimeError):
            worker.quit()
