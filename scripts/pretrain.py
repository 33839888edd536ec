"""Recipe for the bundled model: train a U-Net from scratch on ../shared/data.

    python scripts/pretrain.py --out runs/v2/model.safetensors            # CPU, resumable
    python scripts/pretrain.py --device cuda --max-minutes 5 --out ...     # same, on a GPU

Training data: all of dsb2018_train (660 DSB 2018 stage-1 training images: fluorescence,
brightfield and H&E nuclei) and the training split of isbi2012_em (EM cells separated by
membranes). Validation sets, never trained on: dsb2018_nuclei (the 45 DSB stage-1 *test*
images), gowt1_nuclei (an unseen microscope and cell line), the held-out isbi2012_em slices,
and nih3t3_nuclei (its labels merge touching nuclei, so it is scored but not tuned on).
dsb_nuclei_demo is not used (it is the source of the sample data).

The run saves a resume state (``<out>.state.pt``: weights, optimiser, step) and appends to
``<out>.log`` every ``--checkpoint-every`` steps; running the same command again continues
where it stopped, on this machine or another. At the end the validation scores, the split,
the settings and the compute used go into the model file's provenance and a JSON card.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from shared_data import load_dataset, split

from napari_unet.evaluate import evaluate_many
from napari_unet.model import ModelConfig, UNet, load_model, save_model
from napari_unet.postprocess import PostprocessConfig
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.targets import instances_to_annotation
from napari_unet.tiling import drain
from napari_unet.train import Trainer, TrainingPair, train_config

# Data set -> (validation fraction, share of training patches).
TRAIN_SETS = {"dsb2018_train": (0.0, 0.85), "isbi2012_em": (0.2, 0.15)}
EVAL_ONLY = ("dsb2018_nuclei", "gowt1_nuclei", "nih3t3_nuclei")


def evaluate(model: UNet, samples, device: str, post: PostprocessConfig | None = None):
    """Per-image rows and the summary row of :func:`evaluate_many` on ``samples``."""
    predictor = Predictor(model, InferenceConfig(device=device, tile=256, batch_size=8))
    pairs = [(s.name, drain(segment_image(s.image, predictor, postprocess=post)), s.labels)
             for s in samples]
    return evaluate_many(pairs)


def load_splits(seed: int, score: list[str] | None = None) -> tuple[list, dict[str, list]]:
    """Training samples (with their shares of patches) and the validation sets to score."""
    train, val = [], {}
    for name, (frac, share) in TRAIN_SETS.items():
        samples = load_dataset(name, invert_bright=False)
        tr, va = split(samples, frac, seed=seed) if frac else (samples, [])
        train.append((name, tr, share))
        if va and (score is None or name in score):
            val[name] = va
    for name in EVAL_ONLY:
        if score is None or name in score:
            val[name] = load_dataset(name, invert_bright=False)
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--distance", action=argparse.BooleanOptionalAction, default=True,
                    help="extra output: per-cell normalised distance to the edge")
    ap.add_argument("--balance", type=float, default=0.5,
                    help="sample images by (annotated pixels) ** balance within a data set")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop (keeping the model and the resume state) after this long")
    ap.add_argument("--fit-schedule", action=argparse.BooleanOptionalAction, default=True,
                    help="with --max-minutes: after 300 steps, shorten --steps to what the "
                    "measured rate allows, so the cosine schedule ends inside the time")
    ap.add_argument("--val", nargs="+", default=None,
                    help="validation sets to score (default: all of them)")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this model file (same architecture) instead of random "
                    "weights: a second, warm-restarted schedule; its provenance is chained")
    ap.add_argument("--object-diameter", type=float, default=28.0,
                    help="ModelConfig.object_diameter of the model written (rescale.py; 28 px "
                    "was best for nuclei_cells_v2 on the validation sets)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out.with_suffix(".state.pt"), out.with_suffix(".log")

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    train, val = load_splits(args.seed, args.val)
    pairs = []
    for _name, samples, share in train:
        # Each data set gets its share of patches whatever its number of images.
        w = share / max(len(samples), 1)
        pairs += [TrainingPair(s.image, instances_to_annotation(s.labels), name=s.name,
                               sample_weight=w) for s in samples]
    config = train_config(True, steps=args.steps, lr=args.lr, batch_size=args.batch,
                          tile=args.tile, device=args.device, cosine=True, seed=args.seed,
                          snapshot_every=100, image_balance=args.balance)
    model = UNet(ModelConfig(depth=args.depth, base_channels=args.base, distance=args.distance))
    init_provenance = None
    if args.init is not None:
        start = load_model(args.init)
        if (start.config.depth, start.config.base_channels, start.config.distance) != (
                args.depth, args.base, args.distance):
            raise SystemExit(f"--init {args.init} has another architecture than asked for")
        model.load_state_dict(start.state_dict())
        init_provenance = start.config.provenance
    trainer = Trainer(model, pairs, config)
    previous_seconds = 0.0
    if state_path.exists():
        trainer.load_state(state_path)
        meta = json.loads(out.with_suffix(".progress.json").read_text())
        if meta["settings"] != _settings(args):
            raise SystemExit(f"{state_path} was made with other settings {meta['settings']}; "
                             "use another --out or delete it to start over")
        previous_seconds = meta["train_seconds"]
        # A schedule fitted to the first run's time budget keeps its length.
        config.steps = meta.get("scheduled_steps", config.steps)
        log(f"resumed at step {trainer.step} ({previous_seconds:.0f} s trained before)")
    else:
        log(f"start: {len(pairs)} training images, settings {_settings(args)}, "
            f"device {trainer.device}")
    t0 = time.perf_counter()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else float("inf")

    def checkpoint() -> None:
        trainer.save_state(state_path)
        out.with_suffix(".progress.json").write_text(json.dumps({
            "settings": _settings(args), "step": trainer.step, "scheduled_steps": config.steps,
            "train_seconds": previous_seconds + time.perf_counter() - t0}))

    fitted = not (args.max_minutes and args.fit_schedule) or trainer.step > 0
    for p in trainer.run(cancel=lambda: time.perf_counter() > deadline):
        if not fitted and p.step == 300:
            fitted = True
            fits = p.step + int(0.97 * p.steps_per_s * (deadline - time.perf_counter()))
            if fits < config.steps:
                # The schedule reads config.steps every step: it now ends inside the time.
                config.steps = fits
                log(f"at {p.steps_per_s:.1f} steps/s the time allows {fits} steps; "
                    "the cosine schedule now ends there")
        if p.step % 100 == 0:
            log(f"step {p.step}/{p.total_steps} loss {p.loss_avg:.4f} "
                f"{p.steps_per_s:.1f} steps/s")
        if p.step % args.checkpoint_every == 0:
            checkpoint()
    checkpoint()
    train_seconds = previous_seconds + time.perf_counter() - t0
    model = trainer.model
    # Set only now: pretraining sees every image at its own size (an untrained model
    # cannot measure objects), the finished model shrinks planes of larger ones.
    model.config.object_diameter = args.object_diameter
    log(f"stopped at step {trainer.step}/{args.steps} after {train_seconds:.0f} s of training")

    scores = {}
    for name, samples in val.items():
        _, mean = evaluate(model, samples, args.device)
        scores[name] = {k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in mean.items() if k != "name"}
        log(f"validation {name}: AP@0.5 {mean['ap']:.3f} pixel IoU {mean['pixel_iou']:.3f} "
            f"merges {mean['merges']} splits {mean['splits']} false {mean['false_objects']} "
            f"misses {mean['misses']} area ratio {mean['area_ratio']:.3f}")
    model.config.provenance = {
        "recipe": "scripts/pretrain.py",
        "trained_on": {name: [s.name for s in samples] for name, samples, _ in train},
        "validation": {n: [s.name for s in v] for n, v in val.items()},
        "held_out_note": "validation sets never trained on: dsb2018_nuclei (DSB 2018 stage-1 "
                         "test), gowt1_nuclei, nih3t3_nuclei and the held-out isbi2012_em "
                         "slices; dsb_nuclei_demo unused (sample data source)",
        "validation_scores": scores,
        "settings": _settings(args),
        "initialised_from": init_provenance and {
            k: init_provenance.get(k) for k in ("settings", "train_seconds", "steps_done",
                                                "device", "initialised_from")},
        "total_train_seconds": round(train_seconds + _chain_seconds(init_provenance), 1),
        "train_seconds": round(train_seconds, 1),
        "steps_done": trainer.step,
        "final_loss": round(float(np.mean(trainer.losses[-100:])), 4),
        "device": _device_name(trainer.device), "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "log": log_path.name,
        "data": "../shared/data (see its README for sources and licences)",
    }
    save_model(model, out, overwrite=True)
    out.with_suffix(".json").write_text(json.dumps(model.config.provenance | {"architecture": {
        "depth": args.depth, "base_channels": args.base, "distance": args.distance,
        "classes": model.config.classes,
        "parameters": sum(p.numel() for p in model.parameters())}}, indent=2))
    log(f"wrote {out}")


def _settings(args: argparse.Namespace) -> dict:
    keep = ("steps", "batch", "tile", "lr", "depth", "base", "distance", "balance", "seed")
    return {k: getattr(args, k) for k in keep} | {"init": args.init and args.init.name}


def _chain_seconds(provenance: dict | None) -> float:
    """Training seconds of the runs a model was initialised from, all the way back."""
    total = 0.0
    while provenance:
        total += provenance.get("train_seconds") or 0.0
        provenance = provenance.get("initialised_from")
    return total


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    main()
