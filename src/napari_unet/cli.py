"""Command line: ``napari-unet segment | train | annotate-from-labels | evaluate | demo``.

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

from . import io, params
from .augment import AugmentConfig
from .device import select_device
from .distributed import BatchError, Job, StitchSettings, local_client, segment_batch
from .model import UNet, load_model, save_model
from .postprocess import PostprocessConfig
from .segment import InferenceConfig
from .stitch import METRICS
from .tiling import drive
from .train import TrainConfig, Trainer, pairs_from_arrays, train_config


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
                   help="axis of the input holding channels (default: the 'c' axis recorded "
                   "in OME-Zarr / OME-TIFF / ImageJ files, else none)")


def _inference_config(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig(tile=args.tile, overlap=args.overlap, batch_size=args.batch,
                           device=args.device, precision=args.precision)


def _postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    return PostprocessConfig(mode="semantic" if args.semantic else "instances",
                             min_size=args.min_size)


def _run_with_bar(gen, total: float, desc: str, unit: str = "plane"):
    """Drive a progress generator with a tqdm bar; returns the generator's value."""
    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:

        def show(p) -> None:
            done = p.fraction * total if hasattr(p, "fraction") else p.step
            bar.update(done - bar.n)

        value = drive(gen, show)
        bar.update(total - bar.n)
        return value


def _segment_jobs(args: argparse.Namespace) -> list[Job]:
    """Pair each input with its output: the -o path, a file in the -o folder, or the input's
    own OME-Zarr labels when -o is left out."""
    if args.output is None:
        return [Job(src, None, args.label_name) for src in args.inputs]
    if len(args.inputs) == 1:
        return [Job(args.inputs[0], args.output, args.label_name)]
    if args.output.suffix.lower() in (".zarr", *io.TIFF_SUFFIXES):
        raise SystemExit(f"several inputs need a folder as -o, not {args.output}")
    args.output.mkdir(parents=True, exist_ok=True)
    return [Job(src, args.output / f"{src.name.split('.')[0]}_labels.{args.format}",
                args.label_name) for src in args.inputs]


def _stitch_settings(args: argparse.Namespace) -> StitchSettings | None:
    if not args.stitch_3d:
        return None
    return StitchSettings(axis=args.stack_axis, threshold=args.stitch_threshold,
                          metric=args.stitch_metric,
                          split_ratio=args.stitch_split if args.stitch_split > 0 else None,
                          anisotropy=args.anisotropy)


def _segment_client(args: argparse.Namespace):
    """The dask client asked for on the command line, or None to work in this process."""
    if not (args.dask_scheduler or args.workers > 0):
        return None
    try:
        from distributed import Client
    except ImportError as exc:
        raise SystemExit("--workers and --dask-scheduler need dask.distributed: "
                         "pip install 'napari-unet[distributed]'") from exc
    return Client(args.dask_scheduler) if args.dask_scheduler else local_client(args.workers)


def cmd_segment(args: argparse.Namespace) -> int:
    jobs = _segment_jobs(args)
    client = _segment_client(args)
    gen = segment_batch(
        jobs, model_path=args.model, inference=_inference_config(args),
        postprocess=_postprocess_config(args),
        channel_axis="auto" if args.channel_axis is None else args.channel_axis,
        stitch=_stitch_settings(args), client=client, retries=args.retries,
        overwrite=args.overwrite,
    )
    try:
        # Planes are read, segmented and written one at a time (on the workers, if any):
        # memory stays bounded by a few planes however large the inputs.
        with tqdm(total=None, desc="segment", unit="plane", disable=None) as bar:

            def show(p) -> None:
                if bar.total != p.planes_total:
                    bar.total = p.planes_total
                bar.update(p.planes_done + p.plane_fraction - bar.n)
                if p.message:
                    bar.write(p.message)

            result = drive(gen, show)
        where = (f"{len(client.scheduler_info()['workers'])} dask worker(s)" if client
                 else f"{select_device(args.device)} in this process")
    except KeyboardInterrupt:
        gen.close()  # cancels the queued planes
        print("interrupted: finished planes are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except BatchError as exc:
        print(f"napari-unet segment: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    print(f"{result.planes_computed} plane(s) segmented, {result.planes_skipped} already done",
          end="")
    print(f"; {result.megapixels_per_s:.2f} megapixels/s on {where}"
          if result.planes_computed else "")
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
    prior = {} if args.keep_prior is None else {"keep_prior": args.keep_prior}
    config = train_config(
        args.from_scratch, steps=args.steps, lr=args.lr, batch_size=args.batch, tile=args.tile,
        augment=AugmentConfig(elastic_alpha=0 if args.no_elastic else args.elastic),
        device=args.device, seed=args.seed, **prior,
        **{k: getattr(args, k) for k in ("val_share", "validate_every", "edited_weight")},
    )
    trainer = Trainer(base, pairs, config)
    print(f"training on {len(pairs)} annotated plane(s), device {trainer.device}; "
          f"{trainer.validation_note}")
    try:
        model = _run_with_bar(trainer.run(), config.steps, "train", unit="step")
    except KeyboardInterrupt:
        print("interrupted: saving the last good model")
        model = trainer.selected
    if trainer.history:
        print(trainer.message)
    model.config.provenance = {
        "base_model": "scratch" if args.from_scratch else str(args.base_model or "bundled"),
        "images": [str(p) for p in args.images], "labels": [str(p) for p in args.labels],
        "steps": trainer.step, "final_loss": trainer.losses[-1] if trainer.losses else None,
        "date": time.strftime("%Y-%m-%d"),
        "validation": [vars(s) for s in trainer.history] or None,
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


def cmd_annotate_from_labels(args: argparse.Namespace) -> int:
    from .correct import labels_to_annotation, rectangles_to_mask

    labels = np.asarray(io.read_image(args.labels))
    base = None if args.add_to is None else np.asarray(io.read_image(args.add_to))
    region = rectangles_to_mask(labels.shape, args.rect) if args.rect else None
    plane = tuple(args.plane) if args.plane is not None else None
    ann, complete = labels_to_annotation(labels, region, plane=plane, base=base)
    io.write_labels(args.output, ann, overwrite=args.overwrite)
    if args.complete_out is not None:
        io.write_labels(args.complete_out, complete.astype(np.uint8), overwrite=args.overwrite)
    n = len(np.unique(ann[complete & (ann >= 2)]))
    print(f"wrote {args.output}: {n} cell(s), {int(complete.sum())} px fully annotated; "
          "correct it in napari, then: napari-unet train --labels " + str(args.output))
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

    p = sub.add_parser(
        "segment", help="segment TIFF/Zarr/OME-Zarr images into instance labels",
        description="Segment images plane by plane, in this process or on a dask cluster. "
        "An interrupted run resumes: run the same command again.")
    p.add_argument("inputs", nargs="+", type=Path, help="images (TIFF, PNG, Zarr, OME-Zarr)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="label file (.tif or .zarr), or a folder when several inputs; "
                   "default: into each OME-Zarr input as labels/<label-name>")
    p.add_argument("--format", choices=["tif", "zarr"], default="tif",
                   help="file type written into the -o folder for several inputs")
    p.add_argument("--label-name", default="segmentation",
                   help="name of the labels written into an OME-Zarr input")
    _add_inference_args(p)
    p.add_argument("--min-size", type=int, default=PostprocessConfig().min_size)
    p.add_argument("--semantic", action="store_true",
                   help="write classes (0 bg, 1 interior, 2 boundary) instead of instances")
    p.add_argument("--overwrite", action="store_true",
                   help="redo and replace existing outputs (default: skip complete outputs, "
                   "resume interrupted ones)")
    g = p.add_argument_group("parallel / distributed (needs the 'distributed' package)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=0,
                       help="segment on a new local dask cluster of N worker processes, one "
                       "plane at a time each (default 0: in this process)")
    where.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                       help="segment on a running dask.distributed cluster (e.g. "
                       "tcp://host:8786); workers need the inputs, outputs and model at the "
                       "same paths")
    g.add_argument("--retries", type=int, default=2, help="extra attempts for a failed plane")
    st = StitchSettings()
    g = p.add_argument_group("3D stitching")
    g.add_argument("--stitch-3d", action="store_true",
                   help="link per-plane instances into 3D objects along the stack axis")
    g.add_argument("--stack-axis", type=int, default=None,
                   help="input axis to stitch along (default: the 'z' axis recorded in the "
                   "file, else axis 0)")
    g.add_argument("--stitch-threshold", type=float, default=st.threshold,
                   help="minimum overlap of objects in neighbouring planes to link them")
    g.add_argument("--stitch-metric", choices=list(METRICS), default=st.metric,
                   help="overlap: intersection / smaller object; iou: intersection / union")
    g.add_argument("--stitch-split", type=float, default=st.split_ratio,
                   help="cut an object where its area dips below this fraction of its "
                   "largest area on both sides (0: never)")
    g.add_argument("--anisotropy", type=float, default=st.anisotropy,
                   help="voxel depth / pixel size, recorded with zarr output")
    p.set_defaults(func=cmd_segment)

    d = TrainConfig()
    p = sub.add_parser("train", help="fine-tune on sparse annotations")
    p.add_argument("--images", nargs="+", type=Path, required=True)
    p.add_argument("--labels", nargs="+", type=Path, required=True,
                   help="annotation files: 0 = not annotated, 1 = background, >= 2 = cells")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file .safetensors")
    p.add_argument("--base-model", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--from-scratch", action="store_true")
    p.add_argument("--keep-prior", type=float, default=None,
                   help="pull towards the starting model's predictions on unannotated pixels "
                   f"(default {d.keep_prior} when fine-tuning, 0 from scratch)")
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
    params.add_arguments(p, TrainConfig, only=("val_share", "validate_every", "edited_weight"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "annotate-from-labels", help="turn a segmentation into an annotation to correct",
        description="Labels (0 background, 1..N cells) -> annotation (0 not annotated, "
        "1 background, >= 2 cells) inside the whole image, one plane or rectangles.")
    p.add_argument("labels", type=Path, help="label image, e.g. the output of segment")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="annotation file (.tif or .zarr)")
    p.add_argument("--plane", type=int, nargs="+", default=None,
                   help="convert only this plane of a stack (indices of the leading axes)")
    p.add_argument("--rect", type=float, nargs=4, action="append", default=None,
                   metavar=("Y0", "X0", "Y1", "X1"),
                   help="convert only inside this rectangle (repeat for several); cells it "
                   "cuts are taken whole")
    p.add_argument("--add-to", type=Path, default=None,
                   help="an existing annotation: its painted pixels are kept")
    p.add_argument("--complete-out", type=Path, default=None,
                   help="also write the fully annotated region as a 0/1 mask")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_annotate_from_labels)

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
