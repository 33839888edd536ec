"""Viewer-wide keyboard shortcuts of the Train and Segment widgets.

Bound on the viewer when a widget opens and unbound when it is destroyed (its dock closed),
so they work whatever layer is selected. Shift+letter, like Annotate's corrections
(Shift+D/M/S/N on the annotation layer): napari's layers use the plain letters, and
Shift+T / Shift+G are free in napari 0.9.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from napari.utils.key_bindings import coerce_keybinding
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QLabel, QWidget

TRAIN = ("Shift-T", "train (stop while training)")
SEGMENT = ("Shift-G", "segment (cancel while segmenting)")


def describe(*shortcuts: tuple[str, str]) -> str:
    """``Shift+T train …`` lines for a widget's key hint."""
    return "<br>".join(f"<b>{key.replace('-', '+')}</b> {text}" for key, text in shortcuts)


def key_hint(*shortcuts: tuple[str, str]) -> QLabel:
    """A small label listing the shortcuts (shown in the widget next to its buttons)."""
    label = QLabel("Keys: " + describe(*shortcuts))
    label.setWordWrap(True)
    return label


def bind(widget: QWidget, viewer: Any, key: str, method: str) -> Callable[[Any], None]:
    """Bind ``key`` on ``viewer`` to ``widget.<method>()`` while the widget is open.

    Unbound when the widget leaves its dock (napari's close / ``remove_dock_widget`` takes
    it out of the dock) or is destroyed, bound again when it is docked again. The viewer
    holds a weak reference only: a closed widget is neither kept alive nor called. Returns
    the callback (tests press a key by calling it).
    """
    ref = weakref.ref(widget)

    def callback(_viewer: Any = None) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    def bind_it() -> None:
        viewer.bind_key(key, callback, overwrite=True)

    def unbind(*_: Any) -> None:
        # Only our own binding: a second widget of the same kind may have taken the key.
        if viewer.keymap.get(coerce_keybinding(key)) is callback:
            viewer.bind_key(key, None, overwrite=True)

    bind_it()
    widget.installEventFilter(_Docking(widget, bind_it, unbind))
    widget.destroyed.connect(unbind)
    return callback


class _Docking(QObject):
    """Calls ``on_undock`` when the widget loses its parent (its dock closed) and
    ``on_dock`` when it gets one again."""

    def __init__(self, widget: QWidget, on_dock: Callable[[], None],
                 on_undock: Callable[[], None]) -> None:
        super().__init__(widget)
        self._on_dock, self._on_undock = on_dock, on_undock

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange:
            (self._on_undock if obj.parent() is None else self._on_dock)()
        return False
