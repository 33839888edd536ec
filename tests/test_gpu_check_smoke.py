"""The GPU check (benchmarks/gpu_check.sh) runs end to end on a CPU with tiny sizes, in an
environment where napari, zarr and dask cannot be imported (as on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

BLOCKER = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"napari", "zarr", "dask", "distributed", "magicgui", "qtpy"}:
            raise ImportError(f"{name} is blocked: not installed on the GPU machine")
sys.meta_path.insert(0, _Block())
'''


def test_gpu_check_smoke_without_napari_zarr_dask(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONPATH=str(tmp_path),
               OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke",
                          "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert data["benchmark"] == "bench_gpu" and data["machine"]["device"] == "cpu"
    assert not data["skipped"]
    names = {r["pipeline"] for r in data["image_2d_default"]}
    assert {"ours", "ours fp32", "MONAI fp32 NCHW"} <= names
    stack = {r["pipeline"].split(" (")[0] for r in data["stack"]}
    assert {"ours predict", "ours segment_image", "MONAI fp32 NCHW"} <= stack
    assert "ours segment_image (post-processing on device)" in {r["pipeline"]
                                                                 for r in data["stack"]}
    s = data["summary"]
    assert s["speedup_vs_monai_fp32_2d_default"] and s["segment_image_vs_predict_stack"]
    assert s["segment_image_threads_vs_predict_stack"]
    assert set(s["targets"]) == {"vs_monai_fp32_at_defaults", "segment_image_vs_predict"}


def test_monai_rows_skip_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu
    import torch

    monkeypatch.setitem(sys.modules, "monai.inferers", None)
    runners, why = bench_gpu.monai_runners(torch.device("cpu"), 128, 32, 2, None)
    assert runners == {} and "MONAI not importable" in why
