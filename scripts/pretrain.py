"""Recipe for the bundled model: train a U-Net from scratch on ../shared/data.

    python scripts/pretrain.py --steps 4000 --out src/napari_unet/models/nuclei_cells_v1.safetensors

Training data: the training splits of dsb2018_nuclei (fluorescence, brightfield, H&E nuclei)
and isbi2012_em (EM cells separated by membranes). Held out entirely: gowt1_nuclei (an unseen
modality, used by the fine-tuning test), nih3t3_nuclei (its labels merge touching nuclei,
which would teach the model to merge them) and dsb_nuclei_demo (source of the sample data).
The split, settings and validation scores are written into the model file's provenance and
into a JSON card next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet.datasets import load_dataset, split
from napari_unet.evaluate import evaluate_many
from napari_unet.model import ModelConfig, UNet, save_model
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.targets import instances_to_annotation
from napari_unet.tiling import drain
from napari_unet.train import Trainer, TrainingPair, train_config

TRAIN_SETS = {"dsb2018_nuclei": 0.2, "isbi2012_em": 0.2}
EVAL_ONLY = ("gowt1_nuclei", "nih3t3_nuclei")


def evaluate(model: UNet, samples, device: str) -> tuple[list[dict], dict]:
    predictor = Predictor(model, InferenceConfig(device=device, tile=512, batch_size=4))
    pairs = [(s.name, drain(segment_image(s.image, predictor)), s.labels) for s in samples]
    return evaluate_many(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop early (keeping the model) after this much training time")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    train, val = [], {}
    for name, frac in TRAIN_SETS.items():
        tr, va = split(load_dataset(name, invert_bright=False), frac, seed=args.seed)
        train += tr
        val[name] = va
    for name in EVAL_ONLY:
        val[name] = load_dataset(name, invert_bright=False)
    pairs = [TrainingPair(s.image, instances_to_annotation(s.labels), name=s.name) for s in train]
    config = train_config(True, steps=args.steps, lr=args.lr, batch_size=args.batch,
                          tile=args.tile, device=args.device, cosine=True, seed=args.seed,
                          snapshot_every=100)
    model = UNet(ModelConfig(depth=args.depth, base_channels=args.base))
    trainer = Trainer(model, pairs, config)
    t0 = time.perf_counter()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else float("inf")
    for p in trainer.run(cancel=lambda: time.perf_counter() > deadline):
        if p.step % 100 == 0:
            print(f"step {p.step}/{p.total_steps} loss {p.loss_avg:.4f} "
                  f"{p.steps_per_s:.1f} steps/s", flush=True)
    train_time = time.perf_counter() - t0
    model = trainer.model

    scores = {}
    for name, samples in val.items():
        rows, mean = evaluate(model, samples, args.device)
        scores[name] = {"n_images": len(rows), "pixel_iou": round(mean["pixel_iou"], 4),
                        "ap50": round(mean["ap"], 4), "f1": round(mean["f1"], 4)}
        print(name, scores[name], flush=True)
    model.config.provenance = {
        "recipe": "scripts/pretrain.py",
        "trained_on": {n: [s.name for s in train if s.dataset == n] for n in TRAIN_SETS},
        "validation": {n: [s.name for s in v] for n, v in val.items()},
        "held_out_note": "gowt1_nuclei and nih3t3_nuclei unseen in training; "
                         "dsb_nuclei_demo unseen (sample data source)",
        "validation_scores": scores,
        "settings": vars(args) | {"out": str(args.out)},
        "train_seconds": round(train_time, 1),
        "steps_done": trainer.step,
        "final_loss": round(float(np.mean(trainer.losses[-100:])), 4),
        "device": str(trainer.device), "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "data": "../shared/data (see its README for sources and licences)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out, overwrite=True)
    card = args.out.with_suffix(".json")
    card.write_text(json.dumps(model.config.provenance | {"architecture": {
        "depth": args.depth, "base_channels": args.base, "classes": model.config.classes,
        "parameters": sum(p.numel() for p in model.parameters())}}, indent=2))
    print("wrote", args.out, card)


if __name__ == "__main__":
    main()
