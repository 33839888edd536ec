"""Instance matching and pixel metrics on small hand-made label images."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.evaluate import (
    evaluate_many,
    evaluate_pair,
    format_table,
    match_instances,
    pixel_iou,
)


def squares(shape=(64, 64), size=10, step=16, offset=(0, 0)) -> np.ndarray:
    """A grid of ``size``-pixel squares, labels 1..n, optionally shifted by ``offset``."""
    lab = np.zeros(shape, np.int32)
    k = 1
    for y in range(2, shape[0] - size - 2, step):
        for x in range(2, shape[1] - size - 2, step):
            y0, x0 = y + offset[0], x + offset[1]
            lab[y0 : y0 + size, x0 : x0 + size] = k
            k += 1
    return lab


def test_perfect_prediction():
    gt = squares()
    n = int(gt.max())
    # Relabelled prediction: ids need not agree, only the regions.
    pred = np.where(gt > 0, n + 1 - gt + 100, 0).astype(np.uint16)
    m = evaluate_pair(pred, gt)
    assert m["ap"] == m["f1"] == m["precision"] == m["recall"] == m["pixel_iou"] == 1.0
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"], m["n_gt"]) == (n, 0, 0, n, n)
    assert match_instances(pred, gt)["mean_matched_iou"] == 1.0


def test_missing_object_is_false_negative():
    gt = squares()
    n = int(gt.max())
    pred = gt.copy()
    pred[pred == 3] = 0
    m = match_instances(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (n - 1, 0, 1)
    assert m["ap"] == pytest.approx((n - 1) / n)
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx((n - 1) / n)
    assert m["f1"] == pytest.approx(2 * (n - 1) / (2 * n - 1))


def test_split_object():
    gt = np.zeros((20, 20), np.int32)
    gt[2:12, 2:12] = 1
    gt[14:18, 14:18] = 2
    pred = gt.copy()
    pred[2:12, 2:9] = 5  # 70 % of object 1 keeps id 5, 30 % becomes id 6
    pred[2:12, 9:12] = 6
    m = match_instances(pred, gt)
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"]) == (2, 1, 0, 3)
    assert m["ap"] == pytest.approx(2 / 3)
    assert m["mean_matched_iou"] == pytest.approx((0.7 + 1.0) / 2)


def test_split_in_halves_matches_nothing():
    gt = np.zeros((10, 10), np.uint8)
    gt[:, :] = 1
    pred = np.ones((10, 10), np.uint8)
    pred[:, 5:] = 2
    m = match_instances(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 2, 1)  # IoU exactly 0.5 is not > 0.5
    assert m["ap"] == 0.0
    # Below 0.5 the assignment picks one half (one-to-one).
    low = match_instances(pred, gt, iou_threshold=0.3)
    assert (low["tp"], low["fp"], low["fn"]) == (1, 1, 0)
    assert low["mean_matched_iou"] == pytest.approx(0.5)


def test_shift_below_and_above_threshold():
    gt = squares(size=10)
    n = int(gt.max())
    # Shift by 2 px: IoU = 80 / 120 = 0.667 -> every object matches at 0.5, none at 0.7.
    small = squares(size=10, offset=(0, 2))
    assert match_instances(small, gt)["tp"] == n
    assert match_instances(small, gt, iou_threshold=0.7)["tp"] == 0
    # Shift by 4 px: IoU = 60 / 140 = 0.43 -> no match at 0.5, all at 0.4.
    big = squares(size=10, offset=(0, 4))
    m = match_instances(big, gt)
    assert (m["tp"], m["fp"], m["fn"], m["ap"]) == (0, n, n, 0.0)
    m = match_instances(big, gt, iou_threshold=0.4)
    assert m["tp"] == n
    assert m["mean_matched_iou"] == pytest.approx(60 / 140)
    assert pixel_iou(big, gt) == pytest.approx(60 / 140)


def test_low_threshold_prefers_more_matches():
    # Pred A overlaps gt X and Y; pred B only overlaps X. Maximal matching: A-Y, B-X.
    gt = np.zeros((1, 12), np.int32)
    pred = np.zeros((1, 12), np.int32)
    gt[0, 0:6], gt[0, 6:12] = 1, 2
    pred[0, 0:2], pred[0, 2:10] = 1, 2  # B = 1 (IoU 1/3 with X), A = 2 (IoU 0.4 / 0.4)
    m = match_instances(pred, gt, iou_threshold=0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)


def test_empty_cases():
    z = np.zeros((8, 8), np.int32)
    one = z.copy()
    one[2:5, 2:5] = 1
    both = evaluate_pair(z, z)
    assert both["ap"] == both["f1"] == both["precision"] == both["recall"] == 1.0
    assert both["pixel_iou"] == 1.0
    no_pred = evaluate_pair(z, one)
    assert (no_pred["tp"], no_pred["fn"], no_pred["ap"], no_pred["f1"]) == (0, 1, 0.0, 0.0)
    assert no_pred["precision"] == no_pred["recall"] == no_pred["pixel_iou"] == 0.0
    no_gt = evaluate_pair(one, z)
    assert (no_gt["tp"], no_gt["fp"], no_gt["ap"], no_gt["f1"]) == (0, 1, 0.0, 0.0)
    assert no_gt["precision"] == no_gt["recall"] == 0.0
    size0 = np.zeros((0, 5), np.uint8)
    assert match_instances(size0, size0)["ap"] == 1.0


def test_3d_and_bool_and_big_ids():
    gt = np.zeros((6, 20, 20), np.uint16)
    gt[1:5, 2:8, 2:8] = 1
    gt[1:5, 10:18, 10:18] = 2
    pred = gt.astype(np.int64) * 10**12  # sparse, huge ids
    pred[1:5, 10:18, 10:15] = 0  # object 2 mostly missing: IoU 3/8
    m = evaluate_pair(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert match_instances(gt > 0, gt > 0)["ap"] == 1.0


def test_errors():
    a = np.zeros((8, 8), np.int32)
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(8, 9\)"):
        match_instances(a, np.zeros((8, 9), np.int32))
    with pytest.raises(ValueError, match="float32"):
        evaluate_pair(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="float64"):
        pixel_iou(a, a.astype(np.float64))
    with pytest.raises(ValueError, match="negative"):
        match_instances(a - 1, a)


def test_large_image_many_instances(rng):
    # ~2000 square cells on a 2048 x 2048 grid; prediction drops and shifts some.
    side, step = 2048, 45
    n_per = side // step
    gt = np.zeros((side, side), np.int32)
    ys, xs = np.meshgrid(np.arange(n_per), np.arange(n_per), indexing="ij")
    ids = (ys * n_per + xs + 1).astype(np.int32)
    cell = np.kron(ids, np.ones((step, step), np.int32))
    mask = np.zeros((step, step), bool)
    mask[5:40, 5:40] = True
    gt[: cell.shape[0], : cell.shape[1]] = cell * np.tile(mask, (n_per, n_per))
    n = n_per * n_per
    pred = np.roll(gt, 3, axis=1)  # IoU = 32*35 / (38*35) -> still matched
    drop = rng.choice(np.arange(1, n + 1), 100, replace=False)
    pred[np.isin(pred, drop)] = 0
    m = match_instances(pred, gt)
    assert (m["n_gt"], m["n_pred"], m["tp"], m["fn"], m["fp"]) == (n, n - 100, n - 100, 100, 0)
    assert m["mean_matched_iou"] == pytest.approx(32 / 38)
    low = match_instances(pred, gt, iou_threshold=0.1)
    assert low["tp"] == n - 100


def test_evaluate_many_and_table():
    gt = squares()
    pred = gt.copy()
    pred[pred == 1] = 0
    rows, mean = evaluate_many([("a", gt, gt), ("b", pred, gt)])
    assert [r["name"] for r in rows] == ["a", "b"]
    assert mean["name"] == "mean"
    assert mean["ap"] == pytest.approx((1.0 + rows[1]["ap"]) / 2)
    assert evaluate_many([]) == ([], {})
    text = format_table([*rows, mean], ["name", "ap", "tp", "fn"])
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].split() == ["name", "ap", "tp", "fn"]
    assert "1.000" in lines[2] and lines[4].startswith("mean")
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
