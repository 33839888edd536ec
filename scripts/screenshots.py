"""Drive the napari widgets in a real window and save screenshots to docs/screenshots/.

Run under a (virtual) display, e.g.:

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py

Writes annotate.png (sample + sparse annotation + Annotate widget), train.png (training
mid-run: loss curve and live preview), validation.png (training done: the held-out
validation AP beside the loss, the starting model's score as a dashed line, and the closing
sentence) and segment.png (the segmentation result), each at 1600 x 1000 with the three
docks open as tabs of one dock area. ``--only validation`` retakes just one of them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ("annotate", "train", "validation", "segment")


def _pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def _show_dock(dock) -> None:
    _pump(0.2)
    dock.show()
    dock.raise_()
    _pump(0.2)


def _shot(viewer, path: Path) -> None:
    if path.stem not in _shot.only:
        return
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    _pump(0.5)
    for widget in QApplication.topLevelWidgets() + viewer.window._qt_window.findChildren(
            NapariQtNotification):
        if isinstance(widget, NapariQtNotification):
            widget.close()  # toasts (e.g. the PyQt5 deprecation warning) hide the canvas
    _pump(0.3)
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=SHOTS,
                        help="the screenshots to write (the others are left as they are)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _shot.only = set(args.only)

    import napari

    from napari_unet._widgets import _common as c
    from napari_unet._widgets.demo import open_demo_viewer
    from napari_unet.model import bundled_model_path

    viewer = napari.Viewer(title="napari-unet")
    viewer.window._qt_window.resize(*args.size)
    demo = open_demo_viewer(viewer)
    annotate, train, segment = (demo.widgets[k] for k in ("Annotate", "Train", "Segment"))
    image = viewer.layers["nuclei"]
    annotation = viewer.layers["nuclei annotation"]
    viewer.reset_view()

    # 1. Annotate: the sample with its sparse annotation, brush ready for a new cell.
    _show_dock(demo.docks["Annotate"])
    annotate.image_combo.set_layer(image)
    annotate.annotation_combo.set_layer(annotation)
    annotate.next_cell_id()
    _wait(lambda: "cells" in annotate.counts_label.text(), 5, "annotation counts")
    _shot(viewer, args.out / "annotate.png")

    # 2. Train: fine-tune the bundled model (or train from scratch without one), mid-run.
    _show_dock(demo.docks["Train"])
    if not bundled_model_path().is_file():
        print("no bundled model: training a new model from scratch for the screenshots")
        train.model_picker.set_label(c.SCRATCH_LABEL)
    train.settings.set(steps=args.steps, device=args.device)
    if train.start() is None:
        raise SystemExit("training did not start")
    half = max(args.steps // 2, 1)
    _wait(lambda: train.job.trainer is not None and train.job.trainer.step >= half
          and c.owned_layer(viewer, "preview", "nuclei") is not None, 600, "training")
    train.loss_plot.redraw()
    _shot(viewer, args.out / "train.png")
    _wait(lambda: not train.is_running(), 900, "the end of training")
    print(train.status.plain())
    train.loss_plot.redraw()
    _shot(viewer, args.out / "validation.png")
    if "segment" not in _shot.only:
        viewer.close()
        return

    # 3. Segment: the fine-tuned model (selected automatically) on the whole image.
    _show_dock(demo.docks["Segment"])
    preview = c.owned_layer(viewer, "preview", "nuclei")
    if preview is not None:
        preview.visible = False
    annotation.visible = False
    segment.settings.set(device=args.device)
    print(f"segmenting with {segment.model_picker.label()!r}")
    if segment.run() is None:
        raise SystemExit("segmentation did not start")
    _wait(lambda: not segment.is_running(), 300, "segmentation")
    labels = c.owned_layer(viewer, "labels", "nuclei")
    labels.contour = 0
    labels.opacity = 0.55
    viewer.layers.selection.active = labels
    _shot(viewer, args.out / "segment.png")
    viewer.close()


if __name__ == "__main__":
    main()
