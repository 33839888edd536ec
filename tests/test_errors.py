"""The bad-input / fault matrix of issue 10: every user error is one line on stderr and exit
code 2 (never a traceback), checked before any work; training keeps the last good model."""

from __future__ import annotations

import errno
import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import napari_unet.model as model_mod
from napari_unet import batch, cli, outputs
from napari_unet import train as train_mod
from napari_unet.annotation_file import (
    AnnotationInfo,
    complete_mask,
    read_sidecar,
    write_sidecar,
)
from napari_unet.model import (
    ModelConfig,
    ModelFileError,
    UNet,
    bundled_model_path,
    inspect_model_file,
    load_model,
)
from napari_unet.params import ConfigError
from napari_unet.segment import segment
from napari_unet.train import TrainConfig, Trainer, TrainingPair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 200).astype(np.uint8)
    tifffile.imwrite(d / "gray.tif", img)
    tifffile.imwrite(d / "rgb.tif", np.stack([img] * 3, -1), photometric="rgb")
    iio.imwrite(d / "rgba.png", np.stack([img] * 4, -1))
    tifffile.imwrite(d / "bool.tif", img > 100)
    tifffile.imwrite(d / "complex.tif", img.astype(np.complex64))
    ann = np.zeros((64, 64), np.uint16)
    ann[10:20, 10:20] = 2
    ann[30:50, 30:50] = 1
    tifffile.imwrite(d / "gray_annotation.tif", ann)
    return d


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of one command (argparse errors exit through SystemExit)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def assert_user_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no message"
    for w in words:
        assert w in lines[-1], lines[-1]


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("name, words", [
    ("rgb.tif", ["RGB colour samples", "the file is a colour image", "--rgb none"]),
    ("rgba.png", ["RGBA colour samples", "--rgb none"]),
    ("bool.tif", ["boolean"]),
    ("complex.tif", ["complex"]),
])
def test_segment_refuses_colour_bool_and_complex_images(files, tmp_path, capsys, name, words):
    rc, err = run_cli(capsys, "segment", files / name, "-o", tmp_path / "out.tif")
    assert_user_error(rc, err, *words)
    assert not list(tmp_path.iterdir())


def test_segment_reads_colour_as_planes_only_when_asked(files, tmp_path, capsys):
    rc, err = run_cli(capsys, "segment", files / "rgb.tif", "-o", tmp_path / "out.tif",
                      "--rgb", "none")
    assert rc == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (64, 64, 3)


def test_segment_converts_colour_to_luma_when_asked(files, tmp_path, capsys):
    rng = np.random.default_rng(3)
    grey = tifffile.imread(files / "rgb.tif")[..., 0].astype(np.float32)
    # Unequal channels, so luma, a plain mean and any one channel all differ.
    colour = np.stack([grey * 0.5, grey, 255 - grey * 0.8], -1) + rng.uniform(0, 5, (64, 64, 3))
    colour = colour.clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", colour, photometric="rgb")
    rc, err = run_cli(capsys, "segment", tmp_path / "c.tif", "-o", tmp_path / "out.tif",
                      "--rgb", "gray", "--tile", "64", "--overlap", "32")
    assert rc == 0, err
    out = tifffile.imread(tmp_path / "out.tif")
    luma = colour[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    expected = segment(luma, load_model(), tile=64, overlap=32)
    assert out.shape == (64, 64) and out.max() > 0
    np.testing.assert_array_equal(out, expected)
    # The same output with the colour axis read as X is another run, never "up to date".
    rc, err = run_cli(capsys, "segment", tmp_path / "c.tif", "-o", tmp_path / "out.tif",
                      "--rgb", "none", "--tile", "64", "--overlap", "32")
    assert_user_error(rc, err, "--overwrite")


def test_python_api_converts_or_refuses_colour(files):
    rgb = tifffile.imread(files / "rgb.tif")
    model = load_model()
    with pytest.raises(ValueError, match="rgb='gray'"):
        segment(rgb, model)
    labels = segment(rgb, model, rgb="gray", tile=64, overlap=32)
    assert labels.shape == (64, 64)
    grey = segment(rgb[..., 0], model, tile=64, overlap=32)
    np.testing.assert_array_equal(labels, grey)  # R = G = B: the same image
    with pytest.raises(ValueError, match="boolean"):
        segment(rgb[..., 0] > 100, model)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("argv, words", [
    (["--batch", "0"], ["batch_size = 0", "[1, 1024]"]),
    (["--min-size", "-1"], ["min_size = -1", ">= 0"]),
    (["--tile", "100"], ["tile = 100", "multiple of 8"]),
    (["--retries", "-1"], ["--retries", ">= 0"]),
    (["--workers", "-2"], ["--workers", ">= 0"]),
    (["--stitch-3d", "--stitch-threshold", "1.5"], ["--stitch-threshold", "(0, 1]"]),
])
def test_segment_settings_out_of_range(files, tmp_path, capsys, argv, words):
    rc, err = run_cli(capsys, "segment", files / "gray.tif", "-o", tmp_path / "o.tif", *argv)
    assert_user_error(rc, err, *words)
    assert not list(tmp_path.iterdir())


def test_evaluate_iou_out_of_range(files, capsys):
    ann = files / "gray_annotation.tif"
    rc, err = run_cli(capsys, "evaluate", "--pred", ann, "--gt", ann, "--iou", "1.5")
    assert_user_error(rc, err, "--iou", "(0, 1]")


def test_tile_checked_against_the_model_divisor():
    model = UNet(ModelConfig(depth=5, base_channels=2))
    pair = TrainingPair(np.zeros((64, 64), np.float32), np.ones((64, 64), np.int32))
    with pytest.raises(ConfigError, match="TrainConfig.tile = 200.*multiple of 16"):
        Trainer(model, [pair], TrainConfig(tile=200))
    with pytest.raises(ConfigError, match="InferenceConfig.tile = 200.*multiple of 16"):
        segment(np.zeros((64, 64), np.float32), model, tile=200, overlap=48)


# ---------------------------------------------------------------- outputs


def test_segment_output_missing_folder_bad_suffix_read_only(files, tmp_path, capsys,
                                                            monkeypatch):
    src = files / "gray.tif"
    rc, err = run_cli(capsys, "segment", src, "-o", tmp_path / "nope" / "o.tif")
    assert_user_error(rc, err, "does not exist", str(tmp_path / "nope"))
    rc, err = run_cli(capsys, "segment", src, "-o", tmp_path / "o.png")
    assert_user_error(rc, err, ".zarr, .tif", "'.png'")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", read_only)
    rc, err = run_cli(capsys, "segment", src, "-o", tmp_path / "o.tif")
    assert_user_error(rc, err, "cannot write", "Read-only file system", str(tmp_path))


def test_disk_full_while_segmenting_is_a_message(files, tmp_path, capsys, monkeypatch):
    def full(store, index, n):
        raise OSError(errno.ENOSPC, "No space left on device", str(store))

    monkeypatch.setattr(batch, "mark_done", full)
    rc, err = run_cli(capsys, "segment", files / "gray.tif", "-o", tmp_path / "o.zarr",
                      "--tile", "64", "--overlap", "32")
    assert_user_error(rc, err, "the disk is full", "Free some space", "resumes")


def test_unexpected_bugs_keep_their_traceback(files, tmp_path, monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_segment", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["segment", str(files / "gray.tif"), "-o", str(tmp_path / "o.tif")])


# ---------------------------------------------------------------- training


def _train_argv(files, out, *extra):
    return ["train", "--images", files / "gray.tif", "--labels", files / "gray_annotation.tif",
            "-o", out, "--steps", "4", "--batch", "1", "--tile", "32", "--snapshot-every", "1",
            *extra]


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started although the output is unusable")

    monkeypatch.setattr(cli, "Trainer", fail)


@pytest.mark.parametrize("out, words", [
    ("x.pt", [".safetensors", "'.pt'"]),
    ("nope/x.safetensors", ["does not exist"]),
])
def test_train_output_checked_before_training(files, tmp_path, capsys, no_training, out,
                                              words):
    rc, err = run_cli(capsys, *_train_argv(files, tmp_path / out))
    assert_user_error(rc, err, *words)


def test_train_existing_output_needs_overwrite(files, tmp_path, capsys, no_training):
    (tmp_path / "m.safetensors").write_bytes(b"mine")
    rc, err = run_cli(capsys, *_train_argv(files, tmp_path / "m.safetensors"))
    assert_user_error(rc, err, "exists", "--overwrite")
    assert (tmp_path / "m.safetensors").read_bytes() == b"mine"


def test_train_bad_settings_and_colour_images(files, tmp_path, capsys):
    rc, err = run_cli(capsys, *_train_argv(files, tmp_path / "m.safetensors"), "--lr", "0")
    assert_user_error(rc, err, "lr = 0.0", "(0, 1]")
    argv = _train_argv(files, tmp_path / "m.safetensors")
    argv[2] = files / "rgb.tif"
    rc, err = run_cli(capsys, *argv)
    assert_user_error(rc, err, "--rgb gray", "--rgb none")
    argv[2] = files / "bool.tif"
    rc, err = run_cli(capsys, *argv)
    assert_user_error(rc, err, "boolean")


def test_train_rgb_gray_trains(files, tmp_path, capsys):
    argv = _train_argv(files, tmp_path / "m.safetensors", "--rgb", "gray")
    argv[2] = files / "rgb.tif"
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert load_model(tmp_path / "m.safetensors").config.provenance["steps"] == 4


def _fail_at_step(monkeypatch, step: int, make):
    real = train_mod.Trainer.train_step

    def step_fn(self):
        if self.step + 1 == step:
            return make()
        return real(self)

    monkeypatch.setattr(train_mod.Trainer, "train_step", step_fn)


def test_train_divergence_writes_last_good_model(files, tmp_path, capsys, monkeypatch):
    _fail_at_step(monkeypatch, 3, lambda: float("nan"))
    out = tmp_path / "m.safetensors"
    rc, err = run_cli(capsys, *_train_argv(files, out))
    assert_user_error(rc, err, "diverged at step 3", f"(step 2) was written to {out}")
    load_model(out)  # finite, loadable


def test_train_ctrl_c_writes_last_good_model(files, tmp_path, capsys, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    _fail_at_step(monkeypatch, 3, interrupt)
    out = tmp_path / "m.safetensors"
    rc, err = run_cli(capsys, *_train_argv(files, out))
    assert rc == 130 and f"(step 2) is saved in {out}" in err
    load_model(out)


def test_train_crash_writes_last_good_model_and_says_where(files, tmp_path, monkeypatch):
    def crash():
        raise RuntimeError("CUDA error: an illegal memory access")

    _fail_at_step(monkeypatch, 3, crash)
    out = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError) as info:
        cli.main([str(a) for a in _train_argv(files, out)])
    assert f"(step 2) was written to {out}" in " ".join(info.value.__notes__)
    load_model(out)


def test_train_cancel_through_the_api_writes_the_checkpoint(files, tmp_path):
    out = tmp_path / "m.safetensors"
    image = tifffile.imread(files / "gray.tif")
    ann = tifffile.imread(files / "gray_annotation.tif")
    trainer = Trainer(load_model(), [TrainingPair(image, ann)],
                      TrainConfig(steps=50, batch_size=1, tile=32, checkpoint_path=str(out)))
    gen = trainer.run(cancel=lambda: trainer.step >= 2)
    for _ in gen:
        pass
    assert load_model(out) is not None and trainer.good_step == 2


def test_train_disk_full_is_a_message(files, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(model_mod, "save_file", full)
    rc, err = run_cli(capsys, *_train_argv(files, tmp_path / "m.safetensors"))
    assert_user_error(rc, err, "No space left on device", "free some space")


# ---------------------------------------------------------------- fully annotated regions


def _pairs_train_reads(files, ann, tmp_path, capsys, monkeypatch) -> list:
    """The training pairs `napari-unet train` builds from the gray image and ``ann``
    (stopped before the first step: the run ends as a Ctrl-C, exit 130)."""
    seen = {}

    def capture(model, pairs, config):
        seen["pairs"] = pairs
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "Trainer", capture)
    argv = _train_argv(files, tmp_path / "m.safetensors")
    argv[4] = ann
    assert run_cli(capsys, *argv)[0] == 130
    return seen["pairs"]


def test_train_uses_the_sidecar_of_the_annotate_widget(files, tmp_path, capsys, monkeypatch):
    ann = tmp_path / "gray_annotation.tif"
    ann.write_bytes((files / "gray_annotation.tif").read_bytes())
    rect = np.array([[0, 0], [0, 9], [4, 9], [4, 0]], float)  # 5 x 10 pixels
    write_sidecar(ann, image=None, image_layer="gray", channel_axis=None,
                  complete_planes=[], complete_rectangles=[rect])
    (pair,) = _pairs_train_reads(files, ann, tmp_path, capsys, monkeypatch)
    assert pair.complete is not None and pair.complete.sum() == 50
    assert pair.complete[:5, :10].all()
    assert pair.edited is None


def test_train_weighs_the_cells_corrected_in_the_annotate_widget(files, tmp_path, capsys,
                                                                 monkeypatch):
    import tifffile

    from napari_unet.annotation_file import edited_mask

    ann = tmp_path / "gray_annotation.tif"
    ann.write_bytes((files / "gray_annotation.tif").read_bytes())
    shape = tifffile.imread(ann).shape
    edited = np.zeros(shape, np.uint8)
    edited[:6, :8] = 1
    tifffile.imwrite(tmp_path / "gray_edited.tif", edited)
    write_sidecar(ann, image=None, image_layer="gray", channel_axis=None, complete_planes=[],
                  complete_rectangles=[], edited="gray_edited.tif")
    (pair,) = _pairs_train_reads(files, ann, tmp_path, capsys, monkeypatch)
    assert pair.edited is not None and pair.edited.sum() == 48 and pair.edited[:6, :8].all()
    with pytest.raises(ValueError, match="has shape"):
        edited_mask((3, *shape), read_sidecar(ann))
    (tmp_path / "gray_edited.tif").unlink()
    with pytest.raises(ValueError, match="cannot read the corrected-cells mask"):
        edited_mask(shape, read_sidecar(ann))


def test_sidecar_planes_and_rectangles_on_a_stack(tmp_path):
    ann = tmp_path / "s_annotation.tif"
    path = write_sidecar(ann, image="s.tif", image_layer="s", channel_axis=None,
                         complete_planes=[(2,)],
                         complete_rectangles=[np.array([[0, 1, 1], [0, 1, 3], [0, 2, 3],
                                                        [0, 2, 1]], float)])
    info = read_sidecar(ann)
    assert info.path == path and info.complete_planes == [(2,)]
    mask = complete_mask((3, 8, 8), info)
    assert mask[2].all() and mask[1].sum() == 0 and mask[0].sum() == 6
    with pytest.raises(ValueError, match="does not exist"):
        complete_mask((2, 8, 8), info)
    assert complete_mask((3, 8, 8), AnnotationInfo(path)) is None
    path.write_text("{broken")
    with pytest.raises(ValueError, match="cannot read the annotation sidecar"):
        read_sidecar(ann)
    path.write_text(json.dumps({"complete_planes": [["a"]]}))
    with pytest.raises(ValueError, match="list of integers"):
        read_sidecar(ann)


# ---------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def bundled():
    with safe_open(str(bundled_model_path()), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return meta, state


def _model_file(path, bundled, config=None, state=None, raw=None):
    meta, base_state = bundled
    cfg = json.loads(meta["config"]) | (config or {})
    save_file(state or base_state, str(path),
              metadata={"format": meta["format"], "config": raw or json.dumps(cfg)})
    return path


@pytest.mark.parametrize("config, words", [
    ({"depth": 50}, "depth = 50 must be an integer in [1, 8]"),
    ({"depth": 0}, "depth = 0"),
    ({"depth": "4"}, "depth = '4'"),
    ({"depth": True}, "depth = True"),
    ({"base_channels": None}, "base_channels = None"),
    ({"in_channels": 64}, "in_channels = 64"),
    ({"norm_percentiles": [99, 1]}, "norm_percentiles"),
    ({"classes": None}, "classes = None"),
    ({"distance": "yes"}, "distance = 'yes'"),
    ({"postprocess": [0.5]}, "postprocess must be a JSON object"),
    ({"object_diameter": 0}, "object_diameter = 0 must be null or a number"),
    ({"fit_diameter": "60"}, "fit_diameter = '60' must be null or a number"),
    ({"postprocess": {"min_size": 3}}, "postprocess.min_size is not a setting a model may"),
    ({"postprocess": {"seed_threshold": "0.4"}}, "postprocess.seed_threshold = '0.4' must be"),
    ({"postprocess": {"foreground_threshold": 2}}, "foreground_threshold = 2 is not allowed"),
    ({"depth": 8, "base_channels": 512}, "M parameters"),
    ({"depth": 3}, "do not match the architecture"),
])
def test_model_metadata_checked_before_any_network_is_built(tmp_path, bundled, monkeypatch,
                                                            config, words):
    path = _model_file(tmp_path / "m.safetensors", bundled, config)

    def no_real_network(*args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a network was built from an unchecked file")
        return UNet.__wrapped_init__(*args, **kwargs)

    UNet.__wrapped_init__ = UNet.__init__
    monkeypatch.setattr(UNet, "__init__", no_real_network)
    try:
        with pytest.raises(ModelFileError, match=words.replace("[", r"\[").replace("(", r"\(")):
            load_model(path)
    finally:
        del UNet.__wrapped_init__


def test_model_files_nan_weights_bad_json_and_the_cli(tmp_path, bundled, files, capsys):
    meta, state = bundled
    nan = dict(state)
    key = next(k for k in state if k.endswith("weight"))
    nan[key] = state[key].clone()
    nan[key].view(-1)[0] = float("nan")
    with pytest.raises(ModelFileError, match=f"{key} holds NaN"):
        load_model(_model_file(tmp_path / "nan.safetensors", bundled, state=nan))
    with pytest.raises(ModelFileError, match="not JSON"):
        load_model(_model_file(tmp_path / "j.safetensors", bundled, raw="{oops"))
    # Old files (no "distance" key) and new ones (distance false) load alike.
    assert inspect_model_file(_model_file(tmp_path / "d.safetensors", bundled,
                                          {"distance": False})).depth == 4
    big = _model_file(tmp_path / "big.safetensors", bundled, {"depth": 50})
    rc, err = run_cli(capsys, "segment", files / "gray.tif", "-o", tmp_path / "o.tif",
                      "--model", big)
    assert_user_error(rc, err, "depth = 50", str(big))
