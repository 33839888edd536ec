"""Fine-tuning recipe knobs: which layers adapt, and the weight share handed back."""

import pytest
import torch

from _synthetic import sparse_annotation, touching_disks
from napari_unet.augment import AugmentConfig
from napari_unet.model import ModelConfig, UNet
from napari_unet.tiling import drain
from napari_unet.train import TrainConfig, Trainer, TrainingPair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(**kw):
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=3, base_channels=8))
    image, labels = touching_disks((128, 128), seed=0)
    cfg = TrainConfig(**({"steps": 6, "lr": 1e-2, "batch_size": 2, "tile": 64, "device": "cpu",
                          "val_share": 0.0, "augment": AugmentConfig(elastic_alpha=0)} | kw))
    trainer = Trainer(model, [TrainingPair(image, sparse_annotation(labels, 6))], cfg)
    return model, trainer, drain(trainer.run())


def _changed(a, b, prefix):
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if k.startswith(prefix) and sa[k].is_floating_point()
            and not torch.equal(sa[k], sb[k])]


def test_decoder_only_keeps_the_encoder():
    start, _, tuned = _run(adapt="decoder")
    assert not _changed(start, tuned, "down.")  # weights and BatchNorm statistics
    assert _changed(start, tuned, "up.") and _changed(start, tuned, "head.")


def test_average_hands_back_a_blend_of_start_and_fine_tuned_weights():
    start, trainer, tuned = _run(average=0.25)
    net = trainer.net.state_dict()
    for key, value in tuned.state_dict().items():
        if value.is_floating_point():
            expected = start.state_dict()[key] + 0.25 * (net[key].cpu() - start.state_dict()[key])
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="average"):
        TrainConfig(average=0.0)


@pytest.mark.parametrize(("blend_ap", "trained_ap", "keeps_blend"),
                         [(0.9, 0.6, True), (0.6, 0.9, True), (0.2, 0.9, False)])
def test_the_weights_as_trained_compete_only_where_the_blend_does_not_beat_the_start(
        monkeypatch, blend_ap, trained_ap, keeps_blend):
    from napari_unet.validation import ValidationScore, Validator

    box = {}

    def score(self, model, step):
        blended = model is box["trainer"].model
        ap = 0.2 if step == 0 else (blend_ap if blended else trained_ap)
        return ValidationScore(step, ap, 0.5, 0.01)

    monkeypatch.setattr(Validator, "score", score)
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=3, base_channels=8))
    image, labels = touching_disks((128, 128), seed=0)
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2, tile=64, device="cpu", validate_every=4,
                      augment=AugmentConfig(elastic_alpha=0))
    trainer = box["trainer"] = Trainer(model, [TrainingPair(image, sparse_annotation(labels, 8))],
                                       cfg)
    tuned = drain(trainer.run())
    assert trainer.best_score.ap == (blend_ap if keeps_blend else trained_ap)
    assert trainer.best_blended == keeps_blend
    expected = trainer.model if keeps_blend else trainer._trained
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, expected.state_dict()[key])
    assert ("blended half-way" in trainer.message) == keeps_blend
    # the weights as trained are scored (and their time counted) only when the blend ties
    assert trainer.history[-1].seconds == pytest.approx(0.01 if blend_ap > 0.2 else 0.02)
    assert (trainer._trained is None) == (blend_ap > 0.2)
