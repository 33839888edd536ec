"""Pick post-processing settings by measurement on the shared *validation* sets.

    python scripts/tune_postprocess.py MODEL [MODEL ...] --cache /tmp/maps

Predicts each validation image once per model (maps cached as float16 .npy), then scores a
grid of PostprocessConfig settings: AP@0.5, merges, splits, false objects, misses and the
median area ratio per data set. Only validation sets are used (never training images).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shared_data import validation_sets

import napari_unet
from napari_unet.batch_plan import file_digest
from napari_unet.evaluate import evaluate_many
from napari_unet.model import load_model, save_model
from napari_unet.postprocess import PostprocessConfig, labels_from_probs
from napari_unet.segment import InferenceConfig, Predictor

SETS = ("dsb2018_nuclei", "gowt1_nuclei", "isbi2012_em")
CODE = hashlib.sha256(b"".join(
    (Path(napari_unet.__file__).parent / f).read_bytes()
    for f in ("segment.py", "rescale.py", "tiling.py", "normalize.py", "model.py"))
).hexdigest()[:8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/napari-unet-maps"))
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--grid", default="{}", help="JSON: setting -> list of values to try")
    ap.add_argument("--tta", action="store_true",
                    help="predict with flip averaging (InferenceConfig.tta); not recorded")
    ap.add_argument("--record", type=Path, default=None,
                    help="write the (single) model to this file with the scores of the "
                    "default settings as its provenance's validation_scores")
    args = ap.parse_args()
    sets = validation_sets(args.sets)
    grid = json.loads(args.grid)
    keys = list(grid)
    for path in args.models:
        model = load_model(path)
        predictor = Predictor(model, InferenceConfig(device="cpu", tta=args.tta))
        # Keyed by the file's content and the inference code: a retrained model under the
        # same name, or a change to how planes are predicted, never reuses stale maps.
        tag = f"{path.stem}-{file_digest(path)}-{CODE}" + ("-tta" if args.tta else "")
        maps = {}
        for name, samples in sets.items():
            for s in samples:
                f = args.cache / tag / name / f"{s.name}.npy"
                if not f.exists():
                    f.parent.mkdir(parents=True, exist_ok=True)
                    np.save(f, predictor.predict(s.image).astype(np.float16))
                maps[name, s.name] = np.load(f).astype(np.float32)
        for values in itertools.product(*(grid[k] for k in keys)):
            settings = dict(zip(keys, values, strict=True))
            if settings.get("seeds") == "distance" and not model.config.distance:
                continue
            post = PostprocessConfig(**settings)
            line = [tag, json.dumps(settings)]
            for name, samples in sets.items():
                _, m = evaluate_many((s.name, labels_from_probs(maps[name, s.name], post),
                                      s.labels) for s in samples)
                line.append(f"{name[:6]} AP {m['ap']:.3f} M{m['merges']} S{m['splits']} "
                            f"F{m['false_objects']} X{m['misses']} A{m['area_ratio']:.2f}")
            print(" | ".join(line), flush=True)
            if args.record is not None and not settings and not args.tta:
                record(model, args.record, {
                    name: evaluate_many((s.name, labels_from_probs(maps[name, s.name], post),
                                         s.labels) for s in samples)[1]
                    for name, samples in sets.items()})


def record(model, out: Path, means: dict[str, dict]) -> None:
    """Save ``model`` with these validation scores (default post-processing) recorded."""
    scores = {name: {k: (round(v, 4) if isinstance(v, float) else v)
                     for k, v in mean.items() if k != "name"} for name, mean in means.items()}
    prov = model.config.provenance
    prov["validation_scores"] = scores
    prov["validation_postprocess"] = asdict(PostprocessConfig())
    prov["validation"] = {name: prov.get("validation", {}).get(name) for name in scores}
    save_model(model, out, overwrite=True)
    print(f"wrote {out} with validation scores of {', '.join(scores)}")


if __name__ == "__main__":
    main()
