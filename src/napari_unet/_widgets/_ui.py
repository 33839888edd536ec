"""Small Qt pieces every widget uses: notifications, the status box, collapsible sections,
the scroll-area wrapper and docking the three widgets as tabs of one dock area."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QLabel,
    QMessageBox,
    QProgressBar,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

# ---------------------------------------------------------------- notifications
# Widgets call these (never napari's functions directly) so tests can capture them.


def notify_error(message: str) -> None:
    """Tell the user something went wrong and what to do about it."""
    show_error(message)


def notify_warning(message: str) -> None:
    show_warning(message)


def notify_info(message: str) -> None:
    show_info(message)


def confirm(parent: QWidget | None, question: str) -> bool:
    """Yes/No question (default No)."""
    answer = QMessageBox.question(parent, "napari-unet", question,
                                  QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


def gui_message(text: str) -> str:
    """An engine message with its library/CLI advice replaced by what to click."""
    replacements = {
        "(for example with numpy.nan_to_num) before segmenting or training":
            "in the image file (e.g. Fiji: Process > Math > Remove NaNs…) and open it again",
        "lower the learning rate and train again":
            "lower 'learning rate' under 'Advanced settings' and press Train again",
    }
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- status


class StatusBox(QLabel):
    """A widget's persistent, selectable status line: what runs, what finished, what failed.

    Errors stay here (red) until the next run clears them; toasts vanish and cut long file
    names, so the status is where the user reads what to do.
    """

    COLORS = {"error": "#e06666", "warning": "#e69138"}

    def __init__(self, text: str = "ready", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextFormat(Qt.RichText)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.TextSelectableByKeyboard)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.level = "info"
        self.set(text)

    def set(self, text: str, level: str = "info") -> None:
        """Show ``text`` (plain text; ``level``: info, warning or error)."""
        self.level = level
        body = html.escape(text).replace("\n", "<br>")
        color = self.COLORS.get(level)
        self.setText(f'<span style="color:{color}">{body}</span>' if color else body)

    def plain(self) -> str:
        """The text shown, without markup."""
        return html.unescape(re.sub(r"<br>", "\n", re.sub(r"<(?!br>)[^>]+>", "", self.text())))

    def clear_for_run(self, text: str) -> None:
        """A new run starts: forget the previous run's result or error."""
        self.set(text)

    def error(self, text: str, notify: bool = True) -> None:
        """Show an error here (persistent) and, by default, as a toast."""
        self.set(text, "error")
        if notify:
            notify_error(text)

    def warning(self, text: str, notify: bool = True) -> None:
        self.set(text, "warning")
        if notify:
            notify_warning(text)


class ProgressBar(QProgressBar):
    """A progress bar that repaints with the rest of the window, never on its own.

    ``QProgressBar.setValue`` repaints synchronously; in a window holding napari's OpenGL
    canvas every repaint re-composes and flushes the whole window (about 30 ms of the GUI
    thread under software OpenGL at 1600 x 1000, measured). Here the value changes with
    updates disabled and the bar is only marked dirty: it is painted in the same flush as
    the status line and the loss plot.
    """

    def setValue(self, value: int) -> None:  # noqa: N802 (Qt API)
        if value == self.value():
            return
        self.setUpdatesEnabled(False)
        try:
            super().setValue(value)
        finally:
            self.setUpdatesEnabled(True)  # (schedules one asynchronous paint)


# ---------------------------------------------------------------- layout


class Collapsible(QWidget):
    """A titled section that starts folded (advanced settings, extra actions)."""

    def __init__(self, title: str, content: QWidget, *, expanded: bool = False,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.toggle.setStyleSheet("QToolButton { border: none; }")
        self.content = content
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.toggle)
        lay.addWidget(content)
        self.toggle.toggled.connect(self.set_expanded)
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        self.toggle.setChecked(expanded)
        self.toggle.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.content.setVisible(expanded)

    def is_expanded(self) -> bool:
        return self.toggle.isChecked()


def scrolled(widget: QWidget, body: QWidget) -> QVBoxLayout:
    """Put ``body`` into a scroll area filling ``widget``: a dock then never needs more
    height than the window has (the three docks share 1000 px as tabs or side by side)."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    area.setWidget(body)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    widget.setMinimumHeight(120)
    widget._scroll_area = area  # for fit_width
    return QVBoxLayout(body)


def fit_width(widget: QWidget) -> None:
    """Make the scroll area (and so the dock) as wide as its content needs: it scrolls
    vertically only, so content wider than the dock would be cut off on the right."""
    area = getattr(widget, "_scroll_area", None)
    if area is not None and area.widget() is not None:
        need = area.widget().minimumSizeHint().width()
        area.setMinimumWidth(need + area.verticalScrollBar().sizeHint().width() + 2)


class TabbedDock:
    """Mixin: the first time a napari-unet widget is shown in a dock, tabify that dock with
    the other napari-unet docks already open, so the three share one dock area."""

    _tabified = False

    def event(self, event: Any) -> bool:
        # napari puts the widget into its dock, then the dock into the window: tabify once
        # the event loop is back, when both have happened.
        if event.type() == QEvent.ParentChange and not self._tabified:
            QTimer.singleShot(0, self._tabify_once)
        return super().event(event)  # type: ignore[misc]

    def _tabify_once(self) -> None:
        if not self._tabified and _dock_of(self) is not None:  # type: ignore[arg-type]
            self._tabified = True
            tabify_with_siblings(self)  # type: ignore[arg-type]


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def tabify_with_siblings(widget: QWidget) -> None:
    """Put the dock holding ``widget`` into one tab group with the other docks that hold a
    TabbedDock widget (the napari-unet docks), leaving floating and hidden ones alone."""
    dock = _dock_of(widget)
    window = dock.parentWidget() if dock is not None else None
    if dock is None or window is None or not hasattr(window, "tabifyDockWidget"):
        return
    ours = [d for d in window.findChildren(QDockWidget)
            if not d.isHidden() and not d.isFloating()
            and any(isinstance(w, TabbedDock) for w in d.findChildren(QWidget))]
    if dock not in ours or len(ours) < 2:
        return
    anchor = ours[0]  # always the same one: re-tabifying a grouped dock splits groups
    for other in ours[1:]:
        if other not in window.tabifiedDockWidgets(anchor):
            window.tabifyDockWidget(anchor, other)
    dock.raise_()


# ---------------------------------------------------------------- text helpers


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


def bold(text: str) -> str:
    return f"<b>{text}</b>"


def camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
