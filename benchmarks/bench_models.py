"""Model files side by side: ``segment_image`` megapixels/s of each, in one run.

What a user sees when the bundled model changes: each model segments the same planes with
its own default settings (its object size included: a model that shrinks planes of large
nuclei does less work there, and measures every plane first), interleaved so that load
from other jobs hits every model alike. Two planes: the GOWT1-based nuclei plane of the
other benchmarks (nuclei ~60 px wide) and a DSB-like plane of small nuclei (~14 px), where
nothing is shrunk and the measuring pass is pure overhead. Ratios are against the first
model.

    python benchmarks/bench_models.py OLD.safetensors NEW.safetensors [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    NoiseMonitor,
    base_parser,
    emit,
    fmt,
    interleaved,
    machine_info,
    median,
    mode_of,
    nuclei_plane,
    out_path,
    pick,
    setup_torch,
    spread,
    table,
    write_json,
)
from skimage.draw import disk

from napari_unet.model import load_model
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.tiling import drain

NAME = "bench_models"


def small_nuclei_plane(size: int, seed: int = 0) -> np.ndarray:
    """Dense small nuclei (radius 5-9 px) on a noisy background, uint16."""
    rng = np.random.default_rng(seed)
    plane = rng.normal(100, 10, (size, size)).astype(np.float32)
    for _ in range(size * size // 600):
        cy, cx = rng.integers(0, size, 2)
        rr, cc = disk((cy, cx), int(rng.integers(5, 10)), shape=plane.shape)
        plane[rr, cc] += float(rng.uniform(600, 1500))
    return np.clip(plane, 0, 65535).astype(np.uint16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("models", nargs="+", type=Path, help="model files; ratios vs the first")
    p.add_argument("--size", type=int, default=None, help="plane side (default 1024)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per plane")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mode = mode_of(args)
    setup_torch(args)
    t_start = time.perf_counter()
    size = args.size or pick(mode, smoke=256, quick=512, normal=1024)
    repeats = args.repeats or pick(mode, smoke=1, quick=3, normal=5)
    planes = {"GOWT1-like (large nuclei)": nuclei_plane(size),
              "DSB-like (small nuclei)": small_nuclei_plane(size)}
    predictors = {str(m): Predictor(load_model(m), InferenceConfig(device=args.device))
                  for m in args.models}
    rows = []
    with NoiseMonitor() as noise:
        for plane_name, plane in planes.items():
            runners = {m: (lambda p=p, x=plane: drain(segment_image(x, p)))
                       for m, p in predictors.items()}
            times = interleaved(runners, repeats)
            base = median(times[str(args.models[0])])
            for m, p in predictors.items():
                t = times[m]
                rows.append({"plane": plane_name, "model": Path(m).name,
                             "scale": fmt(p.measure_scale(plane), 2),
                             "median_s": fmt(median(t)), "spread": fmt(spread(t), 2),
                             "mp_s": fmt(plane.size / 1e6 / median(t), 2),
                             "vs_first": fmt(base / median(t), 2)})
    text = table(rows, ["plane", "model", "scale", "median_s", "spread", "mp_s", "vs_first"],
                 f"segment_image on {size}^2 planes, each model with its defaults "
                 f"(median of {repeats})")
    emit(text)
    payload = {"benchmark": NAME, "mode": mode, "machine": machine_info(args.device),
               "noise": noise.summary(),
               "config": {"models": [str(m) for m in args.models], "size": size,
                          "repeats": repeats},
               "rows": rows, "tables": {"models": text},
               "wall_s": fmt(time.perf_counter() - t_start, 1)}
    write_json(out_path(args, NAME), payload)
    return payload


if __name__ == "__main__":
    main()
