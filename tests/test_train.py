import numpy as np
import pytest
import torch

from _synthetic import sparse_annotation, touching_disks
from napari_unet.augment import AugmentConfig
from napari_unet.model import ModelConfig, ModelFileError, UNet, load_model
from napari_unet.normalize import normalize
from napari_unet.segment import segment
from napari_unet.train import TrainConfig, Trainer, TrainingPair, train, train_config

# One torch thread: the trained fixture (and so the numbers asserted below) must not depend
# on how many cores the machine has.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_model():
    torch.manual_seed(0)
    return UNet(ModelConfig(depth=3, base_channels=8))


def _config(**kw):
    """From-scratch settings for the small test model."""
    base = dict(steps=120, lr=3e-3, batch_size=4, tile=96, device="cpu",
                augment=AugmentConfig(elastic_alpha=4))
    return train_config(True, **(base | kw))


def _ap(pred, gt):
    from napari_unet.evaluate import evaluate_pair

    return evaluate_pair(pred, gt)["ap"]


@pytest.fixture(scope="module")
def trained():
    image, labels = touching_disks((256, 256), seed=0)
    ann = sparse_annotation(labels, n_cells=12, seed=0)
    trainer = Trainer(_small_model(), [TrainingPair(image, ann)], _config())
    progress = list(trainer.run())
    return trainer, progress


def test_training_from_few_cells_separates_touching_cells(trained):
    trainer, progress = trained
    assert [p.step for p in progress] == list(range(1, 121))
    assert progress[-1].loss_avg < progress[0].loss
    image, labels = touching_disks((256, 256), seed=3)  # a new image
    pred = segment(image, trainer.model, tile=128, overlap=32, device="cpu")
    # Touching pairs come out as two instances, not one merged blob.
    assert abs(int(pred.max()) - int(labels.max())) <= 3
    assert _ap(pred, labels) > 0.8


def test_cancel_keeps_last_good_model_and_checkpoint(tmp_path):
    image, labels = touching_disks((128, 128))
    ann = sparse_annotation(labels, 4)
    ckpt = tmp_path / "ckpt.safetensors"
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, [TrainingPair(image, ann)],
                      _config(steps=50, snapshot_every=5, checkpoint_path=str(ckpt)))
    stop_at = 12
    steps = [p.step for p in trainer.run(cancel=lambda: trainer.step >= stop_at)]
    assert steps[-1] == stop_at
    # The caller's model is untouched; the trainer's model holds the trained weights...
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    trained_sd = trainer.model.state_dict()
    assert any(not torch.equal(trained_sd[k], before[k]) for k in before)
    # ...and so does the checkpoint on disk.
    on_disk = load_model(ckpt).state_dict()
    for k, v in trained_sd.items():
        torch.testing.assert_close(on_disk[k], v)


def test_divergence_keeps_last_good_model():
    image, labels = touching_disks((128, 128))
    trainer = Trainer(_small_model(), [TrainingPair(image, sparse_annotation(labels, 4))],
                      _config(steps=30, snapshot_every=5))
    real_step = trainer.train_step

    def step_then_nan():
        loss = real_step()
        if trainer.step >= 7:
            with torch.no_grad():
                for p in trainer.net.parameters():
                    p.fill_(float("nan"))
            return float("nan")
        return loss

    trainer.train_step = step_then_nan
    with pytest.raises(FloatingPointError, match="last good model"):
        for _ in trainer.run():
            pass
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values()
               if v.is_floating_point())
    assert trainer.step == 7


def test_bad_training_input():
    image, labels = touching_disks((64, 64))
    model = _small_model()
    only_bg = np.ones_like(labels)
    with pytest.raises(ValueError, match="no cells"):
        Trainer(model, [TrainingPair(image, only_bg)], _config())
    with pytest.raises(ValueError, match=r"shape \(64, 32\) does not match"):
        Trainer(model, [TrainingPair(image, labels[:, :32])], _config())
    with pytest.raises(ValueError, match="integer"):
        Trainer(model, [TrainingPair(image, labels.astype(float))], _config())
    with pytest.raises(ModelFileError, match="channel"):
        Trainer(model, [TrainingPair(np.stack([image] * 3), labels)], _config())
    with pytest.raises(ValueError, match="2D planes"):
        Trainer(model, [TrainingPair(image[None, None], labels)], _config())
    bad = image.astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Trainer(model, [TrainingPair(bad, sparse_annotation(labels, 2))], _config())


def test_train_wrapper_returns_model():
    image, labels = touching_disks((96, 96))
    gen = train(_small_model(), [TrainingPair(image, sparse_annotation(labels, 2))],
                _config(steps=3))
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            assert isinstance(stop.value, UNet)
            break


def test_from_scratch_settings_drop_what_a_new_model_lacks():
    assert TrainConfig().freeze_norm and TrainConfig().keep_prior > 0
    cfg = train_config(True, steps=5)
    assert not cfg.freeze_norm and cfg.keep_prior == 0 and cfg.steps == 5
    assert cfg.average == 1.0 and TrainConfig().average < 1.0  # no random init blended in
    assert train_config(False) == TrainConfig()


def test_keep_prior_holds_unannotated_pixels_near_the_starting_model(trained):
    """Fine-tuning on a patch of background only: without the prior term the model forgets
    the cells elsewhere in the image; with it, it stays close to where it started."""
    start = trained[0].model
    image, labels = touching_disks((256, 256), seed=0)
    ann = np.zeros(labels.shape, np.uint16)
    ann[:40, :40] = 1  # a corner of background ...
    k = labels[128, :].max() or 1
    ann[labels == k] = 2  # ... and one cell, as the trainer requires

    def drift(keep_prior: float) -> float:
        cfg = TrainConfig(steps=40, lr=3e-3, batch_size=4, tile=96, device="cpu",
                          freeze_norm=True, keep_prior=keep_prior,
                          augment=AugmentConfig(elastic_alpha=0))
        trainer = Trainer(start, [TrainingPair(image, ann)], cfg)
        for _ in trainer.run():
            pass
        x = torch.from_numpy(normalize(image[None], start.config.norm_percentiles))[None]
        with torch.no_grad():
            p0 = torch.softmax(start.eval()(x), 1)
            p1 = torch.softmax(trainer.model.eval()(x), 1)
        far = torch.from_numpy(ann == 0)
        return float((p1 - p0).abs().sum(1)[0][far].mean())

    free, held = drift(0.0), drift(1.0)
    assert held < 0.5 * free, (held, free)
