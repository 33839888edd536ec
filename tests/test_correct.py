"""Labels -> annotation conversion and the correction edits (pure functions, no Qt)."""

import numpy as np
import pytest

from napari_unet.correct import (
    delete_object,
    edited_objects,
    labels_to_annotation,
    merge_objects,
    next_free_id,
    paint_cell,
    rectangles_to_mask,
    split_object,
)
from napari_unet.targets import BACKGROUND, make_targets
from napari_unet.train import TrainingPair, prepare_pairs


def _labels():
    lab = np.zeros((40, 60), np.int32)
    lab[5:15, 5:15] = 1
    lab[5:15, 30:40] = 2
    lab[25:35, 20:50] = 3  # a wide cell, to split
    return lab


def test_whole_image_to_annotation():
    lab = _labels()
    ann, complete = labels_to_annotation(lab)
    assert complete.all()
    assert ann.dtype == np.int32
    assert (ann[lab == 0] == BACKGROUND).all()
    # Each cell keeps its own id, shifted into the cell range (>= 2).
    for i in (1, 2, 3):
        assert np.unique(ann[lab == i]).tolist() == [i + 1]


def test_rectangle_grows_to_whole_cells_and_leaves_the_rest_unannotated():
    lab = _labels()
    region = rectangles_to_mask(lab.shape, [np.array([[0, 0], [0, 12], [12, 12], [12, 0]])])
    ann, complete = labels_to_annotation(lab, region)
    assert (ann[lab == 1] == 2).all()  # the cut cell is whole
    assert complete[lab == 1].all()
    assert (ann[lab == 2] == 0).all() and (ann[lab == 3] == 0).all()
    assert (ann[~complete] == 0).all()
    assert (ann[complete & (lab == 0)] == BACKGROUND).all()
    # Without growing, the region is exactly the rectangle.
    ann2, complete2 = labels_to_annotation(lab, region, grow_to_cells=False)
    assert complete2.sum() == 12 * 12 and (ann2[12:15, 5:15] == 0).all()
    # (y0, x0, y1, x1) form and clipping to the image.
    assert rectangles_to_mask(lab.shape, [(30, 50, 100, 100)]).sum() == 10 * 10


def test_one_plane_of_a_stack_and_adding_to_an_existing_annotation():
    stack = np.stack([_labels(), _labels()[::-1]])
    ann, complete = labels_to_annotation(stack, plane=(1,))
    assert not complete[0].any() and complete[1].all()
    assert (ann[0] == 0).all() and ann[1].max() == 4
    base = np.zeros(stack.shape, np.int32)
    base[1, 0:3, 0:3] = 7  # a cell the user painted
    ann, _ = labels_to_annotation(stack, plane=(1,), base=base)
    assert (ann[1, 0:3, 0:3] == 7).all()
    assert ann[1][stack[1] == 1].min() == 8  # new ids above the user's
    with pytest.raises(ValueError, match="leading axes"):
        labels_to_annotation(stack, plane=(0, 1))
    with pytest.raises(ValueError, match="region shape"):
        labels_to_annotation(stack, np.ones((3, 3), bool))


def test_delete_object():
    ann, _ = labels_to_annotation(_labels())
    edit = delete_object(ann, (10, 10))
    assert (edit.annotation[ann == 2] == BACKGROUND).all()
    assert edit.changed.sum() == (ann == 2).sum()
    assert (ann == 2).any()  # pure: the input is untouched
    with pytest.raises(ValueError, match="no cell at"):
        delete_object(ann, (0, 0))
    with pytest.raises(ValueError, match="outside"):
        delete_object(ann, (100, 0))


def test_merge_closes_the_seam():
    lab = np.zeros((30, 40), np.int32)
    lab[5:20, 5:15] = 1
    lab[5:20, 17:27] = 2  # an over-split cell: a 2-px seam of background
    ann, _ = labels_to_annotation(lab)
    edit = merge_objects(ann, (10, 8), (10, 20))
    assert edit.label == 2
    merged = edit.annotation == 2
    assert merged[5:20, 5:27].all()  # seam filled
    assert not (edit.annotation == 3).any()
    assert edit.changed.sum() == merged.sum()
    assert (edit.annotation[0:3] == BACKGROUND).all()  # background elsewhere untouched


def test_split_along_a_polyline():
    ann, _ = labels_to_annotation(_labels())
    wide = ann == 4
    edit = split_object(ann, [(22, 36), (30, 35), (38, 34)])
    out = edit.annotation
    assert set(np.unique(out[wide]).tolist()) == {4, next_free_id(ann)}
    assert (out[~wide] == ann[~wide]).all()  # only that cell changed
    assert edit.changed.sum() == wide.sum()
    # The pieces touch, so the training targets draw a border between them.
    target, _ = make_targets(out)
    assert (target[25:35, 34:37] == 2).any()
    with pytest.raises(ValueError, match="does not cut"):
        split_object(ann, [(28, 22), (30, 24)])
    with pytest.raises(ValueError, match="crosses no cell"):
        split_object(ann, [(0, 0), (0, 50)])


def test_paint_missed_cell_with_next_free_id():
    ann, _ = labels_to_annotation(_labels())
    mask = np.zeros(ann.shape, bool)
    mask[18:23, 52:58] = True
    edit = paint_cell(ann, mask)
    assert edit.label == 5 == next_free_id(ann)
    assert (edit.annotation[mask] == 5).all()
    assert (edit.changed == mask).all()
    with pytest.raises(ValueError, match="empty"):
        paint_cell(ann, np.zeros(ann.shape, bool))
    assert next_free_id(np.zeros((3, 3), np.int32)) == 2


def test_edited_objects_grow_to_whole_cells():
    ann, _ = labels_to_annotation(_labels())
    edited = np.zeros(ann.shape, bool)
    edited[10, 10] = True
    grown = edited_objects(ann, edited)
    assert (grown == (ann == 2)).all()


def test_edited_objects_weigh_more_in_training():
    lab = _labels()
    ann, complete = labels_to_annotation(lab)
    edited = ann == 2
    image = (lab > 0).astype(np.float32) * 100 + 10
    plain = prepare_pairs([TrainingPair(image, ann, complete)], 1, 64, 8, (1, 99.8), 10, 5)
    weighted = prepare_pairs([TrainingPair(image, ann, complete, edited=edited)], 1, 64, 8,
                             (1, 99.8), 10, 5, edited_weight=3.0)
    w0, w1 = plain[0].weight, weighted[0].weight
    target = plain[0].target
    _, ref = make_targets(ann, complete)
    pad = (w0.shape[0] - ann.shape[0]) // 2, (w0.shape[1] - ann.shape[1]) // 2
    inner = (slice(pad[0], pad[0] + ann.shape[0]), slice(pad[1], pad[1] + ann.shape[1]))
    assert np.allclose(w0[inner], ref)
    assert np.allclose(w1[inner][edited], 3 * ref[edited])
    assert np.allclose(w1[inner][~edited], ref[~edited])
    assert (target == weighted[0].target).all()
    with pytest.raises(ValueError, match="edited mask shape"):
        prepare_pairs([TrainingPair(image, ann, edited=edited[:5])], 1, 64, 8, (1, 99.8), 10, 5)


def test_cli_annotate_from_labels(tmp_path, capsys):
    import tifffile

    from napari_unet.cli import main

    lab = _labels()
    src, out, done = tmp_path / "labels.tif", tmp_path / "ann.tif", tmp_path / "done.tif"
    tifffile.imwrite(src, lab)
    assert main(["annotate-from-labels", str(src), "-o", str(out), "--rect", "0", "0", "12",
                 "12", "--complete-out", str(done)]) == 0
    ann, complete = labels_to_annotation(lab, rectangles_to_mask(lab.shape, [(0, 0, 12, 12)]))
    assert (tifffile.imread(out) == ann).all()
    assert (tifffile.imread(done).astype(bool) == complete).all()
    assert "1 cell(s)" in capsys.readouterr().out
    # Never overwrites without being asked.
    assert main(["annotate-from-labels", str(src), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
