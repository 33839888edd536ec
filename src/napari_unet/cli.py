"""Command line: ``napari-unet segment | train | evaluate | demo``.

Every command calls the same engine functions as the napari widgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import io
from .augment import AugmentConfig
from .model import UNet, load_model, save_model
from .postprocess import PostprocessConfig
from .segment import InferenceConfig, Predictor, output_shape, segment_image
from .train import TrainConfig, Trainer, pairs_from_arrays


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    d = InferenceConfig()
    p.add_argument("--model", type=Path, default=None,
                   help="model file (.safetensors); default: the bundled model")
    p.add_argument("--tile", type=int, default=d.tile, help="tile size in pixels")
    p.add_argument("--overlap", type=int, default=d.overlap, help="tile overlap in pixels")
    p.add_argument("--batch", type=int, default=d.batch_size, help="tiles per forward pass")
    p.add_argument("--device", default=d.device, help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channel-axis", type=int, default=None,
                   help="axis of the input holding channels (default: no channel axis)")


def _inference_config(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig(tile=args.tile, overlap=args.overlap, batch_size=args.batch,
                           device=args.device, precision=args.precision)


def _postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    return PostprocessConfig(mode="semantic" if args.semantic else "instances",
                             min_size=args.min_size)


def _run_with_bar(gen, total: float, desc: str, unit: str = "plane"):
    """Drive a progress generator with a tqdm bar; returns the generator's value."""
    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                bar.update(total - bar.n)
                return stop.value
            done = p.fraction * total if hasattr(p, "fraction") else p.step
            bar.update(done - bar.n)


def _output_path(out: Path, src: Path, many: bool) -> Path:
    if not many:
        return out
    stem = src.name.split(".")[0]
    return out / f"{stem}_labels.tif"


def cmd_segment(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    predictor = Predictor(model, _inference_config(args))
    post = _postprocess_config(args)
    many = len(args.inputs) > 1
    if many:
        args.output.mkdir(parents=True, exist_ok=True)
    for src in args.inputs:
        image = io.read_image(src)
        dst = _output_path(args.output, src, many)
        shape = output_shape(tuple(image.shape), args.channel_axis)
        if dst.suffix == ".zarr":
            # Written plane by plane: the labels of a huge stack never sit in memory.
            out = io.create_label_store(dst, shape, np.int32, overwrite=args.overwrite)
        else:
            if dst.exists() and not args.overwrite:
                raise FileExistsError(f"{dst} exists; pass --overwrite or pick another name")
            out = np.zeros(shape, np.int32)
        t0 = time.perf_counter()
        gen = segment_image(image, predictor, channel_axis=args.channel_axis,
                            postprocess=post, out=out)
        n_planes = int(np.prod(shape[:-2], dtype=np.int64))
        _run_with_bar(gen, n_planes, src.name)
        if dst.suffix != ".zarr":
            io.write_labels(dst, out, overwrite=args.overwrite)
        dt = time.perf_counter() - t0
        mpix = np.prod(shape, dtype=np.float64) / 1e6
        print(f"{src} -> {dst}: shape {shape}, {mpix / dt:.2f} megapixels/s on "
              f"{predictor.device}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if len(args.images) != len(args.labels):
        raise SystemExit(f"give one label file per image: {len(args.images)} image(s), "
                         f"{len(args.labels)} label file(s)")
    pairs = []
    for img_path, lab_path in zip(args.images, args.labels, strict=True):
        image, labels = io.read_image(img_path), io.read_image(lab_path)
        pairs += pairs_from_arrays(image, labels, channel_axis=args.channel_axis,
                                   name=Path(img_path).name)
    base = UNet() if args.from_scratch else load_model(args.base_model)
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite or pick another name")
    config = TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch, tile=args.tile,
        augment=AugmentConfig(elastic_alpha=0 if args.no_elastic else args.elastic),
        device=args.device, freeze_norm=not args.from_scratch, seed=args.seed,
    )
    trainer = Trainer(base, pairs, config)
    print(f"training on {len(pairs)} annotated plane(s), device {trainer.device}")
    try:
        model = _run_with_bar(trainer.run(), config.steps, "train", unit="step")
    except KeyboardInterrupt:
        print("interrupted: saving the last good model")
        model = trainer.model
    model.config.provenance = {
        "base_model": "scratch" if args.from_scratch else str(args.base_model or "bundled"),
        "images": [str(p) for p in args.images], "labels": [str(p) for p in args.labels],
        "steps": trainer.step, "final_loss": trainer.losses[-1] if trainer.losses else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    save_model(model, args.output, overwrite=args.overwrite)
    print(f"saved {args.output} after {trainer.step} steps")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_many, format_table

    if len(args.pred) != len(args.gt):
        raise SystemExit(f"{len(args.pred)} prediction(s) but {len(args.gt)} ground truth(s)")
    pairs = [(Path(p).name, np.asarray(io.read_image(p)), np.asarray(io.read_image(g)))
             for p, g in zip(args.pred, args.gt, strict=True)]
    rows, mean = evaluate_many(pairs, iou_threshold=args.iou)
    cols = ["name", "pixel_iou", "ap", "f1", "precision", "recall", "n_pred", "n_gt"]
    print(format_table([*rows, mean | {"name": "mean"}], cols))
    if args.json:
        args.json.write_text(json.dumps({"images": rows, "mean": mean}, indent=2,
                                         default=float))
    return 0


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.headless and _has_display():
        try:
            from ._widgets.demo import launch_demo
        except ImportError as exc:
            print(f"napari is not installed ({exc}); running the headless demo")
        else:
            launch_demo()
            return 0
    from .demo import run_headless_demo

    run_headless_demo(args.out, steps=args.steps, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-unet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment TIFF/Zarr images into instance labels")
    p.add_argument("inputs", nargs="+", type=Path, help="image files (TIFF, PNG, Zarr)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="label file (.tif or .zarr), or a folder when several inputs")
    _add_inference_args(p)
    p.add_argument("--min-size", type=int, default=PostprocessConfig().min_size)
    p.add_argument("--semantic", action="store_true",
                   help="write classes (0 bg, 1 interior, 2 boundary) instead of instances")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_segment)

    d = TrainConfig()
    p = sub.add_parser("train", help="fine-tune on sparse annotations")
    p.add_argument("--images", nargs="+", type=Path, required=True)
    p.add_argument("--labels", nargs="+", type=Path, required=True,
                   help="annotation files: 0 = not annotated, 1 = background, >= 2 = cells")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file .safetensors")
    p.add_argument("--base-model", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--from-scratch", action="store_true")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--tile", type=int, default=d.tile)
    p.add_argument("--elastic", type=float, default=d.augment.elastic_alpha,
                   help="elastic displacement strength in pixels")
    p.add_argument("--no-elastic", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--channel-axis", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="pixel IoU, instance AP@IoU and F1 against ground truth")
    p.add_argument("--pred", nargs="+", type=Path, required=True)
    p.add_argument("--gt", nargs="+", type=Path, required=True)
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="fine-tune on the bundled sample and segment it")
    p.add_argument("--headless", action="store_true", help="never open a window")
    p.add_argument("--out", type=Path, default=Path("napari_unet_demo"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"napari-unet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
