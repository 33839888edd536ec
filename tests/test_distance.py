"""The distance output: targets, training, resumable state, seeding, error classes."""

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

from _synthetic import sparse_annotation, touching_disks
from napari_unet.augment import AugmentConfig
from napari_unet.evaluate import evaluate_pair
from napari_unet.model import ModelConfig, UNet, load_model, save_model
from napari_unet.postprocess import PostprocessConfig, instances_from_probs, labels_from_probs
from napari_unet.segment import segment
from napari_unet.targets import distance_target
from napari_unet.train import Trainer, TrainingPair, train_config


def test_distance_target_is_one_at_each_cell_centre_and_low_where_cells_touch():
    cells = np.zeros((20, 40), np.int32)
    cells[2:13, 2:13] = 1
    cells[2:13, 13:24] = 2  # touches cell 1
    d = distance_target(cells)
    assert d[cells == 0].max() == 0
    for lab in (1, 2):
        assert d[cells == lab].max() == 1.0
    assert d[7, 7] == 1.0 and d[7, 18] == 1.0
    assert d[7, 12] < 0.3 and d[7, 13] < 0.3  # the shared edge


def test_distance_seeds_separate_cells_the_interior_class_merges():
    # Two touching disks whose interiors touch (no boundary class between them), as a blurry
    # model would predict them; the distance map still dips between their centres.
    labels = np.zeros((40, 70), np.int32)
    yy, xx = np.mgrid[:40, :70]
    labels[(yy - 20) ** 2 + (xx - 22) ** 2 < 144] = 1
    labels[((yy - 20) ** 2 + (xx - 43) ** 2 < 144) & (labels == 0)] = 2
    fg = labels > 0
    probs = np.stack([~fg, fg, np.zeros_like(fg)]).astype(np.float32)
    dist = distance_target(labels)[None]
    with_dist = instances_from_probs(np.concatenate([probs, dist]),
                                     PostprocessConfig(seeds="distance"))
    assert with_dist.max() == 2
    assert evaluate_pair(with_dist, labels)["ap"] == 1.0
    assert instances_from_probs(np.concatenate([probs, dist]),
                                PostprocessConfig(seeds="interior")).max() == 1
    # A model that also puts its boundary class where the cells meet: the mean of both
    # surfaces (the default for distance models) separates them too.
    rim = find_boundaries(labels, mode="inner") & fg
    probs = np.stack([~fg, fg & ~rim, rim]).astype(np.float32)
    mixed = instances_from_probs(np.concatenate([probs, dist]))
    assert evaluate_pair(mixed, labels)["ap"] == 1.0
    with pytest.raises(ValueError, match="distance output"):
        instances_from_probs(probs, PostprocessConfig(seeds="mix"))
    semantic = labels_from_probs(np.concatenate([probs, dist]), PostprocessConfig(mode="semantic"))
    assert set(np.unique(semantic)) == {0, 1, 2}  # the distance channel is no class


def test_model_with_distance_trains_saves_loads_and_segments(tmp_path):
    image, labels = touching_disks((192, 192), seed=1)
    ann = sparse_annotation(labels, n_cells=10, seed=1)
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=3, base_channels=8, distance=True))
    cfg = train_config(True, steps=150, lr=3e-3, batch_size=4, tile=96, device="cpu",
                       augment=AugmentConfig(elastic_alpha=4))
    trainer = Trainer(model, [TrainingPair(image, ann)], cfg)
    for _ in trainer.run():
        pass
    path = save_model(trainer.model, tmp_path / "d.safetensors")
    loaded = load_model(path)
    assert loaded.config.distance and loaded.config.n_outputs == 4
    test_image, test_labels = touching_disks((192, 192), seed=7)
    pred = segment(test_image, loaded, tile=96, overlap=32, device="cpu")
    assert evaluate_pair(pred, test_labels)["ap"] > 0.8


def test_resume_state_continues_the_same_run(tmp_path):
    image, labels = touching_disks((128, 128), seed=2)
    ann = sparse_annotation(labels, n_cells=6, seed=2)
    model = UNet(ModelConfig(depth=3, base_channels=8, distance=True))
    cfg = train_config(True, steps=8, tile=64, batch_size=2, device="cpu")
    first = Trainer(model, [TrainingPair(image, ann)], cfg)
    for p in first.run():
        if p.step == 4:
            break
    first.save_state(tmp_path / "state.pt")
    again = Trainer(model, [TrainingPair(image, ann)], cfg)
    again.load_state(tmp_path / "state.pt")
    assert again.step == 4 and len(again.losses) == 4
    for key, value in first.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key])
    steps = [p.step for p in again.run()]
    assert steps == [5, 6, 7, 8]


def test_old_model_files_without_distance_still_load_and_run(tmp_path):
    """Files written before the distance output existed have no such key in their config."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_model(UNet(ModelConfig(depth=3, base_channels=8)), tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    del config["distance"]
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta | {"config": json.dumps(config)})
    model = load_model(old)
    assert not model.config.distance and model.config.n_outputs == model.config.n_classes
    image, _ = touching_disks((96, 96), seed=3)
    assert segment(image, model, device="cpu").shape == image.shape


def test_error_classes_count_merges_splits_false_objects_and_misses():
    gt = np.zeros((40, 40), np.int32)
    gt[0:10, 0:10], gt[0:10, 10:20], gt[20:30, 0:10], gt[20:30, 20:30] = 1, 2, 3, 4
    pred = np.zeros_like(gt)
    pred[0:10, 0:20] = 1  # merges 1 and 2
    pred[20:30, 0:5], pred[20:30, 5:10] = 2, 3  # splits 3
    pred[35:40, 35:40] = 4  # false object; 4 is missed
    s = evaluate_pair(pred, gt)
    assert (s["merges"], s["splits"], s["false_objects"], s["misses"]) == (1, 1, 1, 1)
    assert np.isnan(evaluate_pair(pred * 0, gt)["area_ratio"])
    assert evaluate_pair(gt, gt)["area_ratio"] == 1.0
    assert evaluate_pair(np.where(gt == 4, 0, gt) + np.pad(gt == 4, ((0, 0), (1, 0)))[:, :-1] * 4,
                         gt)["area_ratio"] == 1.0
