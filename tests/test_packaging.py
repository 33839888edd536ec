"""Packaging: the manifest is found from the installed package (editable installs and
worktrees too), the wheel ships it, the reader only claims napari-unet models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from napari_unet._reader import get_reader, is_napari_unet_file
from napari_unet.model import UNet, bundled_model_path, save_model

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11"
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert meta["license"] == "BSD-3-Clause" and meta["urls"] and meta["authors"]
    # No Qt binding in any runtime extra: users bring napari's (Qt6) binding.
    extras = meta["optional-dependencies"]
    runtime = [r for k, reqs in extras.items() if k != "dev" for r in reqs]
    assert not any(r.lower().startswith(("pyqt", "pyside")) for r in runtime)


def test_manifest_found_from_the_package():
    """npe2 resolves the entry point 'napari_unet:napari.yaml' inside the imported package
    (the symlink src/napari_unet/napari.yaml), as napari does in an editable install."""
    npe2 = pytest.importorskip("npe2")
    path = resources.files("napari_unet") / "napari.yaml"
    assert path.is_file()
    manifest = npe2.PluginManifest.from_file(str(path))
    assert manifest.name == "napari-unet"
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Segment", "Train"}
    # What napari does at start-up: discover installed plugins through their entry points.
    pm = npe2.PluginManager()
    pm.discover()
    found = pm.get_manifest("napari-unet")
    assert {c.id for c in found.contributions.commands} >= {"napari-unet.segment_widget"}


@pytest.mark.slow
def test_wheel_ships_manifest(tmp_path):
    pytest.importorskip("hatchling")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True)
    wheel = next((tmp_path / "dist").glob("napari_unet-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = z.read("napari_unet/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_unet:napari.yaml" in z.read(entry_points).decode()
        assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "name: napari-unet" in manifest  # the file itself, not a dangling link
    assert "napari_unet/models/nuclei_cells_v2.safetensors" in names


def test_reader_claims_only_napari_unet_models(tmp_path):
    other = tmp_path / "other_tool.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    assert not is_napari_unet_file(other)
    assert get_reader(str(other)) is None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert get_reader(str(garbage)) is None
    assert get_reader(str(bundled_model_path())) is not None
    mine = save_model(UNet(), tmp_path / "mine.safetensors")
    assert get_reader([str(mine), str(bundled_model_path())]) is not None
    assert get_reader([str(mine), str(other)]) is None
    plain_zip = tmp_path / "photos.zip"
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("a.txt", "hello")
    assert get_reader(str(plain_zip)) is None
    assert get_reader(str(tmp_path)) is None  # a folder without rdf.yaml
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "rdf.yaml").write_text("type: model\n")
    assert get_reader(str(tmp_path / "pkg")) is not None
