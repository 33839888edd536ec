"""Smoke runs of the benchmark scripts: tiny sizes, steps and budgets; no timing assertions.

Each script runs in a subprocess exactly as from the command line (``--smoke``) and must
write JSON with the keys the README and run_all rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COMMON_KEYS = {"benchmark", "mode", "machine", "noise", "config", "tables", "wall_s"}

pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--device", "cpu",
           "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) >= COMMON_KEYS, set(data)
    assert data["mode"] == "smoke"
    assert data["benchmark"] == script
    return data


def test_bench_inference_smoke(tmp_path: Path) -> None:
    data = _run("bench_inference", tmp_path)
    assert {"conv_peak", "peak_gflop_s", "image_2d", "stack", "profile", "summary"} <= set(data)
    pipelines = {r["pipeline"] for r in data["image_2d"]}
    assert {"napari-unet predict", "napari-unet segment_image"} <= pipelines
    assert any(p.startswith("MONAI fp32") for p in pipelines)
    assert any(p.startswith("MONAI channels_last") for p in pipelines)
    for row in data["image_2d"] + data["stack"]:
        assert {"mp_s", "vs_monai_fp32", "vs_monai_matched", "peak_fraction"} <= set(row)
    summary = data["summary"]
    assert {"speedup_vs_monai_fp32_2d", "peak_fraction_2d", "e2e_mp_s_2d", "targets"} <= set(
        summary
    )
    assert data["config"]["model_flops_per_pixel"] > 0
    assert data["profile"]["categories"]


def test_bench_models_smoke(tmp_path: Path) -> None:
    from napari_unet.model import bundled_model_path, load_model, save_model

    old = load_model()
    old.config.object_diameter = None  # as before the object size existed
    save_model(old, tmp_path / "old.safetensors")
    data = _run("bench_models", tmp_path, str(tmp_path / "old.safetensors"),
                str(bundled_model_path()))
    assert len(data["rows"]) == 4 and {r["vs_first"] for r in data["rows"][::2]} == {1.0}
    assert all(r["mp_s"] > 0 for r in data["rows"])


def test_bench_memory_smoke(tmp_path: Path) -> None:
    data = _run("bench_memory", tmp_path)
    assert [r["planes"] for r in data["runs"]] == [1, 2, 4]
    for row in data["runs"]:
        assert row["peak_rss_mb"] >= row["baseline_mb"] > 0
        assert row["objects_last_plane"] >= 0
    assert {"flatness", "target_flatness", "met", "excess_mb", "plane_set_mb"} <= set(
        data["summary"]
    )


def test_bench_training_smoke(tmp_path: Path) -> None:
    # A minimal few-label result to read the plateau from.
    curves = {"mode": "smoke", "curves": [{
        "dataset": "d", "method": "fine-tune", "k": 5, "start_ap": 0.5,
        "points": [{"train_s": 1.0, "ap": 0.7}, {"train_s": 2.0, "ap": 0.9},
                   {"train_s": 3.0, "ap": 0.9}],
    }]}
    fl = tmp_path / "fewlabels.json"
    fl.write_text(json.dumps(curves))
    data = _run("bench_training", tmp_path, "--fewlabels-json", str(fl))
    assert {"rows", "summary", "plateau", "plateau_summary"} <= set(data)
    assert {"steps_per_s", "steps_per_s_no_elastic", "augment_batch_ms", "augment_share",
            "elastic_share", "met"} <= set(data["summary"])
    assert data["plateau"][0]["plateau_s"] == 2.0
    assert data["plateau"][0]["reached"] is True


def test_bench_fewlabels_smoke(tmp_path: Path, shared_data: Path) -> None:
    data = _run("bench_fewlabels", tmp_path)
    assert {"splits", "pretrained", "curves", "rf", "summary_ap", "summary_pixel_iou"} <= set(data)
    methods = {c["method"] for c in data["curves"]} | {r["method"] for r in data["rf"]}
    assert methods == {"fine-tune", "scratch", "all-labels", "rf-cc", "rf-ws"}
    for c in data["curves"]:
        assert c["points"] and {"budget_s", "train_s", "steps", "ap", "pixel_iou"} <= set(
            c["points"][0]
        )
    row = data["summary_ap"][0]
    assert {"dataset", "k", "pretrained", "rf-cc", "rf-ws"} <= set(row)


def test_run_all_smoke(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--smoke", "--device", "cpu",
         "--results-dir", str(tmp_path), "--only", "bench_training"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "bench_training.json").is_file()
    assert "training steps" in (tmp_path / "latest.md").read_text()
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert summary["scripts"][0]["rc"] == 0
