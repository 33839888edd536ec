"""A light loss plot painted with QPainter: a few hundred points cost well under a
millisecond to draw, where a matplotlib redraw took 100-700 ms of the GUI thread.

What costs is the window flush every repaint triggers (about 30 ms under software OpenGL,
the window holding napari's canvas): new points only mark the plot dirty, so it is painted
with the other widgets' updates of the same event-loop turn (the worker delivers them at
most every ``_worker.LIVE_INTERVAL_S``), not on a timer of its own."""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

GREY = QColor("#9a9a9a")  # readable on napari's dark and light themes


class LossPlot(QWidget):
    """Curves of (step, value) series sharing one x axis; the loss and its running mean by
    default, and more series on demand (e.g. a validation score: :meth:`add_series`)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.series: dict[str, dict] = {}
        self.add_series("loss", "#6fa8dc", 1.0)
        self.add_series("mean of 20", "#ff9900", 2.0)

    def add_series(self, name: str, color: str, width: float = 1.5,
                   own_axis: bool = False, top: float | None = None,
                   markers: bool = False) -> None:
        """A new curve; ``own_axis`` scales it to its own range (e.g. a score in [0, 1]),
        from 0 to ``top`` when given (else 1.1 x its largest value), labelled on the right;
        ``markers`` draws a dot at each point (sparse series such as scores every N steps)."""
        self.series[name] = {"x": [], "y": [], "color": QColor(color), "width": width,
                             "own_axis": own_axis, "top": top, "markers": markers,
                             "reference": None,
                             "reference_label": ""}

    def set_reference(self, name: str, value: float | None, label: str = "") -> None:
        """A dashed horizontal line at ``value`` on series ``name``'s axis (e.g. the
        starting model's score), named ``label`` in the legend; None removes it."""
        s = self.series[name]
        s["reference"], s["reference_label"] = value, label
        self.update()

    # kept for callers of the earlier plot
    @property
    def steps(self) -> list[int]:
        return self.series["loss"]["x"]

    @property
    def losses(self) -> list[float]:
        return self.series["loss"]["y"]

    def clear(self) -> None:
        for s in self.series.values():
            s["x"], s["y"] = [], []
            s["reference"], s["reference_label"] = None, ""
        self.update()

    def add(self, step: int, loss: float, mean: float) -> None:
        """Append one training step (loss and running mean)."""
        self.append("loss", step, loss)
        self.append("mean of 20", step, mean)

    def append(self, name: str, x: float, y: float) -> None:
        s = self.series[name]
        s["x"].append(x)
        s["y"].append(y)
        self.update()  # coalesced: one paint per event-loop turn

    def redraw(self) -> None:
        self.update()

    def sizeHint(self):  # noqa: N802 (Qt API)
        from qtpy.QtCore import QSize

        return QSize(260, 130)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setPen(GREY)
        font = painter.font()
        font.setPointSizeF(max(font.pointSizeF() - 1.5, 6))
        painter.setFont(font)
        rect = QRectF(self.rect()).adjusted(36, 16, -6, -16)
        loss = self.series["loss"]
        if not loss["x"]:
            painter.drawText(self.rect(), Qt.AlignCenter, "loss curve: appears when "
                             "training runs")
            return
        x_max = max(float(loss["x"][-1]), 10.0)
        ys = np.asarray(loss["y"], float)
        ys = ys[np.isfinite(ys)]
        hi = float(np.percentile(ys, 98)) * 1.1 if ys.size > 5 else \
            (float(ys.max()) * 1.1 if ys.size else 1.0)
        hi = hi if math.isfinite(hi) and hi > 0 else 1.0
        painter.drawRect(rect)
        painter.drawText(QRectF(0, rect.top() - 6, 34, 12), Qt.AlignRight, f"{hi:.3g}")
        painter.drawText(QRectF(0, rect.bottom() - 6, 34, 12), Qt.AlignRight, "0")
        painter.drawText(QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
                         Qt.AlignRight, f"step {int(loss['x'][-1])}")
        legend_x = rect.left() + 4
        for name, s in self.series.items():
            if not s["x"] and s["reference"] is None:
                continue
            top = hi
            if s["own_axis"]:
                finite = [v for v in s["y"] if math.isfinite(v)]
                top = s["top"] or (max(finite) * 1.1 if finite and max(finite) > 0 else 1.0)
                # Its own scale, read on the right edge in its colour.
                painter.setPen(s["color"])
                painter.drawText(QRectF(rect.right() - 40, rect.top() + 1, 38, 12),
                                 Qt.AlignRight, f"{top:.3g}")
            if s["reference"] is not None and math.isfinite(s["reference"]):
                py = rect.bottom() - rect.height() * min(max(s["reference"] / top, 0.0), 1.0)
                painter.setPen(QPen(s["color"], 1.0, Qt.DashLine))
                painter.drawLine(QPointF(rect.left(), py), QPointF(rect.right(), py))
                painter.drawText(QPointF(rect.left() + 4, py - 3), s["reference_label"])
            path = QPainterPath()
            # Thin the points to about one per pixel column: cheap at any run length.
            stride = max(1, len(s["x"]) // max(int(rect.width()), 1))
            first = True
            dots = []
            for x, y in zip(s["x"][::stride], s["y"][::stride], strict=True):
                if not math.isfinite(y):
                    continue
                px = rect.left() + rect.width() * x / x_max
                py = rect.bottom() - rect.height() * min(max(y / top, 0.0), 1.0)
                dots.append(QPointF(px, py))
                if first:
                    path.moveTo(QPointF(px, py))
                    first = False
                else:
                    path.lineTo(QPointF(px, py))
            painter.setPen(QPen(s["color"], s["width"]))
            painter.drawPath(path)
            if s["markers"] or len(dots) == 1:  # a lone point is an invisible path
                painter.setBrush(s["color"])
                for dot in dots:
                    painter.drawEllipse(dot, 3.0, 3.0)
                painter.setBrush(Qt.NoBrush)
            painter.drawText(QPointF(legend_x, rect.top() - 4), name)
            legend_x += painter.fontMetrics().horizontalAdvance(name) + 12
