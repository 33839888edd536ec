"""Train widget: fine-tune a model on painted annotations, in a worker thread.

Up front: the image ← annotation pairs (found automatically), the starting model, the
number of steps, Train / Stop / Save, the status and the loss curve. Everything else
(forms generated from TrainConfig / AugmentConfig) is under "Advanced". The result is
shared with the Segment widget through the model registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QWidget,
)

from ..augment import AugmentConfig
from ..device import select_device
from ..model import ModelConfig, ModelFileError, UNet, save_model
from ..params import ConfigError
from ..segment import read_plane, segment
from ..targets import FIRST_CELL
from ..train import TrainConfig, Trainer, TrainingPair, TrainProgress, pairs_from_arrays
from . import _layers as L
from . import _shortcuts as _keys
from . import _ui
from ._annotations import annotation_of, complete_mask, edited_mask
from ._forms import ConfigForm, Settings
from ._models import DEVICES, MODEL_FILTER, REGISTRY, SCRATCH_LABEL, ModelPicker
from ._plot import LossPlot
from ._worker import Job, JobRunner, logger, warm_up
from .export import ExportButton

PREVIEW_MAX = 384  # preview at most this many pixels square (around the view centre)
PREVIEW_EVERY_S = 3.0
PREVIEW_TILE = 256
VALIDATION = "validation AP"  # the loss plot's series of held-out scores (own axis, 0..1)
SCRATCH_DEFAULTS = {"freeze_norm": False, "keep_prior": 0.0,  # see train.train_config
                    "average": 1.0}


@dataclass
class _PreviewTarget:
    """What the preview callback segments; written by the GUI thread, read by the worker."""

    image: Any
    key: tuple
    channel_axis: int | None
    crop: tuple[slice, slice]
    device: str


class _TrainJob(Job):
    """State shared between the widget and its worker."""

    def __init__(self, names: list[str], base: str) -> None:
        super().__init__()
        self.names, self.base = names, base
        self.trainer: Trainer | None = None
        self.preview_target: _PreviewTarget | None = None
        self.last_preview: tuple[Any, np.ndarray] | None = None  # (target, labels)
        # Seconds from pressing Train to the starting model's score and to the first
        # snapshot's score (what a user waits before the plot says anything useful).
        self.reference_s: float | None = None
        self.first_validation_s: float | None = None
        self.placeholder: Any = None  # the preview layer added on the click, if any

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
            logger.warning("training preview failed", exc_info=True)
            return None
        labels = preview_ids(labels)  # here, in the worker: it reads every pixel
        self.last_preview = (target, labels)
        return labels


def preview_ids(labels: np.ndarray) -> np.ndarray:
    """Preview labels as uint8, ids above 255 wrapped onto 1..255 (a few cells share a
    colour): the preview layer keeps one dtype, so each update is a copy into its array,
    not a rebuild of its colormap (see ``_layers.write_in_place``)."""
    if labels.size and int(labels.max()) > 255:
        labels = np.where(labels > 0, (labels - 1) % 255 + 1, 0)
    return labels.astype(np.uint8, copy=False)


def _train_job(job: _TrainJob, model: UNet, pairs: list[TrainingPair], config: TrainConfig,
               preview: bool) -> Any:
    """The worker's generator: build the trainer (targets, weights) and run it."""
    job.trainer = Trainer(model, pairs, config)
    yield job.trainer.validation_note  # shown before the starting model is scored
    return (yield from job.trainer.run(cancel=job.cancel,
                                       preview=job.preview if preview else None,
                                       preview_every_s=PREVIEW_EVERY_S))


class TrainWidget(_ui.TabbedDock, QWidget):
    """Fine-tune (or train from scratch) on annotated images; see the module docstring."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.job: _TrainJob | None = None
        self.model: UNet | None = None  # the last trained model
        self.model_label: str | None = None
        self._preview_image: Image | None = None
        self._manual_pairs: list[tuple[str, str]] = []
        self._unchecked: set[tuple[str, str]] = set()

        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(72)
        self.pairs_list.setToolTip("checked image ← annotation pairs are used; annotation "
                                   "layers made with the Annotate widget appear here")
        self.model_picker = ModelPicker(scratch=True)
        self.train_form = ConfigForm(
            TrainConfig, ["steps"], exclude=("checkpoint_path", "checkpoint_every"),
            overrides={"device": {"widget_type": "ComboBox", "choices": list(DEVICES)}})
        self.augment_form = ConfigForm(AugmentConfig, [])
        self.settings = Settings(self.train_form, self.augment_form)
        self.preview_check = QCheckBox("Live preview of the slice on screen")
        self.preview_check.setChecked(True)
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("stop after the current step and keep the model as it is")
        self.save_button = QPushButton("Save model…")
        self.save_button.setEnabled(False)
        self.progress = _ui.ProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = _ui.StatusBox()
        self.loss_plot = LossPlot()  # other modules may add series (add_series / append)
        self.loss_plot.add_series(VALIDATION, "#93c47d", 2.0, own_axis=True, top=1.0,
                                  markers=True)
        self.loss_plot.setMinimumHeight(150)  # room for the score beside the loss
        self.validation_label = QLabel("")  # what is held out for validation
        self.validation_label.setWordWrap(True)
        self.validation_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # manual pairing, for annotation layers not made with the Annotate widget
        self.image_combo = L.LayerCombo(napari_viewer, (Image,))
        self.annotation_combo = L.LayerCombo(napari_viewer, (Labels,), follow=False)
        self.add_pair_button = QPushButton("Add pair")

        body = QWidget()
        layout = _ui.scrolled(self, body)
        layout.addWidget(QLabel("Training data (image ← annotation)"))
        layout.addWidget(self.pairs_list)
        form = QFormLayout()
        form.addRow("Start from", self.model_picker)
        layout.addLayout(form)
        layout.addWidget(self.train_form.native())
        layout.addWidget(self.preview_check)
        buttons = QHBoxLayout()
        for button in (self.train_button, self.stop_button, self.save_button):
            buttons.addWidget(button)
        buttons.addWidget(ExportButton(
            lambda: self.model if self.model is not None else self.model_picker.model()))
        layout.addLayout(buttons)
        layout.addWidget(_keys.key_hint(_keys.TRAIN))
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.validation_label)
        layout.addWidget(self.loss_plot)
        extra = QWidget()
        extra_layout = QFormLayout(extra)
        extra_layout.setContentsMargins(0, 0, 0, 0)
        pick = QHBoxLayout()
        pick.addWidget(self.image_combo, 1)
        pick.addWidget(QLabel("←"))
        pick.addWidget(self.annotation_combo, 1)
        pick.addWidget(self.add_pair_button)
        extra_layout.addRow("Pair", pick)
        extra_layout.addRow(self.train_form.native(advanced=True))
        extra_layout.addRow(self.augment_form.native(advanced=True))
        self.advanced = _ui.Collapsible("Advanced settings", extra)
        layout.addWidget(self.advanced)
        layout.addStretch(1)

        warm_up()
        self.runner = JobRunner(self, self.train_button, self.stop_button,
                                urgent=lambda p: getattr(p, "preview", None) is not None,
                                keep_all=True)  # every step's loss goes into the plot
        self.add_pair_button.clicked.connect(self._add_manual_pair)
        self.image_combo.currentIndexChanged.connect(self._on_image_picked)
        self.pairs_list.itemChanged.connect(self._on_item_changed)
        self.train_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(self._ask_save)
        self.key_train = _keys.bind(self, napari_viewer, _keys.TRAIN[0], "_key_train")
        events = napari_viewer.layers.events
        for emitter in (events.inserted, events.removed):
            emitter.connect(self.refresh_pairs)
        events.inserted.connect(self._watch_name)
        for layer in napari_viewer.layers:
            layer.events.name.connect(self.refresh_pairs)
        napari_viewer.dims.events.current_step.connect(self._update_preview_target)
        _ui.camera(napari_viewer).events.center.connect(self._update_preview_target)
        self._on_image_picked()
        self.refresh_pairs()
        _ui.fit_width(self)

    # ------------------------------------------------------------ compatibility names

    @property
    def worker(self) -> Any:
        return self.runner.worker

    # ------------------------------------------------------------ pairs

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh_pairs)

    def _on_image_picked(self, *_: Any) -> None:
        image = self.image_combo.layer()
        if image is None:
            return
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and annotation_of(layer) == image.name:
                self.annotation_combo.set_layer(layer)
                return

    def _add_manual_pair(self) -> None:
        image, ann = self.image_combo.layer(), self.annotation_combo.layer()
        if image is None or ann is None:
            self.status.error("pick an image layer and its annotation (Labels) layer under "
                              "'Advanced settings > Pair' first, then press 'Add pair'")
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
            image_name = annotation_of(layer) if isinstance(layer, Labels) and \
                not L.is_output(layer) else None
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
        return self.runner.running()

    def _collect(self) -> tuple[list[TrainingPair], list[tuple[Image, Labels]]] | str:
        """The training planes, or an error message in GUI terms."""
        layer_pairs = self.checked_pairs()
        if not layer_pairs:
            return ("no training data: in the Annotate widget press 'Create / pick "
                    "annotation layer', paint a few cells, and check the pair in the list "
                    "above (or pair layers under 'Advanced settings > Pair')")
        pairs: list[TrainingPair] = []
        channels = set()
        for image, ann in layer_pairs:
            problem = L.image_problem(image)
            if problem:
                return problem
            expected = L.label_shape(image)
            if tuple(ann.data.shape) != expected:
                return (f"annotation {ann.name!r} has shape {tuple(ann.data.shape)} but image "
                        f"{image.name!r} needs {expected} (its shape without the channel "
                        "axis): check 'Channels' in the Annotate widget, or create the "
                        "annotation there with 'Create / pick annotation layer'")
            data, axis = L.model_input(image)
            channels.add(L.model_channels(image))
            try:
                complete = complete_mask(self.viewer, image.name, ann)
                pairs += pairs_from_arrays(data, ann.data, channel_axis=axis,
                                           complete=complete, name=image.name,
                                           edited=edited_mask(ann))
            except ValueError as exc:
                return _ui.gui_message(str(exc))
        if len(channels) > 1:
            return ("the checked images give different numbers of channels: choose the "
                    "same 'Channels' setting for all of them in the Annotate widget")
        if not any((p.annotation >= FIRST_CELL).any() for p in pairs):
            return ("the annotation has no cells: in the Annotate widget press 'Next free "
                    "cell id' and paint at least one cell (0 = not annotated, 1 = "
                    "background, ≥ 2 = one cell each)")
        return pairs, layer_pairs

    def _config(self, scratch: bool) -> TrainConfig:
        values = {}
        if scratch:  # from scratch: nothing to keep from a starting model (unless changed)
            defaults = TrainConfig()
            values = {k: v for k, v in SCRATCH_DEFAULTS.items()
                      if k in self.train_form and
                      self.train_form[k].value == getattr(defaults, k)}
        return self.train_form.build(augment=self.augment_form.build(), **values)

    def start(self) -> Any:
        """Validate the inputs and start training in a worker; returns the worker or None."""
        if self.is_running():
            _ui.notify_warning("training is already running: press Stop first")
            return None
        self.status.clear_for_run("checking the training data…")
        collected = self._collect()
        if isinstance(collected, str):
            self.status.error(collected)
            return None
        pairs, layer_pairs = collected
        n_channels = L.model_channels(layer_pairs[0][0])
        scratch = self.model_picker.is_scratch()
        try:
            config = self._config(scratch)
            model = UNet(ModelConfig(in_channels=n_channels)) if scratch \
                else self.model_picker.model()
            select_device(config.device)
        except ConfigError as exc:
            self.status.error(f"{exc}: change it under 'Advanced settings'")
            return None
        except (ModelFileError, FileNotFoundError, ValueError) as exc:
            self.status.error(str(exc))
            return None
        if model.config.in_channels != n_channels:
            self.status.error(
                f"the model {self.model_picker.label()!r} takes {model.config.in_channels} "
                f"channel(s) but {layer_pairs[0][0].name!r} gives {n_channels}: choose one "
                "channel (or their mean) under 'Channels' in the Annotate widget, or "
                f"'{self.model_picker.combo.itemText(self.model_picker.combo.count() - 1)}' "
                "under 'Start from'")
            return None
        div = model.config.divisor
        if config.tile % div:
            self.status.error(f"'patch size' ({config.tile}) must be a multiple of {div} for "
                              "this model: change it under 'Advanced settings' to "
                              f"{max(config.tile // div, 1) * div}")
            return None

        names = sorted({img.name for img, _ in layer_pairs})
        self.job = job = _TrainJob(names=names, base=self.model_picker.label())
        self._preview_image = layer_pairs[0][0]
        self._update_preview_target()
        if self.preview_check.isChecked():
            self._prepare_preview()
        gen = _train_job(job, model, pairs, config, self.preview_check.isChecked())
        self.loss_plot.clear()
        self.validation_label.setText("")
        self.progress.setRange(0, config.steps)
        self.progress.setValue(0)
        self.status.set(f"preparing {len(pairs)} annotated plane(s)…")
        return self.runner.start(job, gen, on_progress=self._on_progress,
                                 on_done=self._on_returned, on_failure=self._on_error,
                                 on_finished=self._on_finished)

    def _key_train(self) -> None:
        """Shift+T: train, or stop a running training."""
        if self.is_running():
            self.stop()
        else:
            self.start()

    def stop(self) -> None:
        """Stop after the current step; the model as trained so far is kept."""
        if self.runner.stop():
            self.status.set("stopping after the current step (the model so far is kept)…")

    # ------------------------------------------------------------ preview

    def _update_preview_target(self, *_: Any) -> None:
        job, image = self.job, self._preview_image
        if job is None or image is None or image not in self.viewer.layers:
            return
        data, axis = L.model_input(image)
        key = L.input_plane_key(self.viewer, image)
        h, w = data.shape[-2:]
        # Centre of the view in the image's data coordinates.
        point = list(self.viewer.dims.point)
        displayed = list(self.viewer.dims.displayed)
        center = list(_ui.camera(self.viewer).center)[-len(displayed):]
        for d, value in zip(displayed, center, strict=True):
            point[d] = value
        cy, cx = np.asarray(image.world_to_data(point))[-2:]
        crop = []
        for size, centre in ((h, cy), (w, cx)):
            n = min(size, PREVIEW_MAX)
            start = int(np.clip(round(centre) - n // 2, 0, size - n))
            crop.append(slice(start, start + n))
        job.preview_target = _PreviewTarget(data, key, axis, (crop[0], crop[1]),
                                            self.train_form["device"].value)

    def _preview_place(self, target: _PreviewTarget) -> dict[str, Any]:
        """Scale and translate of the preview layer for ``target``'s crop."""
        image = self._preview_image
        scale, translate = L.spatial_transform(image, L.default_channel_axis(image), 2)
        translate = tuple(t + s * sl.start for t, s, sl in
                          zip(translate, scale, target.crop, strict=True))
        return {"scale": scale, "translate": translate, "opacity": 0.5}

    def _prepare_preview(self) -> None:
        """Add the (empty) preview layer now, on the click, when none exists: adding a
        layer mid-run stalled the GUI for 0.3-0.9 s on a busy CPU; a preview then only
        copies into it."""
        job, image = self.job, self._preview_image
        if job is None or image is None or job.preview_target is None:
            return
        crop = job.preview_target.crop
        shape = (crop[0].stop - crop[0].start, crop[1].stop - crop[1].start)
        job.placeholder = L.placeholder_output(
            self.viewer, np.zeros(shape, np.uint8), image, "preview", keep_active=True,
            **self._preview_place(job.preview_target))

    def _show_preview(self, labels: np.ndarray) -> None:
        job, image = self.job, self._preview_image
        if job is None or image is None or job.last_preview is None or \
                image not in self.viewer.layers:
            return
        target, last = job.last_preview
        if last is not labels:
            return
        # Do not steal the active layer from someone painting while training runs (the
        # preview layer is only added here when it was deleted during the run).
        active = self.viewer.layers.selection.active
        L.put_output(self.viewer, labels, image, "preview", kind="labels", thumbnail=False,
                     **self._preview_place(target))
        if active is not None and active in self.viewer.layers and \
                self.viewer.layers.selection.active is not active:
            self.viewer.layers.selection.active = active

    # ------------------------------------------------------------ worker signals

    def _on_progress(self, p: TrainProgress | str) -> None:
        job = self.job
        if isinstance(p, str):  # the trainer's note on what is held out for validation
            self.validation_label.setText(p)
            self.status.set(f"{p}; scoring the starting model…" if p != "validation off"
                            else "training…")
            return
        self.progress.setValue(p.step)
        score = ""
        if p.reference is not None:
            now = time.perf_counter() - job.started if job else 0.0
            plot = self.loss_plot.series[VALIDATION]
            if plot["reference"] is None:
                self.loss_plot.set_reference(VALIDATION, p.reference.ap,
                                             f"start AP {p.reference.ap:.2f}")
                self.loss_plot.append(VALIDATION, 0, p.reference.ap)
                if job is not None:
                    job.reference_s = now
            if p.validation is not None:
                self.loss_plot.append(VALIDATION, p.step, p.validation.ap)
                if job is not None and job.first_validation_s is None:
                    job.first_validation_s = now
            last = plot["y"][-1] if plot["y"] else p.reference.ap
            score = f" · validation AP {last:.2f} (start {p.reference.ap:.2f})"
        self.status.set(f"step {p.step}/{p.total_steps} · loss {p.loss_avg:.4f}{score} · "
                        f"{p.steps_per_s:.1f} steps/s · ETA {_ui.format_seconds(p.eta)}")
        self.loss_plot.add(p.step, p.loss, p.loss_avg)
        if p.preview is not None:
            self._show_preview(p.preview)

    def _on_finished(self) -> None:
        """The live previews skipped the layer-list thumbnail: draw it once, now; a
        preview layer added on the click that never got a preview (stopped or failed
        first) is removed."""
        job, image = self.job, self._preview_image
        if job is not None and job.placeholder is not None and job.last_preview is None:
            L.remove_layers(self.viewer, [job.placeholder])
            return
        preview = L.owned_layer(self.viewer, "preview", image.name) \
            if image is not None else None
        if preview is not None:
            preview.refresh()

    def _register(self, model: UNet, steps: int, note: str = "", select: bool = True,
                  kept_step: int | None = None) -> None:
        """Put ``model`` in the registry (selected in every model picker unless ``select``
        is False); ``kept_step``: the validated snapshot it is, when not the last step."""
        job = self.job
        names = ", ".join(job.names) if job else "?"
        trainer = job.trainer if job else None
        validation = None
        if trainer is not None and trainer.best_score is not None and trainer.history:
            best = trainer.best_score if select else trainer.history[-1]
            validation = {"ap": best.ap, "pixel_iou": best.pixel_iou, "step": best.step,
                          "start_ap": trainer.history[0].ap,
                          "cells": trainer.validator.n_cells}
        model.config.provenance = {
            "base_model": job.base if job else "?", "images": job.names if job else [],
            "steps": steps, "final_loss": trainer.losses[-1] if trainer and trainer.losses
            else None, "date": time.strftime("%Y-%m-%d"), "trained_with": "napari widget",
        }
        if kept_step is not None:
            model.config.provenance["kept_step"] = kept_step
        if validation is not None:
            model.config.provenance["validation"] = dict(validation)
        if select and trainer is not None and trainer.calibration is not None:
            model.config.provenance["calibration"] = vars(trainer.calibration)
        self.model = model
        kept = f", step {kept_step} kept" if kept_step is not None and kept_step != steps \
            else ""
        entry = REGISTRY.add(model, f"fine-tuned on {names} ({steps} steps{kept}{note})",
                             kind="finetuned", images=job.names if job else [],
                             base=job.base if job else None, validation=validation,
                             select=select)
        self.model_label = entry.label
        self.save_button.setEnabled(True)

    def _on_returned(self, model: UNet) -> None:
        """``model`` is what the run returned: ``Trainer.selected``, the best snapshot by
        validation (the starting model when none beat it), else the last good one."""
        job = self.job
        trainer = job.trainer if job else None
        steps = trainer.step if trainer else 0
        stopped = bool(job and job.stop)
        self.loss_plot.redraw()
        elapsed = time.perf_counter() - job.started if job else 0.0
        head = f"{'stopped' if stopped else 'done'} after {steps} steps " \
               f"({_ui.format_seconds(elapsed)})"
        validated = trainer is not None and trainer.best_score is not None
        if validated and job is not None and trainer.best_score.step == 0 and \
                job.base != SCRATCH_LABEL:  # (a random start is no model to keep)
            # Fine-tuning made nothing better on the held-out cells: the starting model stays
            # in use; the last snapshot is listed (not selected) for whoever wants it anyway.
            self._register(trainer.model, steps, ", not better than the start",
                           select=False)
            REGISTRY.select.emit(job.base)
            self.status.warning(
                f"{head}: {job.base!r} stays selected in the Segment widget (the fine-tuned "
                f"model is listed as {self.model_label!r} if you want it anyway) · "
                f"{trainer.message}", notify=False)
            return
        kept_step = trainer.best_score.step if validated else None
        self._register(model, steps, ", stopped" if stopped else "", kept_step=kept_step)
        ending = f" · {trainer.message}" if validated else ""
        self.status.set(f"{head}: the model is now selected in the Segment widget as "
                        f"{self.model_label!r}{ending}")

    def _on_error(self, exc: BaseException) -> None:
        job = self.job
        trainer = job.trainer if job else None
        message = f"training failed: {_ui.gui_message(str(exc))}"
        if trainer is not None and trainer.step > 0:
            self._register(trainer.model, trainer.step, ", last good before an error")
            message += f" — the last good model is kept as {self.model_label!r}"
        self.status.error(message)

    # ------------------------------------------------------------ saving

    def _ask_save(self) -> None:
        if self.model is None:
            self.status.error("no trained model yet: press Train first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "finetuned.safetensors",
                                              MODEL_FILTER)
        if path:
            # The dialog has asked about replacing the file it returns; a suffix we add
            # ourselves may name another existing file, which save_model_to asks about.
            confirmed = path.endswith(".safetensors")
            self.save_model_to(path, overwrite=True if confirmed else None)

    def save_model_to(self, path: str, overwrite: bool | None = False) -> str | None:
        """Save the last trained model; ``overwrite=None`` asks before replacing a file."""
        if self.model is None:
            self.status.error("no trained model yet: press Train first")
            return None
        if not path.endswith(".safetensors"):
            path += ".safetensors"
        try:
            save_model(self.model, path, overwrite=bool(overwrite))
        except FileExistsError:
            if overwrite is None and _ui.confirm(self, f"{path} exists. Replace it?"):
                return self.save_model_to(path, overwrite=True)
            self.status.warning(f"not saved: {path} exists (press 'Save model…' and pick "
                                "another name)")
            return None
        except (OSError, ModelFileError) as exc:
            self.status.error(f"could not save the model: {exc}")
            return None
        self.status.set(f"model saved to {path}")
        _ui.notify_info(f"model saved to {path}")
        return path


__all__ = ["TrainWidget"]
