"""Old name of the batch runner: use :mod:`napari_unet.batch` (running) and
:mod:`napari_unet.batch_plan` (planning). Kept only so code written against it still
imports; it will be removed."""

from .batch import (  # noqa: F401
    PLANE_STRIDE,
    PROGRESS_DIR,
    BatchError,
    BatchProgress,
    BatchResult,
    Job,
    StitchSettings,
    connect_scheduler,
    local_client,
    model_loads,
    segment_batch,
)
