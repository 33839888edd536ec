"""Same-process A/B of inference against an earlier commit: did the engine get slower?

The package as of ``--baseline`` (a git ref) is extracted to a temporary folder under another
name and imported next to the working tree's; both run the same planes in turn
(round-robin), so load from other jobs on a shared machine hits both alike. Rows:
``Predictor.predict`` on one plane, and ``segment_image`` (with post-processing) on a stack.

    python benchmarks/ab_inference.py [--baseline REF] [--quick | --smoke] [--threads 1]
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    BENCH_DIR,
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

NAME = "ab_inference"
PACKAGE = "src/napari_unet"


def load_baseline(ref: str, into: Path) -> Any:
    """Import the package as of git ``ref`` as ``napari_unet_base`` (from ``into``)."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=BENCH_DIR,
                               capture_output=True, text=True, check=True).stdout.strip())
    dest = into / "napari_unet_base"
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, PACKAGE], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if not name.endswith(".py") or "/_widgets/" in name:
            continue
        blob = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=root, capture_output=True,
                              check=True).stdout
        (dest / Path(name).relative_to(PACKAGE)).write_bytes(blob)
    sys.path.insert(0, str(into))
    return importlib.import_module("napari_unet_base.segment")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--baseline", default=None,
                   help="git ref to compare against (default: the merge-base with main)")
    p.add_argument("--size", type=int, default=None, help="2D plane side (2048)")
    p.add_argument("--planes", type=int, default=None, help="stack planes (12)")
    p.add_argument("--stack-size", type=int, default=None, help="stack plane side (1024)")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    mode = mode_of(args)
    setup_torch(args)
    import numpy as np

    from napari_unet.model import load_model
    from napari_unet.segment import InferenceConfig, Predictor, segment_image
    from napari_unet.tiling import drain

    size = args.size or pick(mode, smoke=128, quick=1024, normal=2048)
    planes = args.planes or pick(mode, smoke=2, quick=4, normal=12)
    ssize = args.stack_size or pick(mode, smoke=128, quick=512, normal=1024)
    repeats = args.repeats or pick(mode, smoke=1, quick=3, normal=5)
    if args.baseline is None:
        args.baseline = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=BENCH_DIR,
                                       capture_output=True, text=True,
                                       check=True).stdout.strip()[:10]
    with tempfile.TemporaryDirectory() as tmp:
        base = load_baseline(args.baseline, Path(tmp))
        new = Predictor(load_model(), InferenceConfig(device=args.device))
        old_model = importlib.import_module("napari_unet_base.model").load_model()
        old = base.Predictor(old_model, base.InferenceConfig(device=args.device, tile=new.tile,
                                                         batch_size=new.batch_size))
        image = nuclei_plane(size, args.seed)
        stack = np.stack([nuclei_plane(ssize, args.seed + 1 + i) for i in range(planes)])
        fns = {
            "predict: baseline": lambda: old.predict(image),
            "predict: new": lambda: new.predict(image),
            "segment_image: baseline": lambda: base.drain(base.segment_image(stack, old)),
            "segment_image: new (pipelined)": lambda: drain(segment_image(stack, new)),
            "segment_image: new (serial, workers=0)":
                lambda: drain(segment_image(stack, new, workers=0)),
        }
        same = np.array_equal(drain(segment_image(stack[:2], new)),
                              base.drain(base.segment_image(stack[:2], old)))
        with NoiseMonitor() as noise:
            times = interleaved(fns, repeats, device=new.device)
    rows = []
    for k, t in times.items():
        what = k.split(":")[0]
        ref = median(times[f"{what}: baseline"])
        px = image.size if what == "predict" else stack.size
        rows.append({"row": k, "median_s": fmt(median(t)), "mp_s": fmt(px / 1e6 / median(t)),
                     "vs_baseline": fmt(ref / median(t), 3), "spread": fmt(spread(t), 2),
                     "n": len(t)})
    title = (f"A/B vs {args.baseline} on {new.device} ({__import__('torch').get_num_threads()}"
             f" threads): predict {size}², segment_image {planes}x{ssize}², medians of "
             f"{repeats} interleaved; labels identical to baseline: {same}")
    t = table(rows, ["row", "median_s", "mp_s", "vs_baseline", "spread", "n"], title)
    emit(t)
    payload = {"benchmark": NAME, "mode": mode, "machine": machine_info(new.device),
               "noise": noise.summary(),
               "config": {"baseline": args.baseline, "size": size, "planes": planes,
                          "stack_size": ssize, "repeats": repeats, "tile": new.tile,
                          "batch_size": new.batch_size},
               "rows": rows, "labels_identical": bool(same), "tables": {"ab": t},
               "wall_s": None}
    write_json(out_path(args, NAME), payload)
    return payload


if __name__ == "__main__":
    main()
