"""Quality parity of the two instance post-processings on the shared validation sets.

    python scripts/postprocess_parity.py [--cache /tmp/napari-unet-parity] [--sets ...]

Predicts each validation image once with the bundled model on the CPU (maps cached per model
hash as .npy), then runs the scikit-image reference (``postprocess.instances_from_probs``)
and the torch one (``postprocess_torch``, on the CPU here) on the same maps: AP@0.5 and the
median area ratio per data set (``napari_unet.evaluate``), the AP@0.9 of one path against
the other, and the seconds per megapixel of each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from shared_data import validation_sets

from napari_unet.evaluate import evaluate_many, match_instances
from napari_unet.model import bundled_model_path, load_model
from napari_unet.postprocess import PostprocessConfig, instances_from_probs
from napari_unet.segment import InferenceConfig, Predictor

SETS = ("dsb2018_nuclei", "gowt1_nuclei", "isbi2012_em", "nih3t3_nuclei")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/napari-unet-parity"))
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--cache-only", action="store_true", help="only predict the maps")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args()
    path = bundled_model_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    model = load_model(path)
    predictor = None
    post = PostprocessConfig()
    rows = []
    for name, samples in validation_sets(args.sets).items():
        preds = {"skimage": [], "torch": []}
        secs = {"skimage": 0.0, "torch": 0.0}
        mpix, agree, identical = 0.0, [], 0
        for s in samples:
            f = args.cache / digest / name / f"{s.name}.npy"
            if not f.exists():
                predictor = predictor or Predictor(model, InferenceConfig(device="cpu"))
                f.parent.mkdir(parents=True, exist_ok=True)
                np.save(f, predictor.predict(s.image))
                print(f"cached {name}/{s.name}", flush=True)
            if args.cache_only:
                continue
            from napari_unet.postprocess_torch import instances_from_probs_torch

            maps = np.load(f)
            mpix += maps[0].size / 1e6
            t = time.perf_counter()
            ref = instances_from_probs(maps, post)
            secs["skimage"] += time.perf_counter() - t
            t = time.perf_counter()
            got = instances_from_probs_torch(torch.from_numpy(maps), post)
            secs["torch"] += time.perf_counter() - t
            preds["skimage"].append((s.name, ref, s.labels))
            preds["torch"].append((s.name, got, s.labels))
            agree.append(match_instances(got, ref, 0.9)["ap"] if ref.max() or got.max()
                         else 1.0)
            identical += bool(np.array_equal(got, ref))
        if args.cache_only:
            continue
        row = {"set": name, "images": len(samples)}
        for k, triples in preds.items():
            m = evaluate_many(triples)[1]
            row[f"ap_{k}"] = round(m["ap"], 4)
            row[f"area_ratio_{k}"] = round(m["area_ratio"], 4)
            row[f"s_per_mpix_{k}"] = round(secs[k] / mpix, 3)
        row["delta_ap"] = round(row["ap_torch"] - row["ap_skimage"], 4)
        row["ap90_torch_vs_skimage_mean"] = round(float(np.mean(agree)), 4)
        row["identical_label_images"] = identical
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None and rows:
        args.out.write_text(json.dumps({
            "model_sha256_12": digest, "rows": rows, "torch_threads": torch.get_num_threads(),
            "note": "both paths on the CPU of a shared 2-core machine (timings noisy); the "
                    "torch path is meant for GPUs, the CPU keeps scikit-image"}, indent=1))


if __name__ == "__main__":
    main()
