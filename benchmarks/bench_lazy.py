"""The CLI's lazy segment path on a large on-disk stack, and 1 -> N worker scaling.

1. Lazy path: a uint16 zarr stack (planes x size x size, one chunk per plane; 50 x 2048 x
   2048 = 400 MiB with ``--full``, 16 x 2048 x 2048 by default) is written plane by plane,
   then ``napari-unet segment
   stack.zarr -o labels.zarr`` runs in a fresh subprocess that reports its peak RSS
   (``resource.getrusage``) and its RSS after imports + model load (the baseline).
   Throughput = megapixels / wall time of the whole command (model load included).
2. Scaling: a smaller stack is segmented by ``batch.segment_batch`` on a local dask
   cluster of 1, then 2 worker processes (one thread each), after an untimed warm-up run in
   which every worker loads the model; the in-process run (torch's default threads) is the
   reference.

    python benchmarks/bench_lazy.py [--quick | --smoke | --full] [--planes N] [--size S]
        [--scaling-planes 12] [--scaling-size 1024] [--workers 1 2] [--model PATH]
        [--threads 1]

``--full`` takes several minutes on a 2-core CPU. ``--threads`` sets torch's threads in the
lazy subprocess and the in-process run (workers always use one).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
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

# Runs in the child: baseline RSS after imports + model load, then the CLI, then peak RSS.
_CHILD = """
import json, resource, sys, time
import psutil, torch
from napari_unet.cli import main
from napari_unet.model import load_model
if int(sys.argv[1]) > 0:
    torch.set_num_threads(int(sys.argv[1]))
model = sys.argv[2] if sys.argv[2] != "bundled" else None
load_model(model)
base = psutil.Process().memory_info().rss
t = time.perf_counter()
rc = main(["segment", *sys.argv[3:]])
wall = time.perf_counter() - t
print("RESULT " + json.dumps({"rc": rc, "wall_s": wall, "baseline_rss": base,
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_stack(path: Path, planes: int, size: int, seed: int = 0) -> zarr.Array:
    """A uint16 nuclei stack on disk, written one plane at a time (never whole in memory)."""
    z = zarr.create_array(str(path), shape=(planes, size, size), dtype=np.uint16,
                          chunks=(1, size, size), zarr_format=2, overwrite=True)
    for i in range(planes):
        z[i] = nuclei_plane(size, seed=seed + i)
    return z


def run_lazy(stack: Path, out: Path, model: str, device: str, threads: int) -> dict[str, Any]:
    args = [str(threads), model, str(stack), "-o", str(out), "--device", device, "--overwrite"]
    if model != "bundled":
        args += ["--model", model]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                          text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"segment child failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[len("RESULT "):])


def run_scaling(stack: Path, warm: Path, workdir: Path, workers: list[int],
                model_path: str | None, device: str) -> list[dict[str, Any]]:
    from napari_unet.batch import Job, local_client, segment_batch
    from napari_unet.segment import InferenceConfig
    from napari_unet.tiling import drain

    inference = InferenceConfig(device=device)
    n_planes, h, w = zarr.open_array(str(stack)).shape
    mpix = n_planes * h * w / 1e6
    rows = []
    for n in [0, *workers]:  # 0: in this process
        client = local_client(n) if n else None
        try:
            kw = {"model_path": model_path, "inference": inference, "client": client,
                  "overwrite": True}
            # Untimed: workers import torch and load the model once.
            drain(segment_batch([Job(warm, workdir / f"warm{n}.zarr")], **kw))
            t = time.perf_counter()
            result = drain(segment_batch([Job(stack, workdir / f"scaling{n}.zarr")], **kw))
            wall = time.perf_counter() - t
        finally:
            if client is not None:
                client.close()
        assert result.planes_computed == n_planes
        rows.append({"workers": n or "in-process", "planes": n_planes, "wall_s": fmt(wall, 2),
                     "mpix_per_s": fmt(mpix / wall, 3)})
        print(f"  {rows[-1]}", flush=True)
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = fmt(r["mpix_per_s"] / one["mpix_per_s"], 2) if one else None
    return rows


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], full=True)
    p.add_argument("--planes", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--scaling-planes", type=int, default=None)
    p.add_argument("--scaling-size", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the stacks go (default: a temporary folder, removed after)")
    p.add_argument("--skip-lazy", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args()
    setup_torch(args)  # --threads, for the in-process runs (the lazy child gets it too)
    mode = mode_of(args)
    planes = args.planes or pick(mode, smoke=3, quick=8, normal=16, full=50)
    size = args.size or pick(mode, smoke=256, quick=1024, normal=2048)
    s_planes = args.scaling_planes or pick(mode, smoke=4, quick=6, normal=12)
    s_size = args.scaling_size or pick(mode, smoke=256, quick=512, normal=1024)
    device = args.device
    model = args.model or "bundled"

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lazy_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "bench_lazy", "mode": mode,
                              "machine": machine_info(device)}
    tables: dict[str, str] = {}
    start = time.perf_counter()
    try:
        with NoiseMonitor() as noise:
            if not args.skip_lazy:
                print(f"writing a {planes} x {size} x {size} uint16 zarr stack...", flush=True)
                stack = workdir / "stack.zarr"
                make_stack(stack, planes, size, seed=args.seed)
                print("segmenting it lazily in a subprocess...", flush=True)
                r = run_lazy(stack, workdir / "labels.zarr", model, device, args.threads)
                labels = zarr.open_array(str(workdir / "labels.zarr"))
                n_objects = int(np.count_nonzero(np.unique(labels[planes // 2])))
                stack_mib = planes * size * size * 2 / 2**20
                row = {
                    "stack": f"{planes}x{size}x{size}", "stack_MiB": fmt(stack_mib, 0),
                    "labels_MiB": fmt(2 * stack_mib, 0),
                    "baseline_rss_MiB": fmt(r["baseline_rss"] / 2**20, 0),
                    "peak_rss_MiB": fmt(r["peak_rss"] / 2**20, 0),
                    "wall_s": fmt(r["wall_s"], 1),
                    "mpix_per_s": fmt(planes * size * size / 1e6 / r["wall_s"], 3),
                    "objects_mid_plane": n_objects,
                }
                result["lazy"] = row
                tables["lazy"] = table([row], list(row), "lazy CLI path (zarr -> zarr), one "
                                       "subprocess")
                emit(tables["lazy"])
                shutil.rmtree(stack, ignore_errors=True)
                shutil.rmtree(workdir / "labels.zarr", ignore_errors=True)
            if not args.skip_scaling:
                print(f"\nscaling on a {s_planes} x {s_size} x {s_size} stack...", flush=True)
                stack = workdir / "scaling.zarr"
                make_stack(stack, s_planes, s_size, seed=args.seed + 1000)
                warm = workdir / "warm.zarr"
                make_stack(warm, 2, 256, seed=args.seed + 2000)
                rows = run_scaling(stack, warm, workdir, args.workers, args.model, device)
                result["scaling"] = rows
                tables["scaling"] = table(rows, list(rows[0]), "dask LocalCluster scaling "
                                          "(1 thread per worker)")
                emit(tables["scaling"])
        result["noise"] = noise.summary()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["config"] = {"planes": planes, "size": size, "scaling_planes": s_planes,
                        "scaling_size": s_size, "workers": args.workers, "model": model,
                        "device": device, "threads_in_process": args.threads or "default"}
    result["tables"] = tables
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(out_path(args, "bench_lazy"), result)


if __name__ == "__main__":
    main()
