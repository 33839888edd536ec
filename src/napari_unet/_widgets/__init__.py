"""napari widgets of napari-unet: Annotate, Train, Segment (thin layers over the engine)."""

from .annotate import AnnotateWidget
from .segment import SegmentWidget
from .train import TrainWidget

__all__ = ["AnnotateWidget", "SegmentWidget", "TrainWidget"]
