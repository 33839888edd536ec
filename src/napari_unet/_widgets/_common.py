"""Compatibility names for modules written against the earlier single helper module.

The helpers now live by concern: ``_ui`` (notifications, status, layout), ``_layers``
(pickers, channels, planes, output layers), ``_annotations`` (fully annotated regions),
``_models`` (model registry and picker), ``_worker`` (the shared worker helper),
``_forms`` (magicgui forms from the configuration dataclasses) and ``_plot``.
"""

from __future__ import annotations

from ._annotations import (
    annotation_meta,
    annotation_of,
    complete_mask,
    complete_planes,
    find_regions_layer,
    regions_layer_name,
    set_plane_complete,
)
from ._layers import (
    TAG,
    ChannelPicker,
    LayerCombo,
    annotation_plane_key,
    default_channel_axis,
    free_name,
    image_problem,
    label_shape,
    layer_array,
    lead_index,
    model_input,
    owned_layer,
    plane_key,
    put_output,
    remember_channel_axis,
    spatial_transform,
)
from ._models import (
    BUNDLED_LABEL,
    DEVICES,
    MODEL_FILTER,
    REGISTRY,
    SCRATCH_LABEL,
    ModelEntry,
    ModelPicker,
    ModelRegistry,
    load_model_file,
)
from ._ui import (
    bold,
    camera,
    confirm,
    file_stem,
    format_seconds,
    notify_error,
    notify_info,
    notify_warning,
)
from ._worker import Failure, JobRunner, guarded, logger, make_worker

__all__ = [
    "make_worker",
    "BUNDLED_LABEL", "DEVICES", "MODEL_FILTER", "REGISTRY", "SCRATCH_LABEL", "TAG",
    "ChannelPicker", "Failure", "JobRunner", "LayerCombo", "ModelEntry", "ModelPicker",
    "ModelRegistry", "annotation_meta", "annotation_of", "annotation_plane_key", "bold",
    "camera", "complete_mask", "complete_planes", "confirm", "default_channel_axis",
    "file_stem", "find_regions_layer", "format_seconds", "free_name", "guarded",
    "image_problem", "label_shape", "layer_array", "lead_index", "load_model_file", "logger",
    "model_input", "notify_error", "notify_info", "notify_warning", "owned_layer",
    "plane_key", "put_output", "regions_layer_name", "remember_channel_axis",
    "set_plane_complete", "spatial_transform",
]
