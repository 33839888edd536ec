import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_unet.model import (
    ModelConfig,
    ModelFileError,
    UNet,
    bundled_model_path,
    check_channels,
    load_model,
    save_model,
)


def test_unet_shapes_and_parameters():
    net = UNet(ModelConfig(depth=4, base_channels=16)).eval()
    out = net(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    n = sum(p.numel() for p in net.parameters())
    assert 400_000 < n < 600_000
    # Encoder: 3x3 conv pairs; decoder: 2x2 up-convolutions; head: 1x1 conv.
    assert net.upconv[0].kernel_size == (2, 2) and net.head.kernel_size == (1, 1)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = UNet(ModelConfig(depth=3, base_channels=4, provenance={"who": "test"})).eval()
    path = save_model(net, tmp_path / "m.safetensors")
    again = load_model(path)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), again(x))
    assert again.config.provenance == {"who": "test"}
    assert again.config.depth == 3 and again.config.postprocess == {}
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(net, path)
    save_model(net, path, overwrite=True)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED_PATH', 'w').write('x')",))


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil()).replace(b"PWNED_PATH", str(marker).encode())
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(payload)
    with pytest.raises(ModelFileError, match="not a napari-unet model"):
        load_model(evil)
    torch_file = tmp_path / "torch.pt"
    torch.save({"x": torch.zeros(1)}, torch_file)
    with pytest.raises(ModelFileError):
        load_model(torch_file)
    assert not marker.exists()


def test_other_safetensors_and_missing_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ModelFileError, match="not a napari-unet model"):
        load_model(other)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match=".safetensors"):
        save_model(UNet(), tmp_path / "m.pt")


def test_channel_mismatch_message():
    with pytest.raises(ModelFileError, match="expects 1 channel.*has 3"):
        check_channels(1, 3)


def test_bundled_model_loads_and_has_provenance():
    net = load_model()
    cfg = net.config
    assert bundled_model_path().stat().st_size < 5_000_000
    assert cfg.in_channels == 1 and cfg.classes == ("background", "interior", "boundary")
    scores = cfg.provenance["validation_scores"]
    assert all(0 <= s["ap"] <= 1 for s in scores.values())
    # The validation sets were never trained on.
    trained = {n for names in cfg.provenance["trained_on"].values() for n in names}
    validation = {n for names in cfg.provenance["validation"].values() for n in names}
    assert {"dsb2018_nuclei", "gowt1_nuclei", "isbi2012_em"} <= set(scores)
    assert not trained & validation
    with torch.no_grad():
        out = net(torch.from_numpy(np.zeros((1, 1, 64, 64), np.float32)))
    assert torch.isfinite(out).all()


def test_every_container_refuses_non_finite_weights_and_other_architectures(tmp_path):
    """model_from_state / check_architecture guard model files and bioimage.io packages."""
    from napari_unet.model import check_architecture, model_from_state

    config = ModelConfig(depth=2, base_channels=4)
    state = UNet(config).state_dict()
    state["head.weight"] = state["head.weight"].clone().fill_(float("nan"))
    with pytest.raises(ModelFileError, match="NaN"):
        model_from_state(config, state, tmp_path / "pkg.zip")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    with pytest.raises(ModelFileError, match="do not match"):
        check_architecture(ModelConfig(depth=3, base_channels=4), shapes, tmp_path / "pkg.zip")
    check_architecture(config, shapes, tmp_path / "pkg.zip")


def test_recommended_thresholds_travel_with_the_model(tmp_path):
    """A calibrated model file brings its thresholds: Python API defaults, explicit wins."""
    from _synthetic import touching_disks
    from napari_unet.postprocess import PostprocessConfig, recommended
    from napari_unet.segment import InferenceConfig, Predictor, segment_image
    from napari_unet.tiling import drain

    net = load_model()
    net.config.postprocess = {"foreground_threshold": 0.95, "seed_threshold": 0.8}
    again = load_model(save_model(net, tmp_path / "m.safetensors"))
    assert again.config.postprocess == {"foreground_threshold": 0.95, "seed_threshold": 0.8}
    post = recommended(again.config.postprocess, seed_threshold=0.3)
    assert (post.foreground_threshold, post.seed_threshold, post.min_size) == (
        0.95, 0.3, PostprocessConfig().min_size)
    image, _ = touching_disks((128, 128))
    predictor = Predictor(again, InferenceConfig(device="cpu"))
    by_default = drain(segment_image(image, predictor))
    explicit = drain(segment_image(image, predictor, postprocess=recommended(
        again.config.postprocess)))
    plain = drain(segment_image(image, predictor, postprocess=PostprocessConfig()))
    np.testing.assert_array_equal(by_default, explicit)
    assert 0 < np.count_nonzero(by_default) < np.count_nonzero(plain)  # tighter objects


def test_cli_segment_takes_the_model_thresholds_unless_given(tmp_path):
    import tifffile

    from _synthetic import touching_disks
    from napari_unet.cli import main

    net = load_model()
    net.config.postprocess = {"foreground_threshold": 0.95}
    model = save_model(net, tmp_path / "m.safetensors")
    image, _ = touching_disks((128, 128))
    tifffile.imwrite(tmp_path / "img.tif", image)

    def run(name, *extra):
        out = tmp_path / name
        assert main(["segment", str(tmp_path / "img.tif"), "-o", str(out), "--model",
                     str(model), "--device", "cpu", *extra]) == 0
        return tifffile.imread(out)

    calibrated, given = run("a.tif"), run("b.tif", "--foreground-threshold", "0.5")
    assert 0 < np.count_nonzero(calibrated) < np.count_nonzero(given)
    assert main(["segment", str(tmp_path / "img.tif"), "-o", str(tmp_path / "c.tif"),
                 "--device", "cpu", "--foreground-threshold", "0.5"]) == 0
    np.testing.assert_array_equal(given, tifffile.imread(tmp_path / "c.tif"))  # = bundled
