"""End to end on real data: fine-tuning on <= 20 painted cells beats the bundled model alone.

NIH3T3 Hoechst nuclei were never seen by the bundled model (see its provenance), and their
ground truth follows its own convention (touching nuclei merged). One image is sparsely
annotated the way a user would (15 nuclei + background around them and a few strokes);
AP@0.5 is measured on six other images of the set.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.evaluate import evaluate_many
from napari_unet.model import bundled_model_path, load_model
from napari_unet.segment import InferenceConfig, Predictor, segment_image
from napari_unet.tiling import drain
from napari_unet.train import TrainConfig, Trainer, TrainingPair

pytestmark = pytest.mark.slow
DATASET = "nih3t3_nuclei"
N_EVAL = 6
N_CELLS = 15


def paint_sparse(labels: np.ndarray, n_cells: int, seed: int = 0) -> np.ndarray:
    """What a user paints: some nuclei, a background ring around them, a few strokes."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.unique(labels[labels > 0]))[:n_cells]
    ann = np.zeros(labels.shape, np.uint16)
    for k, lab in enumerate(ids):
        ann[labels == lab] = k + 2
    bg = labels == 0
    ann[ndi.binary_dilation(ann >= 2, iterations=5) & bg] = 1
    far = ~ndi.binary_dilation(labels > 0, iterations=5)
    for y in range(32, labels.shape[0], 128):
        ann[y : y + 5][far[y : y + 5]] = 1
    return ann


def _mean_ap(model, samples):
    predictor = Predictor(model, InferenceConfig(device="cpu"))
    pairs = [(s.name, drain(segment_image(s.image, predictor)), s.labels) for s in samples]
    return evaluate_many(pairs)[1]


def test_finetuning_on_few_cells_improves_ap(shared_data):
    from shared_data import load_dataset

    if not bundled_model_path().exists():
        pytest.skip("bundled model not built")
    samples = load_dataset(DATASET, shared_data)
    train, test = samples[0], samples[1 : 1 + N_EVAL]
    ann = paint_sparse(train.labels, N_CELLS)
    assert len(np.unique(ann[ann >= 2])) <= 20
    bundled = load_model()
    # At their native size NIH3T3 nuclei are ~3x wider than the bundled model's and come
    # out split: the systematic error a few painted cells should fix. (With the plane shrunk
    # to the model's object size, rescale.py, the bundled model no longer makes it.)
    bundled.config.object_diameter = None
    trainer = Trainer(bundled, [TrainingPair(train.image, ann, name=train.name)],
                      # No hold-out: this measures the recipe on all 15 cells.
                      TrainConfig(steps=300, device="cpu", seed=0, val_share=0.0))
    for _ in trainer.run():
        pass
    before = _mean_ap(bundled, test)
    after = _mean_ap(trainer.model, test)
    print(f"\n{DATASET}: bundled AP@0.5 {before['ap']:.3f} pixel IoU {before['pixel_iou']:.3f}"
          f" -> fine-tuned AP@0.5 {after['ap']:.3f} pixel IoU {after['pixel_iou']:.3f}")
    assert after["ap"] > before["ap"] + 0.03
