"""Training step rate at the default TrainConfig, the cost of augmentation, time to plateau.

Two Trainers fine-tune the bundled model on one GOWT1 image with a scripted sparse annotation
(10 cells + background rings/strokes): the default ``TrainConfig`` (elastic deformation on)
and the same with ``elastic_alpha=0``. Blocks of steps alternate between them; steps/s is the
median over blocks. ``augment_batch`` (default ``AugmentConfig``) and patch sampling are also
timed alone on the same batches. Targets: augmentation < 20% of the step time, measured
both as augment_batch alone / step and as the elastic on/off step-time difference.

The time to the accuracy plateau is read from bench_fewlabels' JSON (run it first): for each
fine-tuning curve (AP@0.5 at the checkpoints), the first checkpoint after which AP never
rises by more than ``--plateau-tol``; a curve still rising at its last checkpoint has not
shown its plateau within the budget.

    python benchmarks/bench_training.py [--quick | --smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    RESULTS_DIR,
    NoiseMonitor,
    base_parser,
    emit,
    fmt,
    machine_info,
    median,
    mode_of,
    out_path,
    pick,
    scripted_annotation,
    setup_torch,
    spread,
    sync,
    table,
    threading_probe,
    training_sample,
    write_json,
)

from napari_unet.augment import AugmentConfig, augment_batch
from napari_unet.model import load_model
from napari_unet.train import TrainConfig, Trainer, TrainingPair

NAME = "bench_training"
TARGET_AUGMENT_SHARE = 0.20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per configuration")
    p.add_argument("--steps-per-block", type=int, default=None)
    p.add_argument("--tile", type=int, default=None, help="TrainConfig.tile (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="TrainConfig.batch_size (4)")
    p.add_argument("--fewlabels-json", type=Path, default=RESULTS_DIR / "bench_fewlabels.json",
                   help="bench_fewlabels output to read the plateau time from")
    p.add_argument("--plateau-tol", type=float, default=0.01,
                   help="AP gain below which the curve counts as flat")
    p.add_argument("--no-threading-probe", action="store_true",
                   help="skip the CPU threading probe (child processes)")
    p.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(args: argparse.Namespace, augment: AugmentConfig) -> TrainConfig:
    base = TrainConfig()
    return dataclasses.replace(base, steps=10**6, augment=augment, device=args.device,
                               tile=args.tile or base.tile,
                               batch_size=args.batch_size or base.batch_size, seed=args.seed)


def step_rates(trainers: dict[str, Trainer], blocks: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each trainer, one value per block, blocks alternating."""
    for tr in trainers.values():
        for _ in range(2):
            tr.train_step()
    per_step: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(blocks):
        for name, tr in trainers.items():
            sync(tr.device)
            t = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            sync(tr.device)
            per_step[name].append((time.perf_counter() - t) / steps)
    return per_step


def time_parts(trainer: Trainer, reps: int) -> dict[str, float]:
    """Median seconds of patch sampling and of augment_batch alone (trainer's config)."""
    c = trainer.config
    sample, aug = [], []
    for _ in range(reps + 1):
        t = time.perf_counter()
        arrays = trainer.sampler.sample(c.batch_size)
        image, target, weight = (torch.from_numpy(a).to(trainer.device) for a in arrays)
        sync(trainer.device)
        sample.append(time.perf_counter() - t)
        t = time.perf_counter()
        augment_batch(image, target, weight, c.augment, c.tile, trainer.generator)
        sync(trainer.device)
        aug.append(time.perf_counter() - t)
    return {"sample_s": median(sample[1:]), "augment_s": median(aug[1:])}


def plateau(curve: list[tuple[float, float]], tol: float) -> tuple[float, bool]:
    """(time, reached): the first checkpoint after which AP rises by at most ``tol``.

    ``reached`` is False when that checkpoint is the last one (still rising, or flat only at
    the very end): the plateau is then at least that late.
    """
    aps = [ap for _, ap in curve]
    for i, (t, ap) in enumerate(curve):
        if max(aps[i:]) - ap <= tol:
            return t, i < len(curve) - 1
    return curve[-1][0], False


def plateau_rows(path: Path, tol: float) -> tuple[list[dict], dict[str, Any]]:
    """Plateau time of every fine-tuning curve in a bench_fewlabels JSON file.

    Each curve starts at the pretrained model's AP (0 s). ``gain`` is the best AP over the
    start; ``swing`` the largest AP change between consecutive checkpoints (how noisy the
    curve is: a plateau within ``tol`` means little when checkpoints swing by more).
    """
    if not path.is_file():
        return [], {"note": f"{path} not found: run bench_fewlabels.py first"}
    data = json.loads(path.read_text())
    rows = []
    for c in data.get("curves", []):
        if c["method"] != "fine-tune":
            continue
        pts = [(0.0, c["start_ap"])] + [(p["train_s"], p["ap"]) for p in c["points"]]
        t, reached = plateau(pts, tol)
        aps = [ap for _, ap in pts]
        rows.append({"dataset": c["dataset"], "k": c["k"], "plateau_s": fmt(t, 1),
                     "reached": reached, "ap_at_plateau": fmt(dict(pts)[t]),
                     "start_ap": fmt(aps[0]), "best_ap": fmt(max(aps)),
                     "gain": fmt(max(aps) - aps[0]),
                     "swing": fmt(max(abs(b - a) for a, b in zip(aps, aps[1:], strict=False))),
                     "budget_s": fmt(pts[-1][0], 1)})
    reached = [r["plateau_s"] for r in rows if r["reached"]]
    gained = [r["plateau_s"] for r in rows if r["gain"] > tol]
    info = {
        "source": str(path), "fewlabels_mode": data.get("mode"), "tolerance_ap": tol,
        "n_curves": len(rows), "n_reached": len(reached),
        "n_gain_over_start": len(gained),
        "median_plateau_s_all": fmt(median([r["plateau_s"] for r in rows]), 1) if rows else None,
        "median_plateau_s_with_gain": fmt(median(gained), 1) if gained else None,
        "median_swing": fmt(median([r["swing"] for r in rows]), 3) if rows else None,
    }
    return rows, info


def _pairs(seed: int) -> tuple[list[TrainingPair], str]:
    image, labels, source = training_sample(seed)
    ann = scripted_annotation(labels, 10, seed)
    return [TrainingPair(image, ann, name=source)], source


def probe_child(args: argparse.Namespace) -> None:
    """Child of the threading probe: default-config steps/s, as one JSON line."""
    setup_torch(args)
    pairs, _ = _pairs(args.seed)
    trainer = Trainer(load_model(), pairs, _config(args, AugmentConfig()))
    with NoiseMonitor() as noise:
        per_step = step_rates({"t": trainer}, 1, args.steps_per_block or 8)["t"]
    print(json.dumps({"rate": 1 / median(per_step), "threads": torch.get_num_threads(),
                      "noise": noise.summary()}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mode = mode_of(args)
    if args.probe_child:
        probe_child(args)
        return {}
    setup_torch(args)
    t_start = time.perf_counter()
    blocks = args.blocks or pick(mode, smoke=1, quick=3, normal=5)
    steps = args.steps_per_block or pick(mode, smoke=2, quick=4, normal=6)
    pairs, source = _pairs(args.seed)
    model = load_model()
    configs = {"default (elastic on)": _config(args, AugmentConfig()),
               "elastic off": _config(args, AugmentConfig(elastic_alpha=0))}
    with NoiseMonitor() as noise:
        trainers = {k: Trainer(model, pairs, c) for k, c in configs.items()}
        dev = next(iter(trainers.values())).device
        amp = next(iter(trainers.values())).amp
        print(f"{NAME}: mode={mode} device={dev} autocast={amp} threads="
              f"{torch.get_num_threads()} tile={configs['elastic off'].tile} "
              f"batch={configs['elastic off'].batch_size} data={source}", flush=True)
        per_step = step_rates(trainers, blocks, steps)
        parts = {k: time_parts(tr, pick(mode, smoke=3, normal=20)) for k, tr in trainers.items()}
    rows = []
    for k, v in per_step.items():
        s = median(v)
        rows.append({"config": k, "steps_per_s": fmt(1 / s), "step_ms": fmt(s * 1e3, 1),
                     "sample_ms": fmt(parts[k]["sample_s"] * 1e3, 1),
                     "augment_ms": fmt(parts[k]["augment_s"] * 1e3, 1),
                     "augment_share": fmt(parts[k]["augment_s"] / s),
                     "spread": fmt(spread(v), 2), "steps_timed": blocks * steps})
    on, off = (median(v) for v in per_step.values())
    aug_share = parts["default (elastic on)"]["augment_s"] / on
    elastic_share = (on - off) / on
    summary = {
        "steps_per_s": fmt(1 / on), "steps_per_s_no_elastic": fmt(1 / off),
        "augment_batch_ms": fmt(parts["default (elastic on)"]["augment_s"] * 1e3, 1),
        "augment_share": fmt(aug_share), "elastic_share": fmt(elastic_share),
        "target_share": TARGET_AUGMENT_SHARE,
        "met": bool(max(aug_share, elastic_share) < TARGET_AUGMENT_SHARE),
        "train_config": {k: v for k, v in dataclasses.asdict(configs["elastic off"]).items()
                         if k not in ("augment", "steps")},
        "augment_config": dataclasses.asdict(AugmentConfig()),
        "autocast": str(amp),
    }
    t_rate = table(rows, ["config", "steps_per_s", "step_ms", "sample_ms", "augment_ms",
                          "augment_share", "spread"],
                   f"training steps ({dev}, batch {configs['elastic off'].batch_size} x "
                   f"{configs['elastic off'].tile}^2, median of {blocks} blocks of {steps})")
    emit(t_rate)
    verdict = (f"augmentation share of the step: augment_batch alone {summary['augment_share']}, "
               f"elastic on vs off {summary['elastic_share']} (target < {TARGET_AUGMENT_SHARE}) "
               f"{'met' if summary['met'] else 'MISSED'}")
    emit(verdict)
    tables = {"steps": t_rate, "verdict": verdict}
    threads_rows: list[dict] = []
    if dev.type == "cpu" and not args.no_threading_probe and mode != "smoke":
        threads_rows = threading_probe(__file__, ["--steps-per-block", "8"], "steps_per_s")
        tables["threading"] = table(threads_rows, ["setting", "threads", "steps_per_s",
                                                   "other_cores"],
                                    "threading probe: default-config training steps/s in "
                                    "fresh processes (8 steps)")
        emit(tables["threading"])
    prow, pinfo = plateau_rows(args.fewlabels_json, args.plateau_tol)
    if prow:
        t_plat = table(prow, ["dataset", "k", "plateau_s", "reached", "start_ap",
                              "ap_at_plateau", "best_ap", "gain", "swing", "budget_s"],
                       f"time to the AP plateau when fine-tuning (from {pinfo['source']}, "
                       f"mode {pinfo['fewlabels_mode']}, AP gain <= {args.plateau_tol})")
        emit(t_plat)
        note = (f"plateau (first checkpoint after which AP rises <= {args.plateau_tol}; 0 s = "
                f"the pretrained start): median {pinfo['median_plateau_s_all']} s over "
                f"{pinfo['n_curves']} curves; {pinfo['n_gain_over_start']} curves beat the "
                f"pretrained AP by more than {args.plateau_tol} (median plateau of those "
                f"{pinfo['median_plateau_s_with_gain']} s); median checkpoint-to-checkpoint "
                f"swing {pinfo['median_swing']} AP")
        emit(note)
        tables["plateau"] = t_plat
        tables["plateau_note"] = note
    else:
        emit(pinfo["note"])
    payload = {
        "benchmark": NAME, "mode": mode, "machine": machine_info(dev), "noise": noise.summary(),
        "config": {"blocks": blocks, "steps_per_block": steps, "data": source,
                   "annotation": "scripted: 10 cells + background rings and strokes"},
        "rows": rows, "summary": summary, "threading": threads_rows, "plateau": prow,
        "plateau_summary": pinfo,
        "tables": tables, "wall_s": fmt(time.perf_counter() - t_start, 1),
    }
    write_json(out_path(args, NAME), payload)
    return payload


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
