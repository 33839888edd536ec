"""The models the widgets offer: the bundled one, models trained in this session and model
files, shared by all widgets through one registry."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QPushButton, QWidget

from ..model import ModelFileError, UNet, bundled_model_path, load_model
from ..postprocess import describe_recommended
from . import _ui

MODEL_FILTER = "napari-unet model (*.safetensors)"
OPEN_MODEL_FILTER = f"{MODEL_FILTER};;bioimage.io package made by napari-unet (*.zip *.yaml)"
DEVICES = ("auto", "cuda", "mps", "cpu")

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

    def describe(self) -> str:
        """One line for the user: what this model is, how it scored on held-out cells and
        which post-processing thresholds it brings."""
        info = self.info
        if info.get("kind") != "finetuned":
            if self.label == BUNDLED_LABEL:
                text = "bundled pretrained model (not validated on your images)"
            else:
                text = f"model file {self.path.name}" if self.path is not None else self.label
        else:
            text = f"fine-tuned on {', '.join(info.get('images', [])) or '?'}"
            score = info.get("validation")
            if score is not None:
                text += (f" · validation AP {score['ap']:.2f} (start {score['start_ap']:.2f}, "
                         f"step {score['step']}, {score['cells']} held-out cell(s))")
            else:
                text += " · not validated (fewer than 5 painted cells, or validation share 0)"
        calibrated = self.model.config.postprocess if self.model is not None else {}
        if calibrated:
            text += " · calibrated thresholds: " + describe_recommended(calibrated)
        return text


class ModelRegistry:
    """Models shared between the widgets of one session (fine-tuned, or loaded from files)."""

    added = Signal(object)  # ModelEntry
    select = Signal(str)  # a label the pickers should switch to (e.g. the starting model)

    def __init__(self) -> None:
        self._entries: list[ModelEntry] = []

    def add(self, model: UNet, label: str, path: Path | None = None, **info: Any) -> ModelEntry:
        """Register a model; widgets offering a model choice list it and select it (unless
        ``info['select']`` is False: listed only, e.g. a fine-tuned model that scored worse
        than its start)."""
        base, n = label, 2
        while any(e.label == label for e in self._entries):
            label, n = f"{base} ({n})", n + 1
        entry = ModelEntry(label, model, path, info)
        self._entries.append(entry)
        self.added.emit(entry)
        return entry

    def get(self, label: str) -> ModelEntry | None:
        return next((e for e in self._entries if e.label == label), None)

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
        # Long labels ("fine-tuned on ... (300 steps)") must not widen the dock.
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(14)
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
        REGISTRY.select.connect(self._on_select)

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
            self.refresh(select=entry.label if entry.info.get("select", True) else None)

    def _on_select(self, label: str) -> None:
        with contextlib.suppress(RuntimeError):
            if label in self._entries:
                self.combo.setCurrentText(label)

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

    def entry(self) -> ModelEntry | None:
        """The chosen registry entry (None for 'from scratch')."""
        return self._entries.get(self.combo.currentText())

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
        _ui.notify_error(f"cannot use {path.name} as a model: {exc}")
        return None
    return REGISTRY.add(model, f"file: {path.name}", path=path, kind="file")
