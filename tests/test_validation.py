"""Validation while training: hold-out, scoring, best-snapshot selection, the last sentence."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from _synthetic import sparse_annotation, touching_disks
from napari_unet.augment import AugmentConfig
from napari_unet.model import ModelConfig, UNet
from napari_unet.targets import FIRST_CELL
from napari_unet.tiling import drain
from napari_unet.train import Trainer, TrainingPair, train_config
from napari_unet.validation import (
    MIN_CALIBRATION_CELLS,
    MIN_TIE_CELLS,
    ValidationScore,
    Validator,
    _objects_on,
    split_validation,
    summary,
)


def _small_model():
    torch.manual_seed(0)
    return UNet(ModelConfig(depth=3, base_channels=8))


def _config(**kw):
    base = dict(steps=20, lr=3e-3, batch_size=2, tile=64, device="cpu",
                augment=AugmentConfig(elastic_alpha=0), val_share=0.25, validate_every=5)
    return train_config(True, **(base | kw))


def _pair(n_cells=12, seed=0):
    image, labels = touching_disks((160, 160), seed=seed)
    return TrainingPair(image, sparse_annotation(labels, n_cells, seed)), labels


def test_split_holds_out_a_share_of_cells_with_their_background():
    pair, _ = _pair(12)
    cells = np.unique(pair.annotation[pair.annotation >= FIRST_CELL])
    train, held, note = split_validation([pair], 0.25, seed=0)
    assert "3 of 12" in note
    (i, mask), = held
    ann = train[0].annotation
    left = np.unique(ann[ann >= FIRST_CELL])
    assert len(left) == 9 and set(left) < set(cells)
    assert (ann[mask] == 0).all()  # held-out pixels are not trained on
    gone = np.isin(pair.annotation, np.setdiff1d(cells, left))
    assert mask[gone].all()
    assert (pair.annotation[mask] == 1).any()  # with their painted background
    assert pair.annotation.max() >= FIRST_CELL and (pair.annotation[gone] >= 2).all()  # pure


def test_split_holds_out_two_of_five_cells():
    pair, _ = _pair(5)
    train, held, note = split_validation([pair], 0.25)
    assert len(held) == 1 and "holding out 2 of 5" in note
    left = np.unique(train[0].annotation)
    assert len(left[left >= FIRST_CELL]) == 3


def test_split_off_with_too_few_cells_and_marked_regions_win():
    pair, _ = _pair(4)
    train, held, note = split_validation([pair], 0.25)
    assert held == [] and train[0] is pair and "too few" in note and "at least 5" in note
    region = np.zeros(pair.annotation.shape, bool)
    region[:60] = True
    marked = TrainingPair(pair.image, pair.annotation, validation=region)
    train, held, note = split_validation([marked], 0.25)
    assert "marked validation regions" in note
    assert not (train[0].annotation[:60] > 0).any()
    with pytest.raises(ValueError, match="no painted cell"):
        split_validation([TrainingPair(pair.image, pair.annotation,
                                       validation=np.zeros_like(region))], 0.25)


def test_objects_on_keeps_objects_mostly_on_held_out_pixels():
    pred = np.zeros((10, 10), np.int32)
    pred[0:4, 0:4] = 1
    pred[6:10, 6:10] = 2
    valid = np.zeros((10, 10), bool)
    valid[0:4, 0:3] = True  # 3/4 of object 1, none of object 2
    assert np.unique(_objects_on(pred, valid)).tolist() == [0, 1]


def test_validator_scores_ground_truth_like_predictions():
    """An untrained model finds nothing: AP 0; the score is in [0, 1] and costs little."""
    pair, _ = _pair(12)
    train, held, _ = split_validation([pair], 0.25)
    v = Validator.from_pairs([pair], held, (1.0, 99.8))
    assert v.n_cells == 3 and v.crops
    s = v.score(_small_model(), 0)
    assert 0 <= s.ap <= 1 and 0 <= s.pixel_iou <= 1 and s.seconds < 30


def _scripted(monkeypatch, aps):
    """Validator.score returns the given AP per step and records the weights it saw."""
    seen = {}

    def score(self, model, step):
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return ValidationScore(step, aps[step], 0.5, 0.0)

    monkeypatch.setattr(Validator, "score", score)
    return seen


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_keeps_the_best_snapshot(monkeypatch):
    seen = _scripted(monkeypatch, {0: 0.5, 5: 0.4, 10: 0.7, 15: 0.6, 20: 0.65})
    pair, _ = _pair(12)
    trainer = Trainer(_small_model(), [pair], _config())
    gen = trainer.run()
    progress = []
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        model = stop.value
    assert [s.step for s in trainer.history] == [0, 5, 10, 15, 20]
    assert _same(model, seen[10]) and not _same(model, seen[20])
    assert progress[9].validation.ap == 0.7 and progress[8].validation is None
    assert all(p.reference.ap == 0.5 for p in progress)
    assert progress[-1].best_step == 10
    assert progress[-1].message == trainer.message == (
        "validation AP 0.50 → 0.70 (+0.20) on 3 held-out cell(s); keeping step 10")


def test_a_later_snapshot_wins_a_tie_but_never_against_the_start(monkeypatch):
    seen = _scripted(monkeypatch, {0: 0.5, 5: 0.7, 10: 0.6, 15: 0.7, 20: 0.65})
    pair, _ = _pair(12)
    trainer = Trainer(_small_model(), [pair], _config())
    model = drain(trainer.run())
    assert trainer.best_score.step == 15 and _same(model, seen[15])
    assert trainer.message.endswith("keeping step 15")
    _scripted(monkeypatch, {0: 0.7, 5: 0.7, 10: 0.6, 15: 0.7, 20: 0.65})
    start = _small_model()
    state = {k: v.clone() for k, v in start.state_dict().items()}
    trainer = Trainer(start, [pair], _config())
    assert _same(drain(trainer.run()), state) and trainer.best_score.step == 0


def test_returns_the_starting_model_when_nothing_beats_it(monkeypatch, tmp_path):
    _scripted(monkeypatch, {0: 0.6, 5: 0.4, 10: 0.5, 15: 0.55, 20: 0.3})
    pair, _ = _pair(12)
    start = _small_model()
    state = {k: v.clone() for k, v in start.state_dict().items()}
    ckpt = tmp_path / "ckpt.safetensors"
    trainer = Trainer(start, [pair], _config(checkpoint_path=str(ckpt), checkpoint_every=5))
    model = drain(trainer.run())
    assert _same(model, state)
    assert trainer.message == ("validation AP 0.60 → 0.55 at best (step 15) on 3 held-out "
                               "cell(s): fine-tuning did not beat the starting model; keeping "
                               "the starting model")
    from napari_unet.model import load_model

    assert _same(load_model(ckpt), state)  # the checkpoint holds the selected model too


def test_stopping_between_scores_scores_the_last_weights(monkeypatch):
    _scripted(monkeypatch, {0: 0.5, 5: 0.4, 7: 0.8})
    pair, _ = _pair(12)
    trainer = Trainer(_small_model(), [pair], _config())
    for _ in trainer.run(cancel=lambda: trainer.step >= 7):
        pass
    assert [s.step for s in trainer.history] == [0, 5, 7]
    assert trainer.message.endswith("keeping step 7")


def test_real_validation_run_and_summary_without_snapshots():
    pair, _ = _pair(12)
    trainer = Trainer(_small_model(), [pair], _config(steps=10))
    progress = list(trainer.run())
    assert [s.step for s in trainer.history] == [0, 5, 10]
    assert progress[-1].message.startswith("validation AP")
    ref = ValidationScore(0, 0.62, 0.8, 0.1)
    assert "no snapshot was scored" in summary([ref], ref, 4)
    # Off: no validator, no held-out pixels, the last good model.
    trainer = Trainer(_small_model(), [pair], _config(steps=2, val_share=0))
    list(trainer.run())
    assert trainer.validator is None and trainer.selected is trainer.model


def test_corrected_and_untouched_cells_are_held_out_alike():
    pair, _ = _pair(16)
    ann = pair.annotation
    cells = np.unique(ann[ann >= FIRST_CELL])
    edited = np.isin(ann, cells[:8])
    _, held, note = split_validation([TrainingPair(pair.image, ann, edited=edited)], 0.25)
    (_, mask), = held
    out = np.unique(ann[mask & (ann >= FIRST_CELL)])
    assert len(np.intersect1d(out, cells[:8])) == 2 and len(np.setdiff1d(out, cells[:8])) == 2
    assert "4 of 16" in note and "2 of them corrected by you" in note


def test_cli_train_validates_and_records_it(tmp_path, capsys):
    import tifffile

    from napari_unet.cli import main
    from napari_unet.model import load_model, save_model

    pair, _ = _pair(12)
    base, out = tmp_path / "base.safetensors", tmp_path / "out.safetensors"
    save_model(_small_model(), base)
    tifffile.imwrite(tmp_path / "img.tif", pair.image)
    tifffile.imwrite(tmp_path / "ann.tif", pair.annotation)
    assert main(["train", "--images", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "ann.tif"), "-o", str(out), "--base-model", str(base),
                 "--steps", "4", "--validate-every", "2", "--batch", "2", "--tile", "64",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "holding out 3 of 12" in text and "validation AP" in text
    history = load_model(out).config.provenance["validation"]
    assert [h["step"] for h in history] == [0, 2, 4]


def test_summary_names_the_pixel_iou_when_the_ap_ties():
    ref, best = ValidationScore(0, 1.0, 0.95, 0.1), ValidationScore(50, 1.0, 0.99, 0.1)
    assert summary([ref, best], best, 5) == ("validation AP 1.00 → 1.00 (+0.00), pixel IoU "
                                             "0.950 → 0.990 on 5 held-out cell(s); keeping "
                                             "step 50")


def test_pixel_iou_breaks_an_ap_tie_only_on_enough_held_out_cells():
    start, snap = ValidationScore(0, 1.0, 0.93, 0.1), ValidationScore(25, 1.0, 0.97, 0.1)
    assert snap.beats(start, MIN_TIE_CELLS)
    assert not snap.beats(start, MIN_TIE_CELLS - 1)  # two or three cells: keep the start
    assert not ValidationScore(25, 1.0, 0.933, 0.1).beats(start, 10)  # within the margin
    assert ValidationScore(25, 0.5, 0.5, 0.1).beats(ValidationScore(0, 0.4, 0.9, 0.1), 2)


def test_deleted_objects_are_held_out_too_and_count_as_false_positives():
    from napari_unet.correct import delete_object

    pair, labels = _pair(12)
    ann, edited = pair.annotation, np.zeros(pair.annotation.shape, bool)
    spots = []
    for y, x in ((30, 130), (80, 130), (130, 130), (130, 80)):  # four false positives
        ann = ann.copy()
        ann[y - 4 : y + 4, x - 4 : x + 4] = 99
        edit = delete_object(ann, (y, x))
        ann, edited = edit.annotation, edited | edit.changed
        spots.append((y, x))
    train, held, note = split_validation([TrainingPair(pair.image, ann, edited=edited)], 0.5)
    assert "2 deleted object(s)" in note
    (_, mask), = held
    assert sum(bool(mask[y, x]) for y, x in spots) == 2
    # A model predicting a held-out deleted object gets a false positive there.
    pred = np.zeros(ann.shape, np.int32)
    y, x = next((y, x) for y, x in spots if mask[y, x])
    pred[y - 4 : y + 4, x - 4 : x + 4] = 1
    assert _objects_on(pred, mask).max() == 1


def _bloated_maps(labels: np.ndarray) -> np.ndarray:
    """Class maps whose P(cell) falls off slowly outside each cell: at the default
    threshold 0.5 every object comes out ~2 px too wide, at 0.7 about right."""
    outside = ndi.distance_transform_edt(labels == 0)
    fg = np.clip(0.75 - 0.1 * outside, 0.05, 0.95)
    inside = ndi.distance_transform_edt(labels > 0)
    interior = fg * np.clip(inside / 4, 0.1, 0.9)
    return np.stack([1 - fg, interior, fg - interior]).astype(np.float32)


def test_calibration_finds_the_threshold_that_fits_the_held_out_cells(monkeypatch):
    pair, _ = _pair(16)
    _, held, _ = split_validation([pair], 0.5)
    v = Validator.from_pairs([pair], held, (1.0, 99.8))
    assert v.n_cells >= MIN_CALIBRATION_CELLS
    maps = [_bloated_maps(c.gt) for c in v.crops]
    monkeypatch.setattr(Validator, "maps", lambda self, model: maps)
    model = _small_model()
    cal = v.calibrate(model)
    assert cal.changed and cal.settings["foreground_threshold"] == 0.7
    assert cal.quality_after > cal.quality_before + 0.05 and cal.ap_after >= cal.ap_before
    assert "foreground 0.7" in cal.sentence()
    # Already calibrated: nothing better by the margin, the settings stay.
    model.config.postprocess = cal.settings
    again = v.calibrate(model)
    assert not again.changed and again.settings == cal.settings
    assert "kept" in again.sentence()


def test_training_hands_back_a_calibrated_model_and_says_so(monkeypatch):
    _scripted(monkeypatch, {0: 0.5, 5: 0.4, 10: 0.7, 15: 0.6, 20: 0.65})
    pair, _ = _pair(16)
    trainer = Trainer(_small_model(), [pair], _config(val_share=0.5, calibrate=True))
    monkeypatch.setattr(Validator, "maps",
                        lambda self, model: [_bloated_maps(c.gt) for c in self.crops])
    list(trainer.run())
    assert trainer.calibration is not None and trainer.calibration.changed
    assert trainer.selected.config.postprocess == {"foreground_threshold": 0.7}
    assert trainer.message.startswith("validation AP 0.50 → 0.70")
    assert "; post-processing calibrated on them: foreground 0.7" in trainer.message
    # Off, or the starting model kept: the thresholds are left alone.
    _scripted(monkeypatch, {0: 0.5, 5: 0.4, 10: 0.7, 15: 0.6, 20: 0.65})
    off = Trainer(_small_model(), [pair], _config(val_share=0.5))  # the default
    list(off.run())
    assert off.calibration is None and off.selected.config.postprocess == {}
    _scripted(monkeypatch, {0: 0.9, 5: 0.4, 10: 0.7, 15: 0.6, 20: 0.65})
    kept = Trainer(_small_model(), [pair], _config(val_share=0.5, calibrate=True))
    list(kept.run())
    assert kept.calibration is None and kept.selected.config.postprocess == {}
