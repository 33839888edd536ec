"""The one place that names each setting drives checks, CLI options and widget forms."""

import argparse

import pytest

from napari_unet.params import ConfigError, add_arguments, from_args, widget_options
from napari_unet.postprocess import PostprocessConfig
from napari_unet.segment import InferenceConfig
from napari_unet.train import TrainConfig


@pytest.mark.parametrize("cls, kwargs, words", [
    (InferenceConfig, {"batch_size": 0}, "batch_size"),
    (InferenceConfig, {"tile": 100}, "multiple of 8"),
    (InferenceConfig, {"tile": 128, "overlap": 128}, "smaller than the tile"),
    (PostprocessConfig, {"min_size": -1}, ">= 0"),
    (PostprocessConfig, {"mode": "blobs"}, "one of instances, semantic"),
    (TrainConfig, {"lr": float("nan")}, "lr"),
    (TrainConfig, {"steps": 0}, "steps"),
])
def test_out_of_range_settings_name_the_setting_and_range(cls, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        cls(**kwargs)


def test_cli_options_and_widget_options_come_from_the_same_spec():
    parser = argparse.ArgumentParser()
    add_arguments(parser, InferenceConfig, only=["tile", "batch_size", "precision"])
    args = parser.parse_args(["--tile", "128", "--batch-size", "2", "--precision", "fp32"])
    cfg = from_args(InferenceConfig, args)
    assert (cfg.tile, cfg.batch_size, cfg.precision) == (128, 2, "fp32")
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])
    opts = widget_options(InferenceConfig, "tile")
    assert opts["step"] == 8 and opts["min"] == 8 and "tile" in opts["tooltip"]
    assert widget_options(PostprocessConfig, "mode")["choices"] == ["instances", "semantic"]
