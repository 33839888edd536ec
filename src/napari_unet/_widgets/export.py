"""'Export to bioimage.io…': a button that writes a model as a bioimage.io package.

Thin over :func:`napari_unet.bioimageio.export_model_iter`; the export (a forward pass,
TorchScript tracing, zipping) runs in a worker thread so the viewer stays responsive.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog, QPushButton, QWidget

from ..model import UNet
from . import _ui, _worker

PACKAGE_FILTER = "bioimage.io package (*.zip)"


class ExportButton(QPushButton):
    """Exports the model ``get_model()`` returns (None: nothing to export yet)."""

    def __init__(self, get_model: Callable[[], UNet | None],
                 parent: QWidget | None = None) -> None:
        super().__init__("Export to bioimage.io…", parent)
        self.setToolTip("write the model as a bioimage.io package (zip) that other tools "
                        "(bioimageio.core, deepImageJ, ilastik, ...) can run")
        self.get_model = get_model
        self.worker: Any = None
        self.clicked.connect(self._ask)

    def _ask(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export to bioimage.io", "model.zip",
                                              PACKAGE_FILTER)
        if path:
            # The dialog asked before returning an existing file; a suffix we add ourselves
            # could name another file, which is then refused (never replaced unasked).
            confirmed = path.lower().endswith(".zip")
            self.export_to(path if confirmed else path + ".zip", overwrite=confirmed)

    def export_to(self, path: str | Path, *, overwrite: bool = False, start: bool = True) -> Any:
        """Start exporting to ``path``; returns the worker (None if nothing to export)."""
        model = self.get_model()
        if model is None:
            _ui.notify_error("no model to export: train one or pick a model first")
            return None
        try:
            from ..bioimageio import export_model_iter
        except ImportError as exc:
            _ui.notify_error(str(exc))
            return None
        gen = export_model_iter(model, path, overwrite=overwrite)
        self.setEnabled(False)
        self.worker = _worker.make_worker(
            gen, yielded=lambda msg: self.setText(f"Exporting: {msg}…"),
            returned=self._done, errored=self._failed, finished=self._finished)
        if start:
            self.worker.start()
        return self.worker

    def _done(self, result: Any) -> None:
        if isinstance(result, _worker.Failure):
            self._failed(result.error)
            return
        _ui.notify_info(f"bioimage.io package written to {result}")

    def _failed(self, exc: BaseException) -> None:
        _ui.notify_error(f"export failed: {exc}")

    def _finished(self) -> None:
        self.setText("Export to bioimage.io…")
        self.setEnabled(True)
