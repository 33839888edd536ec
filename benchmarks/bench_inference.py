"""Tiled inference throughput of the bundled model vs MONAI, and vs the machine's conv peak.

Rows (same image, tile, overlap, batch of tiles; medians of interleaved repeats):

- ``napari-unet predict``: ``Predictor.predict`` (normalise, tile, fused BN, channels_last,
  bf16 autocast where the hardware has it, cosine blending) -> (3, H, W) probabilities.
- ``napari-unet segment_image``: the same plus post-processing (watershed) -> labels.
- ``MONAI fp32 NCHW``: ``monai.inferers.sliding_window_inference`` with the plain
  ``load_model()`` network in eval mode, fp32, NCHW (what a typical user writes),
  ``mode="gaussian"``, ``overlap = overlap_px / tile``, then softmax.
- ``MONAI channels_last+<amp>``: the same, with the Predictor's layout and autocast dtype, so
  the ratio to it isolates tiling/blending overhead from layout/precision.

Both pipelines start from the uint16 plane and end with a numpy array; both include the same
percentile normalisation. The conv "limit" is a 3x3 convolution (32 -> 32 channels) measured
in the same process in each layout/precision; the model's FLOPs (conv FLOPs per pixel from
``torch.utils.flop_counter``, times the pixels of all tiles actually computed) per second are
reported as a fraction of the fastest. Targets: >= 1.5x MONAI fp32 and >= 50% of conv peak.

    python benchmarks/bench_inference.py [--quick | --smoke | --full] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
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
    sync,
    table,
    threading_probe,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode

from napari_unet.device import autocast
from napari_unet.model import UNet, load_model
from napari_unet.normalize import normalize
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.tiling import drain

NAME = "bench_inference"
TARGET_SPEEDUP = 1.5
TARGET_PEAK_FRACTION = 0.5
# Profiler op name -> where the time goes.
CATEGORIES = {
    "conv (oneDNN)": ("convolution", "conv2d", "conv_transpose"),
    "ReLU": ("relu", "clamp_min", "threshold"),
    "skip concat": ("aten::cat",),
    "copies / dtype casts": ("copy_", "aten::to", "_to_copy", "contiguous", "clone"),
    "max-pool": ("max_pool",),
    "blend (tile accumulate)": ("aten::mul", "aten::add", "aten::div", "aten::zeros",
                                "aten::fill_", "aten::stack"),
    "softmax": ("softmax",),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], full=True)
    p.add_argument("--size", type=int, default=None, help="2D image side (default 2048)")
    p.add_argument("--planes", type=int, default=None, help="stack planes (default 20)")
    p.add_argument("--stack-size", type=int, default=None, help="stack plane side (1024)")
    p.add_argument("--tile", type=int, default=None, help="tile side (InferenceConfig)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (2D image)")
    p.add_argument("--conv-batch", type=int, default=None, help="batch of the conv-peak probe")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI rows")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    p.add_argument("--no-threading-probe", action="store_true",
                   help="skip the CPU threading probe (child processes)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the engine-variant rows (TorchScript freeze)")
    p.add_argument("--compile", action="store_true",
                   help="also time a torch.compile'd network (slow to compile on CPU)")
    p.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def flops_per_pixel(model: UNet, tile: int) -> float:
    """Conv FLOPs (2 per multiply-add) per output pixel, counted on one fp32 tile."""
    x = torch.zeros(1, model.config.in_channels, tile, tile)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.cpu().eval()(x)
    return counter.get_total_flops() / tile**2


def tiles_of(predictor: Predictor, plane: np.ndarray) -> tuple[int, int]:
    """(number of tiles, pixels per tile) the Predictor computes for this plane."""
    gen = predictor.predict_iter(plane)
    _, total = next(gen)
    gen.close()
    c = predictor.config
    h, w = plane.shape[-2:]
    div = predictor.model_config.divisor
    th = min(predictor.tile, -(-(h + 2 * c.margin) // div) * div)
    tw = min(predictor.tile, -(-(w + 2 * c.margin) // div) * div)
    return total, th * tw


class MonaiRunner:
    """MONAI sliding-window inference on a plane, counting the tiles it runs."""

    def __init__(self, net: torch.nn.Module, device: torch.device, tile: int, overlap: int,
                 batch: int, amp: torch.dtype | None, channels_last: bool) -> None:
        from monai.inferers import sliding_window_inference

        self.swi = sliding_window_inference
        self.net, self.device, self.amp, self.cl = net, device, amp, channels_last
        self.tile, self.overlap, self.batch = tile, overlap / tile, batch
        self.percentiles = net.config.norm_percentiles
        self.tiles = 0

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += x.shape[0]
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    @torch.inference_mode()
    def __call__(self, plane: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize(plane[None], self.percentiles))[None].to(self.device)
        with autocast(self.device, self.amp):
            logits = self.swi(x, (self.tile, self.tile), self.batch, self._net,
                              overlap=self.overlap, mode="gaussian")
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def conv_peak(device: torch.device, batch: int, side: int, repeats: int,
              amp: torch.dtype | None) -> list[dict]:
    """3x3 conv throughput (GFLOP/s) per layout/precision, 32 -> 32 channels, plus widths."""
    variants: list[tuple[str, int, bool, torch.dtype]] = [
        ("NCHW fp32", 32, False, torch.float32),
        ("channels_last fp32", 32, True, torch.float32),
    ]
    if device.type != "cpu" or amp is not None:
        low = amp or torch.bfloat16
        name = str(low).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
        variants.append((f"channels_last {name}", 32, True, low))
        variants += [(f"channels_last {name}", c, True, low) for c in (16, 64, 128)]
    fns: dict[str, Callable[[], Any]] = {}
    flops: dict[str, float] = {}
    for label, ch, cl, dtype in variants:
        conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(device, dtype).eval()
        x = torch.randn(batch, ch, side, side, device=device, dtype=dtype)
        if cl:
            conv = conv.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def run(conv: torch.nn.Module = conv, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                conv(x)

        key = f"{label} {ch}->{ch}"
        fns[key] = run
        flops[key] = 2.0 * ch * ch * 9 * batch * side * side
    times = interleaved(fns, repeats, warmup=2, device=device)
    return [{"conv": k, "gflop_s": fmt(flops[k] / median(t) / 1e9, 1),
             "ms": fmt(median(t) * 1e3, 2), "spread": fmt(spread(t), 2)}
            for k, t in times.items()]


def profile_breakdown(predictor: Predictor, plane: np.ndarray) -> dict[str, Any]:
    """Where one ``predict`` spends its time: profiler op categories + numpy pre-processing."""
    from torch.profiler import ProfilerActivity, profile

    predictor.predict(plane)  # warm
    t = time.perf_counter()
    normalize(plane[None], predictor.model_config.norm_percentiles)
    norm_s = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        predictor.predict(plane)
        sync(predictor.device)
        wall = time.perf_counter() - t
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    ops.sort(key=lambda o: -o[1])
    cats: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    cats["other torch ops"] = 0.0
    for key, s, _ in ops:
        for cat, pats in CATEGORIES.items():
            if any(pat in key for pat in pats):
                cats[cat] += s
                break
        else:
            cats["other torch ops"] += s
    cats["normalise (numpy)"] = norm_s
    tracked = sum(cats.values())
    cats["python / untracked"] = max(wall - tracked, 0.0)
    return {
        "plane": list(plane.shape),
        "wall_s": fmt(wall, 3),
        "categories": [{"where": k, "s": fmt(v, 3), "share": fmt(v / wall, 3)}
                       for k, v in sorted(cats.items(), key=lambda kv: -kv[1])],
        "top_ops": [{"op": k, "self_s": fmt(s, 3), "calls": n, "share": fmt(s / wall, 3)}
                    for k, s, n in ops[:12]],
    }


def engine_variants(model: UNet, cfg: InferenceConfig, plane: np.ndarray, repeats: int,
                    compile_too: bool) -> list[dict]:
    """What the same Predictor gains from graph-level fusion (conv+ReLU, no eager dispatch).

    The Predictor's network is swapped for a TorchScript trace (under its autocast) frozen
    with ``torch.jit.freeze``, and optionally for ``torch.compile``; an experiment for the
    engine, not something the engine does today.
    """
    eager = Predictor(model, cfg)
    variants: dict[str, Predictor] = {"eager (engine today)": eager}
    frozen = Predictor(model, cfg)
    example = torch.zeros(cfg.batch_size, model.config.in_channels, cfg.tile, cfg.tile,
                          device=frozen.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(frozen.device, frozen.amp):
        frozen.net = torch.jit.freeze(torch.jit.trace(frozen.net, example, check_trace=False))
    variants["torch.jit.trace + freeze"] = frozen
    compile_s = None
    if compile_too:
        compiled = Predictor(model, cfg)
        compiled.net = torch.compile(compiled.net)
        t = time.perf_counter()
        compiled.predict(plane)
        compile_s = time.perf_counter() - t
        variants["torch.compile"] = compiled
    times = interleaved({k: (lambda p=p: p.predict(plane)) for k, p in variants.items()},
                        repeats, device=eager.device)
    base = median(times["eager (engine today)"])
    return [{"network": k, "median_s": fmt(median(v)), "mp_s": fmt(plane.size / 1e6 / median(v)),
             "vs_eager": fmt(base / median(v), 2),
             "first_call_s": fmt(compile_s, 1) if k == "torch.compile" else None}
            for k, v in times.items()]


def probe_child(args: argparse.Namespace) -> None:
    """Child of the threading probe: predictor MP/s on one plane, as one JSON line."""
    setup_torch(args)
    predictor = Predictor(load_model(), InferenceConfig(device="cpu"))
    plane = nuclei_plane(args.size, args.seed)
    with NoiseMonitor() as noise:
        times = interleaved({"p": lambda: predictor.predict(plane)}, args.repeats)["p"]
    print(json.dumps({"rate": plane.size / 1e6 / median(times),
                      "threads": torch.get_num_threads(), "noise": noise.summary()}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mode = mode_of(args)
    if args.probe_child:
        probe_child(args)
        return {}
    setup_torch(args)
    t_start = time.perf_counter()
    size = args.size or pick(mode, smoke=128, quick=1024, normal=2048, full=4096)
    planes = args.planes or pick(mode, smoke=2, quick=5, normal=20, full=20)
    ssize = args.stack_size or pick(mode, smoke=128, quick=512, normal=1024, full=2048)
    repeats = args.repeats or pick(mode, smoke=1, normal=3, full=5)
    defaults = InferenceConfig()
    cfg = InferenceConfig(
        tile=args.tile or pick(mode, smoke=128, normal=defaults.tile),
        overlap=args.overlap or pick(mode, smoke=32, normal=defaults.overlap),
        batch_size=args.batch_size or defaults.batch_size,
        device=args.device,
        # The engine against MONAI on the same pixels: the plane of ~60-px nuclei would
        # otherwise be shrunk first (rescale.py; bench_models.py measures that).
        rescale=False,
    )
    model = load_model()
    predictor = Predictor(model, cfg)
    # The device's defaults where none were given (InferenceConfig None = auto).
    cfg.tile, cfg.batch_size = predictor.tile, predictor.batch_size
    device, amp = predictor.device, predictor.amp
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    fpp = flops_per_pixel(model, cfg.tile)
    print(f"{NAME}: mode={mode} device={device} autocast={amp_name} tile={cfg.tile} "
          f"overlap={cfg.overlap} batch={cfg.batch_size} threads={torch.get_num_threads()} "
          f"model={fpp / 1e3:.1f} kFLOP/px", flush=True)

    runners: dict[str, Callable[[np.ndarray], Any]] = {
        "napari-unet predict": predictor.predict,
        "napari-unet segment_image": lambda p: drain(segment_image(p, predictor)),
    }
    monai: dict[str, MonaiRunner] = {}
    if not args.no_monai:
        try:
            plain = load_model(device=device).eval()
            monai["MONAI fp32 NCHW"] = MonaiRunner(plain, device, cfg.tile, cfg.overlap,
                                                   cfg.batch_size, None, False)
            cl = load_model(device=device).eval().to(memory_format=torch.channels_last)
            monai[f"MONAI channels_last+{amp_name}"] = MonaiRunner(
                cl, device, cfg.tile, cfg.overlap, cfg.batch_size, amp, True)
            runners |= monai
        except ImportError as exc:
            print(f"MONAI not available ({exc}); skipping its rows", flush=True)

    with NoiseMonitor() as noise:
        # ---- conv peak (same process, before and after the model runs) -------------------
        conv_batch = args.conv_batch or (1 if mode == "smoke" else
                                         (4 if device.type == "cpu" else 32))
        conv_side = 64 if mode == "smoke" else 256
        conv_rows = conv_peak(device, conv_batch, conv_side, pick(mode, smoke=2, normal=7), amp)
        peak_row = max((r for r in conv_rows if r["conv"].endswith("32->32")),
                       key=lambda r: r["gflop_s"])
        peak = peak_row["gflop_s"] * 1e9

        # ---- 2D image -------------------------------------------------------------------
        image = nuclei_plane(size, args.seed)
        n_tiles, tile_px = tiles_of(predictor, image)
        for r in monai.values():
            r.tiles = 0
        times = interleaved({k: (lambda f=f: f(image)) for k, f in runners.items()}, repeats,
                            device=device)
        monai_tiles = {k: r.tiles // (repeats + 1) for k, r in monai.items()}
        rows_2d = _rows(times, image.size, n_tiles * tile_px, fpp, peak, monai_tiles, tile_px)

        # ---- stack, one plane at a time (per-plane times, interleaved) -------------------
        stack = np.stack([nuclei_plane(ssize, args.seed + 1 + i) for i in range(planes)])
        s_tiles, s_tile_px = tiles_of(predictor, stack[0])
        per_plane: dict[str, list[float]] = {k: [] for k in runners}
        for r in monai.values():
            r.tiles = 0
        for k, f in runners.items():  # warm-up at this size
            if k != "napari-unet segment_image":
                f(stack[0])
        for r in monai.values():
            r.tiles = 0
        for plane in stack:
            for k, f in runners.items():
                if k == "napari-unet segment_image":
                    continue
                sync(device)
                t = time.perf_counter()
                f(plane)
                sync(device)
                per_plane[k].append(time.perf_counter() - t)
        # End-to-end over the whole stack (instance ids offset across planes).
        t = time.perf_counter()
        drain(segment_image(stack, predictor))
        per_plane["napari-unet segment_image"] = [(time.perf_counter() - t) / planes] * planes
        stack_tiles = {k: r.tiles // planes for k, r in monai.items()}
        rows_stack = _rows(per_plane, stack[0].size, s_tiles * s_tile_px, fpp, peak,
                           stack_tiles, s_tile_px, total=True)

        # ---- profile ---------------------------------------------------------------------
        prof = None
        if not args.no_profile:
            pside = min(size, 1024)
            prof = profile_breakdown(predictor, nuclei_plane(pside, args.seed))
        variant_rows: list[dict] = []
        if not args.no_variants and mode != "smoke":
            variant_rows = engine_variants(model, cfg, nuclei_plane(min(size, 1024), args.seed),
                                           repeats, args.compile)
    threads_rows: list[dict] = []
    if device.type == "cpu" and not args.no_threading_probe and mode != "smoke":
        threads_rows = threading_probe(
            __file__, ["--size", str(min(size, 1024)), "--repeats", "3"], "mp_s")

    summary = _summary(rows_2d, rows_stack, amp_name)
    emit(table(conv_rows, ["conv", "gflop_s", "ms", "spread"],
               f"3x3 conv peak ({device}, batch {conv_batch} x {conv_side}^2; limit = fastest "
               f"32->32: {peak_row['conv']})"))
    cols = ["pipeline", "median_s", "mp_s", "vs_monai_fp32", "vs_monai_matched", "tiles",
            "model_gflop_s", "peak_fraction", "spread"]
    t2d = table(rows_2d, cols, f"2D {size}x{size} uint16 (median of {repeats})")
    tst = table(rows_stack, cols, f"stack {planes}x{ssize}x{ssize} (median per plane; "
                                  "segment_image: whole stack / planes)")
    emit(t2d)
    emit(tst)
    tables = {"conv_peak": table(conv_rows, ["conv", "gflop_s", "ms", "spread"], "conv peak"),
              "image_2d": t2d, "stack": tst}
    if prof is not None:
        tprof = table(prof["categories"], ["where", "s", "share"],
                      f"where predict's time goes ({prof['plane'][0]}x{prof['plane'][1]}, "
                      f"{prof['wall_s']} s, torch.profiler self time)")
        ttop = table(prof["top_ops"], ["op", "self_s", "calls", "share"], "top ops")
        emit(tprof)
        emit(ttop)
        tables |= {"profile": tprof, "top_ops": ttop}
    if variant_rows:
        tvar = table(variant_rows, ["network", "median_s", "mp_s", "vs_eager", "first_call_s"],
                     f"engine variants (experiment): predict on {min(size, 1024)}^2")
        emit(tvar)
        tables["variants"] = tvar
    if threads_rows:
        tthr = table(threads_rows, ["setting", "threads", "mp_s", "other_cores"],
                     "threading probe: predict MP/s in fresh processes "
                     f"({min(size, 1024)}^2, median of 3)")
        emit(tthr)
        tables["threading"] = tthr
    emit(_verdict(summary))
    payload = {
        "benchmark": NAME, "mode": mode, "machine": machine_info(device), "noise": noise.summary(),
        "config": {"size": size, "planes": planes, "stack_size": ssize, "repeats": repeats,
                   "tile": cfg.tile, "overlap": cfg.overlap, "margin": cfg.margin,
                   "batch_size": cfg.batch_size, "blend": cfg.blend, "autocast": amp_name,
                   "monai_overlap_fraction": cfg.overlap / cfg.tile, "monai_mode": "gaussian",
                   "model_flops_per_pixel": fpp},
        "conv_peak": conv_rows, "peak_gflop_s": peak / 1e9, "image_2d": rows_2d,
        "stack": rows_stack, "profile": prof, "variants": variant_rows,
        "threading": threads_rows, "summary": summary,
        "tables": tables, "wall_s": fmt(time.perf_counter() - t_start, 1),
    }
    write_json(out_path(args, NAME), payload)
    return payload


def _rows(times: dict[str, list[float]], pixels: int, our_tile_pixels: int, fpp: float,
          peak: float, monai_tiles: dict[str, int], tile_px: int,
          total: bool = False) -> list[dict]:
    """Table rows: throughput, ratios to the MONAI rows, achieved model FLOP/s vs the peak."""
    med = {k: median(v) for k, v in times.items()}
    fp32 = next((k for k in med if k.startswith("MONAI fp32")), None)
    matched = next((k for k in med if k.startswith("MONAI channels_last")), None)
    rows = []
    for k, m in med.items():
        computed = monai_tiles[k] * tile_px if k in monai_tiles else our_tile_pixels
        row: dict[str, Any] = {
            "pipeline": k, "median_s": fmt(m), "mp_s": fmt(pixels / 1e6 / m),
            "tiles": computed // tile_px,
            "model_gflop_s": fmt(computed * fpp / m / 1e9, 1),
            "peak_fraction": fmt(computed * fpp / m / peak),
            "useful_peak_fraction": fmt(pixels * fpp / m / peak),
            "spread": fmt(spread(times[k]), 2), "n": len(times[k]),
        }
        row["vs_monai_fp32"] = fmt(med[fp32] / m, 2) if fp32 else None
        row["vs_monai_matched"] = fmt(med[matched] / m, 2) if matched else None
        rows.append(row)
    return rows


def _summary(rows_2d: list[dict], rows_stack: list[dict], amp_name: str) -> dict[str, Any]:
    def get(rows: list[dict], name: str, key: str) -> Any:
        return next((r[key] for r in rows if r["pipeline"] == name), None)

    ours = "napari-unet predict"
    out: dict[str, Any] = {"autocast": amp_name}
    for tag, rows in (("2d", rows_2d), ("stack", rows_stack)):
        out[f"mp_s_{tag}"] = get(rows, ours, "mp_s")
        out[f"e2e_mp_s_{tag}"] = get(rows, "napari-unet segment_image", "mp_s")
        out[f"speedup_vs_monai_fp32_{tag}"] = get(rows, ours, "vs_monai_fp32")
        out[f"speedup_vs_monai_matched_{tag}"] = get(rows, ours, "vs_monai_matched")
        out[f"peak_fraction_{tag}"] = get(rows, ours, "peak_fraction")
    sp = out["speedup_vs_monai_fp32_2d"]
    pf = out["peak_fraction_2d"]
    out["targets"] = {
        "speedup_vs_monai_fp32": {"target": TARGET_SPEEDUP, "value": sp,
                                  "met": None if sp is None else sp >= TARGET_SPEEDUP},
        "peak_fraction": {"target": TARGET_PEAK_FRACTION, "value": pf,
                          "met": None if pf is None else pf >= TARGET_PEAK_FRACTION},
    }
    return out


def _verdict(summary: dict[str, Any]) -> str:
    lines = ["targets (2D image):"]
    for key, t in summary["targets"].items():
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {key}: {t['value']} (target >= {t['target']}) {state}")
    if any(t["met"] is False for t in summary["targets"].values()):
        lines.append("  see the profile table above for where the time goes")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
