"""The headless demo: fine-tune the bundled model on the sample's sparse annotation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import io
from .evaluate import evaluate_pair
from .model import load_model, save_model
from .sample import SAMPLE_SOURCE, load_sample
from .segment import InferenceConfig, segment
from .train import TrainConfig, Trainer, TrainingPair


def run_headless_demo(out_dir: Path, steps: int = 150, device: str = "auto") -> dict:
    """Segment the sample before/after fine-tuning; write labels and model to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, annotation, truth = load_sample()
    n_cells = len(np.unique(annotation[annotation >= 2]))
    print(f"sample: {SAMPLE_SOURCE}\n  image {image.shape} {image.dtype}, "
          f"{n_cells} cells painted, {int((annotation == 1).sum())} background pixels")
    bundled = load_model()
    infer = InferenceConfig(device=device)
    before = segment(image, bundled, **vars(infer))
    s0 = evaluate_pair(before, truth)
    print(f"bundled model:    {int(before.max()):4d} cells, AP@0.5 {s0['ap']:.3f}, "
          f"pixel IoU {s0['pixel_iou']:.3f}")
    trainer = Trainer(bundled, [TrainingPair(image, annotation, name="sample")],
                      TrainConfig(steps=steps, device=device))
    t0 = time.perf_counter()
    for p in trainer.run():
        if p.step % 25 == 0 or p.step == steps:
            print(f"  step {p.step:4d}/{steps}  loss {p.loss_avg:.4f}  "
                  f"{p.steps_per_s:.1f} steps/s", flush=True)
    model = trainer.selected  # the best snapshot by validation, or the bundled model
    if trainer.history:
        print(f"  {trainer.message}")
    after = segment(image, model, **vars(infer))
    s1 = evaluate_pair(after, truth)
    print(f"fine-tuned ({time.perf_counter() - t0:.0f} s): {int(after.max()):4d} cells, "
          f"AP@0.5 {s1['ap']:.3f}, pixel IoU {s1['pixel_iou']:.3f}")
    labels_path = out_dir / "sample_labels.tif"
    model_path = out_dir / "sample_finetuned.safetensors"
    io.write_labels(labels_path, after, overwrite=True)
    save_model(model, model_path, overwrite=True)
    print(f"wrote {labels_path} and {model_path}")
    return {"before": s0, "after": s1, "labels": labels_path, "model": model_path}
