"""Peak resident memory segmenting a lazily read zarr stack into a zarr label store.

A uint16 stack (planes x size x size, one chunk per plane) is written to disk as zarr; each
plane count runs in a fresh subprocess that opens it lazily (``io.read_image``), creates an
on-disk label store (``io.create_label_store``) and runs ``segment_image`` into it. The child
reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS after
imports + model load (the baseline). Flatness = peak(largest) / peak(second largest plane
count), target <= 1.10; the excess of the largest run over the 1-plane run is compared with
one "plane set" (input uint16 + normalised float32 + 3 float32 probabilities + int32 labels).

    python benchmarks/bench_memory.py [--quick | --smoke] [--planes 1 5 50] [--size 2048]

``--huge`` measures one huge 2D plane instead (uint8 zarr, 12 000 x 12 000 by default): the
whole-plane engine (``segment_image``: the plane and its probabilities held whole) against
:func:`napari_unet.blocks.segment_plane_blocks` (2048-pixel blocks with a 128-pixel halo),
each in a fresh process, with the objects found and the agreement of the two label images.

    python benchmarks/bench_memory.py --huge [--smoke | --quick] [--huge-size 12000]
        [--variants whole blocks]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    NoiseMonitor,
    base_parser,
    emit,
    fmt,
    machine_info,
    mode_of,
    nuclei_plane,
    out_path,
    pick,
    setup_torch,
    table,
    write_json,
)

NAME = "bench_memory"
TARGET_FLATNESS = 1.10
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--planes", type=int, nargs="+", default=None,
                   help="plane counts, one fresh process each (default 1 5 50)")
    p.add_argument("--size", type=int, default=None,
                   help="plane side (default 2048; --quick 1024)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the zarr stores go (default: a temporary folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--huge", action="store_true",
                   help="one huge 2D plane: whole-plane engine vs block by block")
    p.add_argument("--huge-size", type=int, default=None,
                   help="side of the huge plane (default 12000; --quick 4000; --smoke 600)")
    p.add_argument("--variants", nargs="+", default=["whole", "blocks"],
                   choices=["whole", "blocks"], help="which --huge runs to make")
    p.add_argument("--block", type=int, default=None, help="block side for --huge")
    p.add_argument("--halo", type=int, default=None, help="halo for --huge")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; psutil elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def _maxrss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(args: argparse.Namespace) -> None:
    """Segment the first ``n`` planes of the input store into a new label store."""
    setup_torch(args)
    from napari_unet.io import create_label_store, read_image
    from napari_unet.model import load_model
    from napari_unet.segment import InferenceConfig, Predictor, segment_image
    from napari_unet.tiling import drain

    predictor = Predictor(load_model(), InferenceConfig(device=args.device))
    image = read_image(args.input)[: args.n]
    store = create_label_store(args.output, image.shape, np.uint32)
    baseline, peak_before = _rss_now(), _maxrss()
    t = time.perf_counter()
    drain(segment_image(image, predictor, out=store))
    wall = time.perf_counter() - t
    last = np.asarray(store[-1])
    print(json.dumps({
        "planes": args.n, "peak_rss": _maxrss(), "baseline_rss": baseline,
        "peak_before_segment": peak_before, "wall_s": wall,
        "mp_s": image.size / 1e6 / wall, "objects_last_plane": int(len(np.unique(last)) - 1),
    }))


def make_input(path: Path, planes: int, size: int, seed: int) -> None:
    """A uint16 zarr stack, one chunk per plane (rolled copies of one realistic plane)."""
    import zarr

    base = nuclei_plane(size, seed)
    arr = zarr.create_array(str(path), shape=(planes, size, size), dtype=np.uint16,
                            chunks=(1, size, size), fill_value=0)
    for i in range(planes):
        arr[i] = np.roll(base, (97 * i, 53 * i), axis=(0, 1))


def run_child(args: argparse.Namespace, stack: Path, workdir: Path, n: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--input", str(stack), "--n", str(n),
           "--output", str(workdir / f"labels_{n}.zarr"), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.smoke:
        cmd.append("--smoke")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"child with {n} planes failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def huge_child(args: argparse.Namespace) -> None:
    """Segment the huge plane whole or block by block; labels saved as .npy for the parent."""
    setup_torch(args)
    import zarr

    from napari_unet.blocks import DEFAULT_BLOCK, DEFAULT_HALO, segment_plane_blocks
    from napari_unet.model import load_model
    from napari_unet.segment import InferenceConfig, Predictor, segment_image
    from napari_unet.tiling import drain

    predictor = Predictor(load_model(), InferenceConfig(device=args.device))
    plane = zarr.open_array(str(args.input), mode="r")
    baseline = _rss_now()
    t = time.perf_counter()
    if args.variant == "whole":
        labels = drain(segment_image(plane, predictor))
    else:
        labels = drain(segment_plane_blocks(plane, predictor, block=args.block or DEFAULT_BLOCK,
                                            halo=args.halo or DEFAULT_HALO))
    wall = time.perf_counter() - t
    peak = _maxrss()
    np.save(args.output, labels)
    print(json.dumps({"variant": args.variant, "peak_rss": peak, "baseline_rss": baseline,
                      "wall_s": wall, "mp_s": plane.size / 1e6 / wall,
                      "objects": int(labels.max())}))


def make_huge(path: Path, size: int, seed: int) -> None:
    """A uint8 zarr plane in 2048 x 2048 chunks, written one strip of rows at a time."""
    import zarr

    chunk = min(2048, size)
    arr = zarr.create_array(str(path), shape=(size, size), dtype=np.uint8,
                            chunks=(chunk, chunk), fill_value=0)
    for y in range(0, size, chunk):
        strip = nuclei_plane((min(chunk, size - y), size), seed + y)
        arr[y : y + strip.shape[0]] = np.clip(strip // 16, 0, 255).astype(np.uint8)


def huge_main(args: argparse.Namespace) -> dict[str, Any]:
    mode = mode_of(args)
    size = args.huge_size or pick(mode, smoke=600, quick=4000, normal=12000)
    t_start = time.perf_counter()
    print(f"{NAME} --huge: mode={mode} plane {size}x{size} uint8 zarr, variants "
          f"{args.variants}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, NoiseMonitor() as noise:
        workdir = Path(tmp)
        plane = workdir / "plane.zarr"
        make_huge(plane, size, args.seed)
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", "--variant", variant, "--input",
                   str(plane), "--output", str(workdir / f"{variant}.npy"), "--device",
                   args.device, "--threads", str(args.threads), "--seed", str(args.seed)]
            cmd += ["--block", str(args.block)] if args.block else []
            cmd += ["--halo", str(args.halo)] if args.halo else []
            if args.smoke:
                cmd.append("--smoke")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{variant} run failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  {variant}: peak {r['peak_rss'] / MB:.0f} MB, {r['wall_s']:.1f} s, "
                  f"{r['objects']} objects", flush=True)
            runs.append(r)
        agreement = None
        if len(runs) == 2:
            a = np.load(workdir / "whole.npy", mmap_mode="r")
            b = np.load(workdir / "blocks.npy", mmap_mode="r")
            agreement = fmt(float(np.mean((np.asarray(a) > 0) == (np.asarray(b) > 0))), 5)
    rows = [{"variant": r["variant"], "peak_rss_mb": fmt(r["peak_rss"] / MB, 1),
             "bytes_per_pixel": fmt((r["peak_rss"] - r["baseline_rss"]) / size**2, 1),
             "wall_s": fmt(r["wall_s"], 1), "mp_s": fmt(r["mp_s"], 2),
             "objects": r["objects"]} for r in runs]
    t = table(rows, ["variant", "peak_rss_mb", "bytes_per_pixel", "wall_s", "mp_s", "objects"],
              f"peak RSS segmenting one {size}x{size} uint8 zarr plane (fresh process per row)")
    emit(t)
    if agreement is not None:
        emit(f"foreground agreement whole vs blocks: {agreement}")
    payload = {"benchmark": f"{NAME}_huge", "mode": mode, "machine": machine_info(args.device),
               "noise": noise.summary(), "config": {"size": size, "dtype": "uint8"},
               "runs": rows, "foreground_agreement": agreement, "tables": {"memory": t},
               "wall_s": fmt(time.perf_counter() - t_start, 1)}
    write_json(out_path(args, f"{NAME}_huge"), payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child and args.variant:
        huge_child(args)
        return {}
    if args.child:
        child(args)
        return {}
    if args.huge:
        return huge_main(args)
    mode = mode_of(args)
    t_start = time.perf_counter()
    planes = sorted(set(args.planes or pick(mode, smoke=[1, 2, 4], normal=[1, 5, 50])))
    size = args.size or pick(mode, smoke=128, quick=1024, normal=2048)
    setup_torch(args)
    print(f"{NAME}: mode={mode} planes={planes} size={size}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, NoiseMonitor() as noise:
        workdir = Path(tmp)
        stack = workdir / "stack.zarr"
        t = time.perf_counter()
        make_input(stack, max(planes), size, args.seed)
        print(f"wrote input {max(planes)}x{size}x{size} uint16 zarr in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        runs = []
        for n in planes:
            r = run_child(args, stack, workdir, n)
            print(f"  {n} planes: peak {r['peak_rss'] / MB:.0f} MB, {r['wall_s']:.1f} s",
                  flush=True)
            runs.append(r)
    plane_set = size * size * (2 + 4 + 3 * 4 + 4)
    rows = [{
        "planes": r["planes"], "peak_rss_mb": fmt(r["peak_rss"] / MB, 1),
        "baseline_mb": fmt(r["baseline_rss"] / MB, 1),
        "working_mb": fmt((r["peak_rss"] - r["baseline_rss"]) / MB, 1),
        "wall_s": fmt(r["wall_s"], 1), "mp_s": fmt(r["mp_s"], 2),
        "objects_last_plane": r["objects_last_plane"],
    } for r in runs]
    big, mid = runs[-1], runs[-2] if len(runs) > 1 else runs[-1]
    one = next((r for r in runs if r["planes"] == 1), None)
    flatness = big["peak_rss"] / mid["peak_rss"]
    excess = big["peak_rss"] - (one["peak_rss"] if one else big["baseline_rss"])
    summary = {
        "flatness": fmt(flatness), "flatness_of": f"{big['planes']}/{mid['planes']} planes",
        "target_flatness": TARGET_FLATNESS, "met": bool(flatness <= TARGET_FLATNESS),
        "excess_mb": fmt(excess / MB, 1),
        "excess_over": "1-plane run" if one else "baseline (imports + model)",
        "plane_set_mb": fmt(plane_set / MB, 1),
        "excess_in_plane_sets": fmt(excess / plane_set, 2),
        "working_in_plane_sets": fmt((big["peak_rss"] - big["baseline_rss"]) / plane_set, 2),
        "input_gb_largest": fmt(big["planes"] * size * size * 2 / 2**30, 2),
    }
    t = table(rows, ["planes", "peak_rss_mb", "baseline_mb", "working_mb", "wall_s", "mp_s"],
              f"peak RSS segmenting a lazy {size}x{size} uint16 zarr stack into a zarr store "
              "(fresh process per row)")
    emit(t)
    verdict = (f"flatness {summary['flatness_of']}: {summary['flatness']} (target <= "
               f"{TARGET_FLATNESS}) {'met' if summary['met'] else 'MISSED'}; excess over the "
               f"{summary['excess_over']}: {summary['excess_mb']} MB = "
               f"{summary['excess_in_plane_sets']} plane sets of {summary['plane_set_mb']} MB")
    emit(verdict)
    payload = {
        "benchmark": NAME, "mode": mode, "machine": machine_info(args.device),
        "noise": noise.summary(), "config": {"planes": planes, "size": size, "dtype": "uint16",
                                             "label_dtype": "uint32"},
        "runs": rows, "summary": summary, "tables": {"memory": t, "verdict": verdict},
        "wall_s": fmt(time.perf_counter() - t_start, 1),
    }
    write_json(out_path(args, NAME), payload)
    return payload


if __name__ == "__main__":
    main()
