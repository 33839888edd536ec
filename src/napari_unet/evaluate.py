"""Segmentation metrics: foreground pixel IoU and instance matching scores (AP, F1, ...).

Instance matching follows the Data Science Bowl 2018 / StarDist convention: a predicted and a
ground-truth object match when their IoU is above a threshold (one-to-one), and
``ap = tp / (tp + fp + fn)`` (StarDist calls it "accuracy"). Label 0 is background in both
images. All functions accept N-D label arrays (2D images, 3D stacks).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["evaluate_many", "evaluate_pair", "format_table", "match_instances", "pixel_iou"]

# Score keys of evaluate_pair, in table order.
SCORE_KEYS = (
    "pixel_iou", "ap", "f1", "precision", "recall", "mean_matched_iou",
    "tp", "fp", "fn", "n_pred", "n_gt",
    "merges", "splits", "false_objects", "misses", "area_ratio",
)
# Counts are summed over images in evaluate_many's summary row; the area ratio is a median.
COUNT_KEYS = ("tp", "fp", "fn", "n_pred", "n_gt", "merges", "splits", "false_objects", "misses")


def _check(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of label images: same shape, integer (or bool) dtype, no negatives."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}"
        )
    for what, a in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(
                f"{what} must be an integer label image, got dtype {a.dtype} "
                f"(prediction dtype {pred.dtype}, ground-truth dtype {gt.dtype})"
            )
        if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
            raise ValueError(f"{what} has negative labels (dtype {a.dtype})")
    return pred, gt


def _ids_and_areas(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero label ids of a flat label array and their pixel counts."""
    if labels.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(labels.max())
    if top <= 4 * labels.size + (1 << 16):  # dense ids: a bincount is O(n), no sort
        counts = np.bincount(labels.astype(np.intp, copy=False), minlength=top + 1)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        return ids.astype(np.int64), counts[ids].astype(np.int64)
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids > 0
    return ids[keep].astype(np.int64), counts[keep].astype(np.int64)


def _overlaps(p: np.ndarray, g: np.ndarray, p_ids: np.ndarray, g_ids: np.ndarray):
    """Sparse contingency table of foreground/foreground overlaps.

    Returns (row, col, count) with row/col indices into ``p_ids``/``g_ids``.
    """
    both = (p > 0) & (g > 0)
    if not both.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    pi = np.searchsorted(p_ids, p[both].astype(np.int64))
    gi = np.searchsorted(g_ids, g[both].astype(np.int64))
    n_g = len(g_ids)
    key = pi * n_g + gi
    n_keys = len(p_ids) * n_g
    if n_keys <= 4 * key.size + (1 << 20):
        counts = np.bincount(key, minlength=n_keys)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    return keys // n_g, keys % n_g, counts.astype(np.int64)


def _assign(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, n_rows: int) -> np.ndarray:
    """Indices of candidate pairs in a maximum one-to-one matching.

    Maximises the number of matches first and the summed IoU second (as StarDist does);
    solved separately on each connected component of the candidate graph.
    """
    if iou.size == 0:
        return np.zeros(0, np.intp)
    n_cols = int(cols.max()) + 1
    n = n_rows + n_cols
    graph = coo_matrix((np.ones(len(rows)), (rows, n_rows + cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[rows]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    chosen = []
    for group in np.split(order, bounds):
        if len(group) == 1:
            chosen.append(group)
            continue
        r_ids, r = np.unique(rows[group], return_inverse=True)
        c_ids, c = np.unique(cols[group], return_inverse=True)
        k = min(len(r_ids), len(c_ids))
        weight = np.zeros((len(r_ids), len(c_ids)))
        edge = np.full((len(r_ids), len(c_ids)), -1, np.intp)
        # Each match is worth 1 + IoU/(2k): more matches always beat a larger IoU sum.
        weight[r, c] = 1.0 + iou[group] / (2 * k)
        edge[r, c] = group
        ri, ci = linear_sum_assignment(weight, maximize=True)
        picked = edge[ri, ci]
        chosen.append(picked[picked >= 0])
    return np.concatenate(chosen)


def match_instances(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Match predicted to ground-truth instances one-to-one by IoU > ``iou_threshold``.

    Only overlapping pairs are considered (sparse contingency table), so large images with
    thousands of objects are cheap. With ``iou_threshold >= 0.5`` each object has at most
    one candidate; below that the matching is solved with ``linear_sum_assignment``.

    Returns tp, fp, fn, n_pred, n_gt, precision, recall, f1, ap (= tp / (tp + fp + fn)),
    mean_matched_iou (0.0 when nothing matched), the error classes of
    :func:`_error_classes` and area_ratio: the median predicted / true area over matched
    pairs (NaN when none). When both images are empty every score
    is 1.0; when only one is, the scores are 0.0.
    """
    pred, gt = _check(pred, gt)
    p, g = pred.ravel(), gt.ravel()
    if p.dtype == np.bool_:
        p = p.view(np.uint8)
    if g.dtype == np.bool_:
        g = g.view(np.uint8)
    p_ids, p_area = _ids_and_areas(p)
    g_ids, g_area = _ids_and_areas(g)
    n_pred, n_gt = len(p_ids), len(g_ids)

    rows, cols, inter = _overlaps(p, g, p_ids, g_ids)
    iou = inter / (p_area[rows] + g_area[cols] - inter).astype(np.float64)
    cand = iou > iou_threshold
    all_rows, all_cols, all_inter = rows, cols, inter
    rows, cols, iou = rows[cand], cols[cand], iou[cand]
    # IoU > 0.5 pairs an object with at most one other: the candidates are the matches.
    matched = iou if iou_threshold >= 0.5 else iou[_assign(rows, cols, iou, n_pred)]

    errors = _error_classes(all_rows, all_cols, all_inter, p_area, g_area, n_pred, n_gt)
    if iou_threshold >= 0.5:
        ratios = p_area[all_rows[cand]] / g_area[all_cols[cand]]
    else:  # the ratio report is for the usual IoU > 0.5 matching
        ratios = np.zeros(0)
    tp = int(matched.size)
    fp, fn = n_pred - tp, n_gt - tp
    both_empty = float(n_pred == 0 and n_gt == 0)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_pred": n_pred,
        "n_gt": n_gt,
        "precision": tp / n_pred if n_pred else both_empty,
        "recall": tp / n_gt if n_gt else both_empty,
        "f1": 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0,
        "ap": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "mean_matched_iou": float(matched.mean()) if tp else 0.0,
        **errors,
        "area_ratio": float(np.median(ratios)) if ratios.size else float("nan"),
    }


def _error_classes(rows: np.ndarray, cols: np.ndarray, inter: np.ndarray, p_area: np.ndarray,
                   g_area: np.ndarray, n_pred: int, n_gt: int) -> dict[str, int]:
    """What went wrong, object by object, from the overlap table.

    - merges: predicted objects holding the majority of two or more true objects,
    - splits: true objects holding the majority of two or more predicted objects,
    - false_objects: predicted objects with no majority overlap with any true object (not
      explained by a split), - misses: true objects with no majority overlap with any
      predicted object (not explained by a merge).
    """
    g_major = inter > 0.5 * g_area[cols]  # most of the true object lies in the prediction
    p_major = inter > 0.5 * p_area[rows]  # most of the prediction lies in the true object
    per_pred = np.bincount(rows[g_major], minlength=n_pred)
    per_gt = np.bincount(cols[p_major], minlength=n_gt)
    g_covered = np.zeros(n_gt, bool)
    g_covered[cols[g_major]] = True
    p_covered = np.zeros(n_pred, bool)
    p_covered[rows[p_major]] = True
    return {
        "merges": int((per_pred >= 2).sum()),
        "splits": int((per_gt >= 2).sum()),
        "false_objects": int((~p_covered & (per_pred == 0)).sum()),
        "misses": int((~g_covered & (per_gt == 0)).sum()),
    }


def pixel_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU (label > 0) of two label images; 1.0 when both are empty."""
    pred, gt = _check(pred, gt)
    p, g = pred > 0, gt > 0
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else int(np.count_nonzero(p & g)) / union


def evaluate_pair(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Pixel IoU plus the instance scores of :func:`match_instances` for one image."""
    scores = {"pixel_iou": pixel_iou(pred, gt)} | match_instances(pred, gt, iou_threshold)
    return {k: scores[k] for k in SCORE_KEYS}


def evaluate_many(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], iou_threshold: float = 0.5
) -> tuple[list[dict], dict]:
    """Score ``(name, pred, gt)`` triples.

    Returns one row per image (``name`` first, then :func:`evaluate_pair`'s keys) and a row
    named ``"mean"`` holding the unweighted mean of each score over images, the sum of each
    count (objects, errors) and the median of the per-image area ratios (empty when there
    are no pairs).
    """
    rows = [{"name": name} | evaluate_pair(p, g, iou_threshold) for name, p, g in pairs]
    if not rows:
        return rows, {}
    mean: dict = {"name": "mean"}
    mean |= {k: float(np.mean([r[k] for r in rows])) for k in SCORE_KEYS}
    mean |= {k: int(np.sum([r[k] for r in rows])) for k in COUNT_KEYS}
    ratios = [r["area_ratio"] for r in rows if np.isfinite(r["area_ratio"])]
    mean["area_ratio"] = float(np.median(ratios)) if ratios else float("nan")
    return rows, mean


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A small aligned plain-text table: numbers right-aligned (floats to 3 decimals)."""

    def cell(v: object) -> str:
        if isinstance(v, bool | np.bool_):
            return str(bool(v))
        if isinstance(v, numbers.Integral):
            return str(int(v))
        if isinstance(v, numbers.Real):
            return f"{float(v):.3f}"
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    numeric = [
        all(isinstance(r.get(c), numbers.Real) for r in rows if r.get(c) is not None)
        for c in columns
    ]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(columns)), rule, *(line(b) for b in body)])
