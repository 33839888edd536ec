#!/usr/bin/env bash
# One device call: pretrain model variants side by side on one GPU; results under $OUT.
#   mkdir -p .gpu/data && cp -r ../shared/data/{dsb2018_train,isbi2012_em,dsb2018_nuclei,gowt1_nuclei} .gpu/data/
#   (device tool) run: MINUTES=5 bash scripts/gpu_pretrain.sh "a --depth 4" "c --depth 4 --no-distance"
#   with carry [".gpu"]; each argument is "<name> <pretrain.py options>".
# Each variant comes back as <name>.tgz (model, JSON card, log) plus its resume state in
# <name>.state.part.* pieces (cat them back together) under the per-file size limit.
set -uo pipefail
MINUTES=${MINUTES:-6}
export NAPARI_UNET_DATA=$PWD/.gpu/data PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
WORK=/tmp/pretrain
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/gpu.txt"
for v in "$@"; do
    set -- $v; name=$1; shift
    mkdir -p "$WORK/$name"
    python scripts/pretrain.py --device cuda --max-minutes "$MINUTES" \
        --val dsb2018_nuclei gowt1_nuclei isbi2012_em \
        --out "$WORK/$name/model.safetensors" "$@" > "$WORK/$name/stdout.txt" 2>&1 &
done
wait
for d in "$WORK"/*/; do
    name=$(basename "$d")
    cp "$WORK/gpu.txt" "$d"
    tail -6 "$d/stdout.txt"
    [ -f "$d/model.state.pt" ] && split -b 15M "$d/model.state.pt" "$OUT/$name.state.part."
    tar czf "$OUT/$name.tgz" -C "$d" --exclude=model.state.pt .
done
ls -la "$OUT"
