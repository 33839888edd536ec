"""GPU check of issue 14: tiled inference and stack segmentation against MONAI, in < 150 s.

Run by ``benchmarks/gpu_check.sh`` on a CUDA machine (no napari, zarr or dask needed; MONAI
only if importable). On the same image, tile, overlap and batch:

- ``ours``: ``Predictor.predict`` (device-resident tiling, channels_last, autocast) from the
  uint16 plane to the (3, H, W) probabilities on the host; also ``ours fp32``.
- ``MONAI fp32 NCHW``: ``sliding_window_inference`` (``mode="gaussian"``) on the plain
  network, as a typical user writes it; ``MONAI matched``: the same network in our layout and
  autocast dtype (channels_last + bf16/fp16), so the ratio isolates tiling and blending.

Sections: (1) a 2048² image at our GPU defaults (auto tile/batch); (2) a 20×2048² stack:
predict per plane, ``segment_image`` with post-processing on the device (the GPU default,
``PostprocessConfig.post_device``), on the host's CPU (scikit-image, pipelined: in threads,
then in a process pool), the serial path on a few planes, MONAI per plane; (3) a small sweep
of tile/batch for our best setting, then MONAI at it. Every row gets one full untimed pass
first (CUDA context, cuDNN autotuning of each tile/batch shape, thread and process start-up).
A time guard skips what would not fit. ``--smoke`` runs everything tiny on a CPU.

    python benchmarks/bench_gpu.py [--smoke] [--device cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from _common import (
    base_parser,
    emit,
    fmt,
    interleaved,
    machine_info,
    median,
    mode_of,
    out_path,
    pick,
    setup_torch,
    spread,
    sync,
    table,
    write_json,
)

from napari_unet.model import load_model
from napari_unet.postprocess import DISTANCE, PostprocessConfig
from napari_unet.postprocess_torch import instances_from_maps
from napari_unet.sample import load_sample
from napari_unet.segment import (
    InferenceConfig,
    Predictor,
    instance_channels,
    post_workers,
    segment_image,
)
from napari_unet.targets import BG, INTERIOR
from napari_unet.tiling import drain

NAME = "bench_gpu"
TARGET_VS_MONAI = 1.5
TARGET_E2E_RATIO = 0.7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None, help="2D image side (2048)")
    p.add_argument("--planes", type=int, default=None, help="stack planes (20)")
    p.add_argument("--overlap", type=int, default=48)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (5)")
    p.add_argument("--serial-planes", type=int, default=None,
                   help="planes of the serial (unpipelined) segment_image row (4)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which remaining sections are skipped (110)")
    return p.parse_args(argv)


def sample_plane(size: int, seed: int) -> np.ndarray:
    """A uint16 nuclei plane of side ``size``: the bundled sample (real DSB nuclei, so the
    watershed sees a real object density) mirror-tiled, shifted by ``seed``, with noise."""
    base = load_sample()[0].astype(np.float32)
    reps = -(-size // base.shape[0]) + 1
    tiled = np.block([[base[:: 1 - 2 * (i % 2), :: 1 - 2 * (j % 2)] for j in range(reps)]
                      for i in range(reps)])
    rng = np.random.default_rng(seed)
    y0, x0 = (int(v) for v in rng.integers(0, base.shape[0], 2))
    plane = tiled[y0 : y0 + size, x0 : x0 + size] + rng.normal(0, 2, (size, size))
    return np.clip(plane, 0, 65535).astype(np.uint16)


class Monai:
    """``sliding_window_inference`` from the uint16 plane to host probabilities."""

    def __init__(self, device: torch.device, tile: int, overlap: int, batch: int,
                 amp: torch.dtype | None, channels_last: bool) -> None:
        from monai.inferers import sliding_window_inference

        from napari_unet.device import autocast
        from napari_unet.normalize import normalize

        self.swi, self.autocast, self.normalize = sliding_window_inference, autocast, normalize
        net = load_model(device=device).eval()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.device, self.amp, self.cl = device, amp, channels_last
        self.tile, self.frac, self.batch = tile, overlap / tile, batch
        self.pct = net.config.norm_percentiles

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    @torch.inference_mode()
    def __call__(self, plane: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self.normalize(plane[None], self.pct))[None].to(self.device)
        with self.autocast(self.device, self.amp):
            logits = self.swi(x, (self.tile, self.tile), self.batch, self._run,
                              overlap=self.frac, mode="gaussian")
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def monai_runners(device: torch.device, tile: int, overlap: int, batch: int,
                  amp: torch.dtype | None) -> tuple[dict[str, Callable], str | None]:
    """MONAI rows (fp32 NCHW, matched), or none and the reason."""
    try:
        return {
            "MONAI fp32 NCHW": Monai(device, tile, overlap, batch, None, False),
            "MONAI matched (channels_last + autocast)": Monai(device, tile, overlap, batch,
                                                              amp, True),
        }, None
    except ImportError as exc:
        return {}, f"MONAI not importable ({exc}): its rows are skipped"


def rows_of(times: dict[str, list[float]], pixels: int, settings: dict[str, Any]) -> list[dict]:
    """Throughput rows with ratios to the MONAI rows of the same table."""
    med = {k: median(v) for k, v in times.items()}
    fp32 = next((k for k in med if k.startswith("MONAI fp32")), None)
    matched = next((k for k in med if k.startswith("MONAI matched")), None)
    return [{"pipeline": k, **settings, "median_s": fmt(m), "mp_s": fmt(pixels / 1e6 / m, 2),
             "vs_monai_fp32": fmt(med[fp32] / m, 2) if fp32 else None,
             "vs_monai_matched": fmt(med[matched] / m, 2) if matched else None,
             "spread": fmt(spread(times[k]), 2), "n": len(times[k])}
            for k, m in med.items()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mode = mode_of(args)
    setup_torch(args)
    t0 = time.perf_counter()
    budget = args.budget or pick(mode, smoke=600.0, normal=115.0)
    size = args.size or pick(mode, smoke=192, normal=2048)
    n_planes = args.planes or pick(mode, smoke=3, normal=20)
    repeats = args.repeats or pick(mode, smoke=1, normal=5)
    n_serial = args.serial_planes or pick(mode, smoke=2, normal=4)
    model = load_model()
    default = Predictor(model, InferenceConfig(device=args.device, overlap=args.overlap))
    device, amp = default.device, default.amp
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    machine = machine_info(device)
    machine["device"] = device.type
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
        machine["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory
                                          / 2**30, 1)
    notes: list[str] = []
    skipped: list[str] = []
    print(f"{NAME}: mode={mode} device={device} {machine.get('gpu', '')} autocast={amp_name} "
          f"default tile={default.tile} batch={default.batch_size} "
          f"post workers={post_workers(device)}", flush=True)

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    image = sample_plane(size, args.seed)
    # One untimed pass before anything is timed: CUDA context, cuDNN autotuning at the
    # default geometry (interleaved() then warms each row again).
    default.predict(image)
    sync(device)

    # ---- (1) 2D image at our defaults ---------------------------------------------------
    def section_2d(tile: int, batch: int, ours: dict[str, Callable]) -> list[dict]:
        runners: dict[str, Callable] = dict(ours)
        monai, why = monai_runners(device, tile, args.overlap, batch, amp)
        if why and why not in notes:
            notes.append(why)
        runners |= monai
        times = interleaved({k: (lambda f=f: f(image)) for k, f in runners.items()}, repeats,
                            warmup=2, device=device)
        return rows_of(times, image.size, {"tile": tile, "batch": batch})

    fp32 = Predictor(model, InferenceConfig(device=args.device, overlap=args.overlap,
                                            tile=default.tile, batch_size=default.batch_size,
                                            precision="fp32"))
    rows_default = section_2d(default.tile, default.batch_size,
                              {"ours": default.predict, "ours fp32": fp32.predict})
    del fp32

    # ---- (2) stack ----------------------------------------------------------------------
    rows_stack: list[dict] = []
    if left() > 0.4 * budget:
        stack = np.stack([sample_plane(size, args.seed + 1 + i) for i in range(n_planes)])
        per_plane: dict[str, float] = {}

        def timed(fn: Callable[[Any], Any]) -> float:
            """Seconds for ``fn(stack)`` after one untimed pass over two planes."""
            fn(stack[:2])
            sync(device)
            t = time.perf_counter()
            fn(stack)
            sync(device)
            return time.perf_counter() - t

        on_device = PostprocessConfig(post_device="device")
        on_host = PostprocessConfig(post_device="cpu")
        per_plane["ours predict (per plane)"] = timed(
            lambda s: [default.predict(p) for p in s]) / n_planes
        per_plane["ours segment_image (post-processing on device)"] = timed(
            lambda s: drain(segment_image(s, default, postprocess=on_device))) / n_planes
        # The device post-processing alone, on one plane's maps already on the device:
        # what it adds to predict-only per plane.
        maps = drain(default.predict_iter(stack[0], on_device=True, channels=instance_channels(
            default.model_config, default.n_outputs)))
        per_plane["ours post-processing alone on device (per plane)"] = timed(
            lambda s: [instances_from_maps(maps[BG], maps[INTERIOR], maps.get(DISTANCE),
                                           on_device) for _ in s]) / n_planes
        del maps
        workers = post_workers(device)
        per_plane[f"ours segment_image (pipelined, {workers} post threads)"] = timed(
            lambda s: drain(segment_image(s, default, postprocess=on_host))) / n_planes
        if left() > 0.3 * budget:
            # The same with post-processing in processes (no GIL), a long-lived pool as a
            # batch runner would keep; its start-up is timed apart.
            n_proc = max(1, min(14, (os.cpu_count() or 2) - 2))
            t = time.perf_counter()
            ex = ProcessPoolExecutor(n_proc, mp_context=multiprocessing.get_context("spawn"))
            list(ex.map(time.sleep, [0.2] * 2 * n_proc))
            notes.append(f"process pool of {n_proc} started in {time.perf_counter() - t:.1f} s")
            per_plane[f"ours segment_image (pipelined, {n_proc} post processes)"] = timed(
                lambda s: drain(segment_image(s, default, postprocess=on_host, executor=ex,
                                              workers=n_proc))) / n_planes
            ex.shutdown(wait=False, cancel_futures=True)
        else:
            skipped.append("process-pool segment_image row (time)")
        if left() > 0.2 * budget:
            k = min(n_serial, n_planes)
            per_plane["ours segment_image (serial, post in the same thread)"] = timed(
                lambda s: drain(segment_image(s[:k], default, postprocess=on_host,
                                              workers=0))) / k
        else:
            skipped.append("serial segment_image row (time)")
        monai, why = monai_runners(device, default.tile, args.overlap, default.batch_size, amp)
        for name, fn in monai.items():
            if left() < 0.1 * budget:
                skipped.append(f"stack {name} (time)")
                continue
            per_plane[name] = timed(lambda s, fn=fn: [fn(p) for p in s]) / n_planes
        rows_stack = rows_of({k: [v] for k, v in per_plane.items()}, stack[0].size,
                             {"tile": default.tile, "batch": default.batch_size})
    else:
        skipped.append("stack section (time)")

    # ---- (3) best settings: a small sweep of ours, then MONAI at the winner ---------------
    sweep_rows: list[dict] = []
    rows_best: list[dict] = []
    grid = pick(mode, smoke=[(128, 2), (192, 4)],
                normal=[(512, 8), (512, 16), (512, 32), (1024, 4), (1024, 8)])
    if left() > 0.2 * budget:
        sweep: dict[str, Predictor] = {}
        for tile, batch in grid:
            sweep[f"ours tile {tile} batch {batch}"] = Predictor(model, InferenceConfig(
                device=args.device, overlap=args.overlap, tile=tile, batch_size=batch))
        times = interleaved({k: (lambda p=p: p.predict(image)) for k, p in sweep.items()},
                            max(repeats - 2, 1), warmup=2, device=device)
        sweep_rows = rows_of(times, image.size, {})
        best_key = min(times, key=lambda k: median(times[k]))
        best = sweep[best_key]
        del sweep
        rows_best = section_2d(best.tile, best.batch_size, {"ours": best.predict})
    else:
        skipped.append("best-settings sweep (time)")
        best = default

    def get(rows: list[dict], name: str, key: str) -> Any:
        return next((r[key] for r in rows if r["pipeline"].startswith(name)), None)

    predict_mp = get(rows_stack, "ours predict", "mp_s")
    e2e_mp = get(rows_stack, "ours segment_image (post-processing on device", "mp_s")
    e2e_threads = get(rows_stack, "ours segment_image (pipelined", "mp_s")
    e2e_proc = next((r["mp_s"] for r in rows_stack if "processes" in r["pipeline"]), None)
    e2e_ratio = fmt(e2e_mp / predict_mp, 2) if predict_mp and e2e_mp else None
    vs_default = get(rows_default, "ours", "vs_monai_fp32")
    summary = {
        "autocast": amp_name, "default_tile": default.tile, "default_batch": default.batch_size,
        "best_tile": best.tile, "best_batch": best.batch_size,
        "mp_s_2d_default": get(rows_default, "ours", "mp_s"),
        "mp_s_2d_best": get(rows_best, "ours", "mp_s"),
        "speedup_vs_monai_fp32_2d_default": vs_default,
        "speedup_vs_monai_matched_2d_default": get(rows_default, "ours", "vs_monai_matched"),
        "speedup_vs_monai_fp32_2d_best": get(rows_best, "ours", "vs_monai_fp32"),
        "speedup_vs_monai_matched_2d_best": get(rows_best, "ours", "vs_monai_matched"),
        "speedup_vs_monai_fp32_stack": get(rows_stack, "ours predict", "vs_monai_fp32"),
        "speedup_vs_monai_matched_stack": get(rows_stack, "ours predict", "vs_monai_matched"),
        "stack_predict_mp_s": predict_mp, "stack_segment_image_mp_s": e2e_mp,
        "segment_image_vs_predict_stack": e2e_ratio,
        "post_on_device_s_per_plane": get(rows_stack, "ours post-processing alone",
                                          "median_s"),
        "segment_image_threads_vs_predict_stack":
            fmt(e2e_threads / predict_mp, 2) if predict_mp and e2e_threads else None,
        "segment_image_processes_vs_predict_stack":
            fmt(e2e_proc / predict_mp, 2) if predict_mp and e2e_proc else None,
        "targets": {
            "vs_monai_fp32_at_defaults": {"target": TARGET_VS_MONAI, "value": vs_default,
                                          "met": None if vs_default is None
                                          else vs_default >= TARGET_VS_MONAI},
            "segment_image_vs_predict": {"target": TARGET_E2E_RATIO, "value": e2e_ratio,
                                         "met": None if e2e_ratio is None
                                         else e2e_ratio >= TARGET_E2E_RATIO},
        },
    }
    cols = ["pipeline", "tile", "batch", "median_s", "mp_s", "vs_monai_fp32",
            "vs_monai_matched", "spread"]
    tables = {
        "image_2d_default": table(rows_default, cols, f"2D {size}² uint16 at our {device.type} "
                                  f"defaults (median of {repeats})"),
        "sweep": table(sweep_rows, ["pipeline", "median_s", "mp_s", "spread"],
                       f"ours, tile/batch sweep on {size}²"),
        "image_2d_best": table(rows_best, cols, f"2D {size}² at our best setting"),
        "stack": table(rows_stack, cols, f"stack {n_planes}x{size}² (seconds per plane)"),
    }
    for t in tables.values():
        emit(t)
    for note in notes + [f"skipped: {s}" for s in skipped]:
        print(note, flush=True)
    emit(f"targets: {summary['targets']}")
    payload = {
        "benchmark": NAME, "mode": mode, "machine": machine,
        "noise": {"note": "dedicated GPU machine" if device.type == "cuda" else "shared CPU"},
        "config": {"size": size, "planes": n_planes, "overlap": args.overlap,
                   "margin": default.config.margin, "repeats": repeats, "budget_s": budget,
                   "autocast": amp_name, "monai_mode": "gaussian", "grid": grid},
        "image_2d_default": rows_default, "sweep": sweep_rows, "image_2d_best": rows_best,
        "stack": rows_stack, "summary": summary, "notes": notes, "skipped": skipped,
        "tables": tables, "wall_s": fmt(time.perf_counter() - t0, 1),
    }
    write_json(out_path(args, NAME), payload)
    return payload


if __name__ == "__main__":
    main()
