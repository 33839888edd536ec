#!/usr/bin/env bash
# Issue 14's GPU check: one command for a CUDA machine, < 150 s wall on an H100/H200.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # writes $OUT/bench_gpu.json
#   bash benchmarks/gpu_check.sh --smoke --device cpu   # what the CPU test runs
#
# Needs torch (CUDA), numpy, scipy, scikit-image, tifffile, safetensors; not napari, zarr or
# dask. MONAI rows run only if `monai` is importable (e.g. already on PYTHONPATH); nothing is
# installed here. Extra arguments go to benchmarks/bench_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python - <<'PY'
import importlib.util, sys
import torch
missing = [m for m in ("numpy", "scipy", "skimage", "tifffile", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages: {missing}")
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
print("gpu_check: monai", "found" if importlib.util.find_spec("monai") else
      "not found: MONAI rows will be skipped")
PY
# The time guard inside stops starting new sections after ~110 s; the outer limit is a
# backstop so the command always returns.
timeout 170 python benchmarks/bench_gpu.py --device "${DEVICE:-auto}" --out "$OUT/bench_gpu.json" "$@"
