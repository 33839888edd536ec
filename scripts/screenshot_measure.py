"""Screenshot of the Measure widget on the bundled sample: docs/screenshots/measure.png.

Segments the sample with the bundled model, measures the labels against the image and
shows the per-object table. Run under a (virtual) display, e.g.:

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_measure.py
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.instance().processEvents()
        time.sleep(0.01)


def main() -> None:
    import napari
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets.measure import MeasureWidget
    from napari_unet.model import load_model
    from napari_unet.sample import load_sample
    from napari_unet.segment import segment

    image = load_sample()[0]
    labels = segment(image, load_model(), device="cpu")
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.add_image(image, name="nuclei")
    viewer.add_labels(labels, name="nuclei labels")
    widget = MeasureWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Measure (napari-unet)", area="right")
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dock], [640], Qt.Orientation.Horizontal)
    widget.image_combo.setCurrentText("nuclei")
    widget.run()
    _pump(1.0)
    viewer.reset_view()  # fit the image to the canvas the dock left
    _pump(0.5)
    for w in QApplication.topLevelWidgets() + viewer.window._qt_window.findChildren(
            NapariQtNotification):
        if isinstance(w, NapariQtNotification):
            w.close()
    _pump(0.5)
    out = ROOT / "docs" / "screenshots" / "measure.png"
    viewer.window._qt_window.grab().save(str(out))
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main()
