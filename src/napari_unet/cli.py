"""Command line: ``napari-unet segment | train | annotate-from-labels | export | evaluate |
demo``.

Every command calls the same engine functions as the napari widgets.
"""

from __future__ import annotations

import os

# OpenMP's default wait policy spins at every barrier; when any other process or thread
# holds a core, each torch op then waits for a lost time slice: on a 2-core machine with one
# core busy, training fell to 0.54 steps/s against 12.9 with one thread, and inference to
# 0.26 MP/s (benchmarks/README.md). Passive waiting costs 0-25 % on a quiet machine, a price
# worth paying in a command on a shared desktop. libgomp reads it when torch loads, so it is
# set here, before the imports below load torch; a user's own setting wins. The library
# itself never sets it: importing napari_unet must not change its host (napari).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import io, params
from .annotation_file import complete_mask, edited_mask, read_sidecar
from .augment import AugmentConfig
from .batch import (
    BatchError,
    Job,
    SchedulerError,
    StitchSettings,
    connect_scheduler,
    local_client,
    segment_batch,
)
from .device import select_device
from .model import (
    ModelConfig,
    ModelFileError,
    UNet,
    bundled_model_path,
    check_model_output,
    inspect_model_file,
    is_package_path,
    load_model,
    save_model,
)
from .normalize import check_image_dtype, file_is_rgb, resolve_rgb
from .outputs import check_output, check_writable_folder
from .params import ConfigError, Spec
from .postprocess import PostprocessConfig, recommended
from .segment import InferenceConfig
from .stitch import METRICS
from .tiling import drive
from .train import TrainConfig, Trainer, pairs_from_arrays, train_config


def _ranged(kind: type, what: str, **spec: Any) -> Callable[[str], Any]:
    """argparse type for an option without a config dataclass, checked like a param()."""
    rule = Spec(help=what, **spec)

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            params.check_value("option", what, value, rule)
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not allowed: it must be {rule.describe()}") from None
        return value

    convert.__name__ = kind.__name__
    return convert


_RGB_HELP = ("how an image whose last axis holds 3 or 4 colour samples (RGB/RGBA) is read: "
             "gray = luma of R, G and B (0.299/0.587/0.114, as the bundled model's colour "
             "training images; alpha dropped), none = the last axis is X "
             "(default: refuse such an image with a message)")


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model file (.safetensors) or bioimage.io package (.zip or folder); "
                   "default: the bundled model")
    params.add_arguments(p, InferenceConfig, aliases={"batch_size": ["--batch"]})
    p.add_argument("--channel-axis", type=int, default=None,
                   help="axis of the input holding channels (default: the 'c' axis recorded "
                   "in OME-Zarr / OME-TIFF / ImageJ files, else none)")


def _inference_config(args: argparse.Namespace) -> InferenceConfig:
    return params.from_args(InferenceConfig, args)


def _postprocess_config(args: argparse.Namespace, model: ModelConfig | None) -> PostprocessConfig:
    """The options given, over the model's recommended thresholds, over the defaults."""
    given = {name: getattr(args, name) for name in params.specs(PostprocessConfig)
             if hasattr(args, name)}
    return recommended(model.postprocess if model is not None else None, **given,
                       mode="semantic" if args.semantic else "instances")


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
    own OME-Zarr labels when -o is left out. Checks where they go before any work."""
    suffixes = (".zarr", *io.TIFF_SUFFIXES)
    if args.output is None:
        for src in args.inputs:
            if src.is_dir():
                check_writable_folder(src, f"labels of {src}")
        return [Job(src, None, args.label_name) for src in args.inputs]
    if len(args.inputs) == 1 and not (args.output.is_dir()
                                      and args.output.suffix.lower() not in suffixes):
        # Existing outputs are resumed, skipped or replaced by the batch runner.
        check_output(args.output, suffixes=suffixes, what="label output")
        return [Job(args.inputs[0], args.output, args.label_name)]
    if args.output.suffix.lower() in suffixes:
        raise ValueError(f"several inputs need a folder as -o, not {args.output}")
    if not args.output.is_dir():
        check_writable_folder(args.output.parent if str(args.output.parent) else Path("."),
                              "output folder")
        try:
            args.output.mkdir()
        except OSError as exc:
            raise ValueError(f"cannot create the output folder {args.output}: "
                             f"{exc.strerror or exc}; choose another -o folder") from exc
    check_writable_folder(args.output, "label outputs")
    return [Job(src, args.output / f"{src.name.split('.')[0]}_labels.{args.format}",
                args.label_name) for src in args.inputs]


def _check_inputs(args: argparse.Namespace) -> None:
    """Open each input lazily and refuse the ones that cannot be segmented, before any work:
    pixel types that are not intensities, and colour images (unless --rgb says how)."""
    for src in args.inputs:
        image = io.read_image(src)
        check_image_dtype(image.dtype, f"image {src}")
        resolve_rgb(image, channel_axis=args.channel_axis, rgb=args.rgb,
                    photometric_rgb=file_is_rgb(src), name=str(src), option="--rgb {}")


def _stitch_settings(args: argparse.Namespace) -> StitchSettings | None:
    if not args.stitch_3d:
        return None
    return StitchSettings(axis=args.stack_axis, threshold=args.stitch_threshold,
                          metric=args.stitch_metric,
                          split_ratio=args.stitch_split if args.stitch_split > 0 else None)


def _segment_client(args: argparse.Namespace):
    """The dask client asked for on the command line, or None to work in this process."""
    if not (args.dask_scheduler or args.workers > 0):
        return None
    try:
        import distributed  # noqa: F401  (only to say how to install it)
    except ImportError as exc:
        raise SystemExit("--workers and --dask-scheduler need dask.distributed: "
                         "pip install 'napari-unet[distributed]'") from exc
    if args.dask_scheduler:
        return connect_scheduler(args.dask_scheduler)
    return local_client(args.workers)


def cmd_segment(args: argparse.Namespace) -> int:
    # Settings, outputs and inputs are checked before a cluster starts or a plane is read.
    package = args.model is not None and is_package_path(args.model)
    if package:
        from .bioimageio import napari_unet_config

        model = napari_unet_config(args.model)  # None: another tool's package
    else:
        model = inspect_model_file(args.model or bundled_model_path())
    inference, postprocess = _inference_config(args), _postprocess_config(args, model)
    _check_inputs(args)
    jobs = _segment_jobs(args)
    if args.measure is not None and args.measure.exists() and not args.overwrite:
        raise FileExistsError(f"{args.measure} exists; pass --overwrite or pick another name")
    if package and _is_foreign_package(args.model):
        code = _segment_foreign(args, jobs)
    else:
        code = _segment_napari_unet(args, jobs, inference, postprocess)
    if code == 0 and args.measure is not None:
        _measure_outputs(args, jobs)
    return code


def _is_foreign_package(path: Path) -> bool:
    """A bioimage.io package that another tool made (napari-unet's own load as a UNet)."""
    from .bioimageio import is_package, napari_unet_config

    return is_package(path) and napari_unet_config(path) is None


def _segment_foreign(args: argparse.Namespace, jobs: list[Job]) -> int:
    """Run another tool's 2D bioimage.io model plane by plane through bioimageio.core."""
    from .bioimageio import ForeignModel
    from .segment import label_key, offset_ids, output_shape, plane_indices, read_plane

    foreign = ForeignModel(args.model, device="cpu" if args.device == "auto" else args.device)
    print(f"{args.model.name}: bioimage.io model '{foreign.descr.name}' run by "
          f"bioimageio.core ({foreign.support.output_kind} output -> labels)")
    for job in jobs:
        if job.output is None:
            raise SystemExit("give -o for models run through bioimageio.core")
        image = io.read_image(job.source)
        axis = args.channel_axis
        labels = np.zeros(output_shape(image.shape, axis), np.int32)
        keys = list(plane_indices(image.shape, axis))
        offset = 0
        for key in tqdm(keys, desc=job.source.name, unit="plane", disable=None):
            plane = foreign.segment_plane(read_plane(image, key, axis))
            # The one id scheme of every entry point (consecutive, plane after plane).
            labels[label_key(key, axis)], offset = offset_ids(plane, offset)
        io.write_labels(job.output, labels, overwrite=args.overwrite)
    return 0


def _measure_outputs(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Per-object table of every output (a first column names the image) as one CSV."""
    from .measure import append_tables, measure, write_csv

    tables = []
    for job in jobs:
        out = job.output if job.output is not None else job.source / "labels" / job.label_name
        labels = io.read_image(out)
        image = io.read_image(job.source)
        axis = args.channel_axis
        if axis is None and image.ndim == labels.ndim + 1:
            axes = io.read_axes(job.source) or ""
            axis = axes.index("c") if "c" in axes else None
        if image.ndim != labels.ndim + (axis is not None):
            image = None  # e.g. RGB read without its channel axis: shapes only
        mode = "3d" if args.stitch_3d and labels.ndim >= 3 else "planes"
        tables.append((job.source.name, measure(labels, image, mode=mode, channel_axis=axis)))
    table = append_tables(tables)
    write_csv(table, args.measure, overwrite=args.overwrite)
    n = len(table.get("label", []))
    print(f"{n} object(s) measured into {args.measure}")


def _segment_napari_unet(args: argparse.Namespace, jobs: list[Job], inference: InferenceConfig,
                         postprocess: PostprocessConfig) -> int:
    try:
        client = _segment_client(args)
    except SchedulerError as exc:
        print(f"napari-unet segment: error: {exc}", file=sys.stderr)
        return 2
    gen = segment_batch(
        jobs, model_path=args.model, inference=inference, postprocess=postprocess,
        channel_axis="auto" if args.channel_axis is None else args.channel_axis,
        rgb=args.rgb, stitch=_stitch_settings(args), client=client, retries=args.retries,
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


def _training_pairs(args: argparse.Namespace) -> list:
    """Read every image with its annotation, the sidecar's channel axis and fully annotated
    planes and rectangles (saved by the Annotate widget) included."""
    pairs = []
    for img_path, lab_path in zip(args.images, args.labels, strict=True):
        image, labels = io.read_image(img_path), io.read_image(lab_path)
        info = read_sidecar(lab_path)
        channel_axis = args.channel_axis
        if channel_axis is None and info is not None:
            channel_axis = info.channel_axis
        complete = complete_mask(tuple(labels.shape), info)
        if complete is not None:
            print(f"{lab_path}: {int(complete.sum())} pixel(s) declared fully annotated in "
                  f"{info.path.name}")
        pairs += pairs_from_arrays(image, labels, channel_axis=channel_axis, complete=complete,
                                   edited=edited_mask(tuple(labels.shape), info),
                                   name=Path(img_path).name, rgb=args.rgb,
                                   rgb_option="--rgb {}", photometric_rgb=file_is_rgb(img_path))
    return pairs


def cmd_train(args: argparse.Namespace) -> int:
    if len(args.images) != len(args.labels):
        raise ValueError(f"give one label file per image: {len(args.images)} image(s), "
                         f"{len(args.labels)} label file(s)")
    # Everything that can be checked is checked before the first step: a typo in -o must
    # not cost the training.
    check_model_output(args.output, overwrite=args.overwrite)
    values = {k: getattr(args, k) for k in params.specs(TrainConfig) if hasattr(args, k)}
    augment = params.from_args(AugmentConfig, args)
    if args.no_elastic:
        augment.elastic_alpha = 0.0
    # The checkpoint is the output itself: a stopped, crashed or diverged run leaves the
    # last good model there.
    config = train_config(args.from_scratch, augment=augment,
                          checkpoint_path=str(args.output), **values)
    base = UNet() if args.from_scratch else load_model(args.base_model)
    pairs = _training_pairs(args)
    trainer = Trainer(base, pairs, config)
    provenance = {
        "base_model": "scratch" if args.from_scratch else str(args.base_model or "bundled"),
        "images": [str(p) for p in args.images], "labels": [str(p) for p in args.labels],
        "date": time.strftime("%Y-%m-%d"),
    }
    # Checkpoints written during training (the output itself) carry it too.
    trainer.model.config.provenance = provenance
    print(f"training on {len(pairs)} annotated plane(s), device {trainer.device}; "
          f"{trainer.validation_note}")
    try:
        model = _run_with_bar(trainer.run(), config.steps, "train", unit="step")
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}: {_where(trainer, args.output)}",
              file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # diverged; the message says where the model is
        print(f"napari-unet train: error: {exc}", file=sys.stderr)
        return 2
    if trainer.history:
        print(trainer.message)
    model.config.provenance = provenance | {
        "steps": trainer.step,
        "final_loss": trainer.losses[-1] if trainer.losses else None,
        "validation": [vars(s) for s in trainer.history] or None,
        "calibration": vars(trainer.calibration) if trainer.calibration else None,
    }
    save_model(model, args.output, overwrite=True)
    print(f"saved {args.output} after {trainer.step} steps")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bioimageio import export_model_iter, test_package

    test_image = None
    if args.test_image is not None:
        test_image = np.asarray(io.read_image(args.test_image))
    gen = export_model_iter(args.model, args.output, name=args.name, authors=args.author,
                            test_image=test_image, torchscript=not args.no_torchscript,
                            overwrite=args.overwrite)
    drive(gen, print)
    print(f"wrote {args.output}")
    if not args.no_test:
        summary = test_package(args.output)
        print(f"bioimageio.core package test: {summary.status}")
        if summary.status != "passed":
            print(summary.format(), file=sys.stderr)
            return 1
    return 0
def _where(trainer: Trainer, output: Path) -> str:
    if output.is_file():
        return f"the last good model (step {trainer.good_step}) is saved in {output}"
    return "no model was saved"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_many, format_table

    if len(args.pred) != len(args.gt):
        raise ValueError(f"{len(args.pred)} prediction(s) but {len(args.gt)} ground truth(s)")
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
    p.add_argument("--rgb", choices=["gray", "none"], default=None, help=_RGB_HELP)
    post = p.add_argument_group(
        "post-processing", "thresholds not given here come from the model file where it "
        "recommends some (fine-tuning with --calibrate tunes them on your held-out cells), "
        "else from the defaults below")
    params.add_arguments(post, PostprocessConfig, exclude=["mode"], unset_default=True)
    p.add_argument("--semantic", action="store_true",
                   help="write classes (0 bg, 1 interior, 2 boundary) instead of instances")
    p.add_argument("--measure", type=Path, default=None, metavar="OUT.csv",
                   help="also write a per-object table (area, centroid, bbox, intensity, "
                   "shape; volume with --stitch-3d) of every output as CSV")
    p.add_argument("--overwrite", action="store_true",
                   help="redo and replace existing outputs (default: skip complete outputs, "
                   "resume interrupted ones)")
    g = p.add_argument_group("parallel / distributed (needs the 'distributed' package)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_ranged(int, "--workers", min=0), default=0,
                       help="segment on a new local dask cluster of N worker processes, one "
                       "plane at a time each (default 0: in this process)")
    where.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                       help="segment on a running dask.distributed cluster (e.g. "
                       "tcp://host:8786); workers need the inputs, outputs and model at the "
                       "same paths")
    g.add_argument("--retries", type=_ranged(int, "--retries", min=0), default=2,
                   help="extra attempts for a failed plane")
    st = StitchSettings()
    g = p.add_argument_group("3D stitching")
    g.add_argument("--stitch-3d", action="store_true",
                   help="link per-plane instances into 3D objects along the stack axis")
    g.add_argument("--stack-axis", type=int, default=None,
                   help="input axis to stitch along (default: the 'z' axis recorded in the "
                   "file, else axis 0)")
    g.add_argument("--stitch-threshold", default=st.threshold,
                   type=_ranged(float, "--stitch-threshold", min=0, max=1, min_exclusive=True),
                   help="minimum overlap of objects in neighbouring planes to link them")
    g.add_argument("--stitch-metric", choices=list(METRICS), default=st.metric,
                   help="overlap: intersection / smaller object; iou: intersection / union")
    g.add_argument("--stitch-split", default=st.split_ratio,
                   type=_ranged(float, "--stitch-split", min=0, max=1),
                   help="cut an object where its area dips below this fraction of its "
                   "largest area on both sides (0: never)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("train", help="fine-tune on sparse annotations")
    p.add_argument("--images", nargs="+", type=Path, required=True)
    p.add_argument("--labels", nargs="+", type=Path, required=True,
                   help="annotation files: 0 = not annotated, 1 = background, >= 2 = cells; "
                   "fully annotated planes and rectangles saved next to them by the Annotate "
                   "widget (<stem>_annotation.json) are used")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file .safetensors")
    p.add_argument("--base-model", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a new model (then --keep-prior defaults to 0 and "
                   "--no-freeze-norm)")
    # Defaults stay with TrainConfig / train_config: some differ when training from scratch.
    params.add_arguments(p, TrainConfig, aliases={"batch_size": ["--batch"]},
                         exclude=["checkpoint_path"], unset_default=True)
    params.add_arguments(p, AugmentConfig, aliases={"elastic_alpha": ["--elastic"]})
    p.add_argument("--no-elastic", action="store_true", help="same as --elastic-alpha 0")
    p.add_argument("--channel-axis", type=int, default=None,
                   help="axis of the images holding channels (default: the one saved with the "
                   "annotation, else none)")
    p.add_argument("--rgb", choices=["gray", "none"], default=None, help=_RGB_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="write a model as a bioimage.io package (zip) and test it",
        description="Export a napari-unet model as a bioimage.io model package: "
        "pytorch_state_dict weights with the architecture, TorchScript, pre/post-processing, "
        "test tensors from a real image, cover, documentation, citations and provenance; "
        "then run the package's test with bioimageio.core.")
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="model file (.safetensors); default: the bundled model")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="package: a .zip file, or a folder for any other name")
    p.add_argument("--name", default=None, help="model name shown on bioimage.io")
    p.add_argument("--author", action="append", default=None,
                   help="author name (repeat for several)")
    p.add_argument("--test-image", type=Path, default=None,
                   help="image for the test input/output (default: the bundled sample)")
    p.add_argument("--no-torchscript", action="store_true",
                   help="pytorch_state_dict weights only")
    p.add_argument("--no-test", action="store_true", help="skip the bioimageio.core test")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--iou", default=0.5,
                   type=_ranged(float, "--iou", min=0, max=1, min_exclusive=True),
                   help="IoU at which a predicted object matches a true one")
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="fine-tune on the bundled sample and segment it")
    p.add_argument("--headless", action="store_true", help="never open a window")
    p.add_argument("--out", type=Path, default=Path("napari_unet_demo"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


# Errors caused by the input, the settings or the machine's state: shown as one line and
# exit code 2. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (ConfigError, ModelFileError, ValueError, FileNotFoundError, FileExistsError,
                PermissionError, NotADirectoryError, IsADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def _user_message(exc: BaseException, command: str) -> str | None:
    """The one-line message for a user error, or None for a bug."""
    if isinstance(exc, OSError) and (isinstance(exc, _USER_ERRORS) or exc.errno in _USER_ERRNOS):
        what = exc.strerror or str(exc)
        text = f"{exc.filename}: {what}" if exc.filename else what
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text += "; free some space and run the same command again" + (
                " (finished planes are kept)" if command == "segment" else "")
    elif isinstance(exc, _USER_ERRORS):
        text = str(exc)
    else:
        return None
    notes = getattr(exc, "__notes__", [])
    return " ".join(" ".join([text, *notes]).split())  # one line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` command."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (already printed, exit code 2) or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"napari-unet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_message(exc, args.command)
        if message is None:
            raise
        print(f"napari-unet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
