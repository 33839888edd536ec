"""bioimage.io export -> offline validation (bioimageio.spec) -> package test
(bioimageio.core, CPU) -> import -> identical labels on the bundled sample."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import yaml

pytest.importorskip("bioimageio.core")

from napari_unet import bioimageio as bio  # noqa: E402
from napari_unet.model import ModelFileError, load_model  # noqa: E402
from napari_unet.sample import load_sample  # noqa: E402
from napari_unet.segment import segment  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def offline(one_torch_thread):
    """No network: bioimageio checks that would download are off for the whole module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return bio.export_model(None, tmp_path_factory.mktemp("bio") / "nuclei.zip")


def test_package_contents(package):
    names = set(zipfile.ZipFile(package).namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", bio.ARCH_FILE, "cover.png",
            "README.md", "test_input.npy", "test_output.npy"} <= names
    rdf = yaml.safe_load(zipfile.ZipFile(package).read("rdf.yaml"))
    dois = {c.get("doi") for c in rdf["cite"]}
    assert "10.1007/978-3-319-24574-4_28" in dois  # U-Net paper
    assert "10.1038/s41592-019-0612-7" in dois  # DSB 2018, the bundled model's data
    assert rdf["weights"]["pytorch_state_dict"]["sha256"]
    assert rdf["inputs"][0]["preprocessing"][1]["id"] == "scale_range"
    assert rdf["outputs"][0]["postprocessing"][0]["id"] == "softmax"
    assert rdf["config"]["napari-unet"]["model_config"]["provenance"]["trained_on"]
    assert bio.is_package(package)


def test_validates_offline(package):
    summary = bio.validate_package(package)
    assert summary.status == "valid-format", summary.format()


def test_bioimageio_core_runs_package_test(package):
    summary = bio.test_package(package)
    assert summary.status == "passed", summary.format()


def test_round_trip_identical_labels(package):
    image = load_sample()[0]
    original = segment(image, load_model(), device="cpu", precision="fp32")
    imported = load_model(package)  # load_model accepts a package: --model, widgets, reader
    again = segment(image, imported, device="cpu", precision="fp32")
    assert original.max() > 10
    np.testing.assert_array_equal(original, again)


def test_folder_package_and_refusals(package, tmp_path):
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(package).extractall(folder)
    assert bio.is_package(folder)
    assert bio.napari_unet_config(folder) is not None
    with pytest.raises(FileExistsError):
        bio.export_model(None, package)
    assert not bio.is_package(tmp_path)  # a folder without rdf.yaml


def test_foreign_package_runs_through_bioimageio_core(package, tmp_path):
    """A package that napari-unet did not write (no config.napari-unet) is run by
    bioimageio.core and its class output becomes instance labels."""
    folder = tmp_path / "foreign"
    zipfile.ZipFile(package).extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    del rdf["config"]["napari-unet"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelFileError, match="not made by napari-unet"):
        load_model(folder)
    foreign = bio.ForeignModel(folder)
    assert foreign.support.output_kind == "classes"
    labels = foreign.segment_plane(load_sample()[0])
    assert labels.shape == (256, 256) and labels.max() > 5


def test_cli_export_and_foreign_segment(package, tmp_path):
    from napari_unet import io
    from napari_unet.cli import main
    from napari_unet.model import bundled_model_path

    out = tmp_path / "cli.zip"
    assert main(["export", "-o", str(out), "--no-torchscript", "--no-test",
                 "--name", "my nuclei model", "--author", "A. Person"]) == 0
    rdf = yaml.safe_load(zipfile.ZipFile(out).read("rdf.yaml"))
    assert rdf["name"] == "my nuclei model" and rdf["authors"][0]["name"] == "A. Person"
    assert not rdf["weights"].get("torchscript")
    assert main(["export", "-o", str(out), "--no-test"]) == 2  # exists: not replaced

    folder = tmp_path / "foreign"
    zipfile.ZipFile(package).extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    del rdf["config"]["napari-unet"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    sample = bundled_model_path().parents[1] / "data" / "nuclei_crop.tif"
    labels = tmp_path / "foreign_labels.tif"
    assert main(["segment", str(sample), "-o", str(labels), "--model", str(folder)]) == 0
    assert np.asarray(io.read_image(labels)).max() > 5


def test_export_is_generic_over_extra_output_channels(tmp_path, monkeypatch):
    """A model with an extra output channel (e.g. a distance map) exports as two outputs:
    the class probabilities and the extra channel(s); bioimageio.core reproduces both."""
    import torch

    from napari_unet.model import ModelConfig, UNet

    torch.manual_seed(0)
    if "distance" in ModelConfig.__dataclass_fields__:  # the model has the option itself
        model = UNet(ModelConfig(depth=3, base_channels=8, distance=True))
    else:  # simulate it: one more head channel in the exported architecture and the model
        source = bio.architecture_source()
        head = "self.head = nn.Conv2d(widths[0], c.n_classes, 1)"
        assert head in source
        wider = source.replace(head, head.replace("c.n_classes", "c.n_classes + 1"))
        monkeypatch.setattr(bio, "architecture_source", lambda: wider)
        model = UNet(ModelConfig(depth=3, base_channels=8))
        model.head = torch.nn.Conv2d(8, 4, 1)
    package = bio.export_model(model, tmp_path / "extra.zip", torchscript=False)
    rdf = yaml.safe_load(zipfile.ZipFile(package).read("rdf.yaml"))
    assert [o["id"] for o in rdf["outputs"]] == ["probabilities", "extra"]
    assert bio.validate_package(package).status == "valid-format"
    summary = bio.test_package(package)
    assert summary.status == "passed", summary.format()


def test_fine_tuned_model_keeps_its_base_models_data_and_licences():
    from napari_unet.model import ModelConfig

    tuned = ModelConfig(provenance={"base_model": "bundled", "images": ["mine.tif"]})
    trained_on, note = bio._training_data(tuned)
    assert "dsb2018_train" in trained_on and "fine-tuned" in note
    scratch = ModelConfig(provenance={"base_model": "scratch"})
    assert bio._training_data(scratch) == ({}, "trained on the user's own annotations")


def test_calibrated_thresholds_travel_in_the_package(tmp_path):
    model = load_model()
    model.config.postprocess = {"foreground_threshold": 0.7, "seed_threshold": 0.3}
    package = bio.export_model(model, tmp_path / "calibrated.zip", torchscript=False)
    assert bio.validate_package(package).status == "valid-format"
    assert load_model(package).config.postprocess == model.config.postprocess
    assert bio.napari_unet_config(package).postprocess == model.config.postprocess
