"""The interactive demo: the sample image and its sparse annotation, with the three widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Demo:
    """A viewer set up for the demo, its widgets and their dock widgets (by name)."""

    viewer: Any
    widgets: dict[str, Any]
    docks: dict[str, Any]


def open_demo_viewer(viewer: Any | None = None) -> Demo:
    """Load the sample into a viewer (a new one by default) and dock the three widgets."""
    import napari

    from .._sample_data import nuclei_sample
    from . import AnnotateWidget, SegmentWidget, TrainWidget

    viewer = viewer or napari.Viewer(title="napari-unet demo")
    for data, kwargs, kind in nuclei_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widgets = {"Annotate": AnnotateWidget(viewer), "Train": TrainWidget(viewer),
               "Segment": SegmentWidget(viewer)}
    docks = {}
    for i, (name, widget) in enumerate(widgets.items()):
        docks[name] = viewer.window.add_dock_widget(widget, name=name, area="right",
                                                    tabify=i > 0)
    docks["Annotate"].raise_()
    viewer.layers.selection.active = viewer.layers[-1]
    return Demo(viewer, widgets, docks)


def launch_demo() -> None:
    """Open the demo window and run napari's event loop until it is closed."""
    import napari

    open_demo_viewer()
    napari.run()
