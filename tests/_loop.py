"""A scripted user for the correction loop: which fixes a person would make to a
segmentation, read from the ground truth (tests of the Annotate → Train → Segment loop)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass
class Fix:
    """One correction: ``kind`` delete / merge / split / paint, with what the tool needs."""

    kind: str
    points: np.ndarray  # (n, 2) y, x: the click(s) or the split line's vertices
    mask: np.ndarray | None = None  # the cell to paint (paint only)


def inner_point(mask: np.ndarray) -> np.ndarray:
    """The pixel deepest inside a mask (where a user clicks on an object)."""
    dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(dist)), mask.shape), float)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def scripted_fixes(seg: np.ndarray, truth: np.ndarray, limit: int = 12) -> list[Fix]:
    """Corrections that turn ``seg`` towards ``truth`` (2D instance labels, 0 = background):
    merge the pieces of over-split cells, split objects spanning two cells along a line,
    delete false objects, paint missed cells; the largest errors first, at most ``limit``."""
    fixes: list[tuple[float, Fix]] = []
    area = {int(i): int(n) for i, n in zip(*np.unique(seg, return_counts=True), strict=True)}
    g_area = {int(i): int(n) for i, n in zip(*np.unique(truth, return_counts=True),
                                            strict=True)}
    handled_p: set[int] = set()
    handled_g: set[int] = set()
    home: dict[int, tuple[int, int]] = {}  # pred id -> (gt id holding most of it, pixels)
    for p in area:
        if p == 0:
            continue
        gs, counts = np.unique(truth[seg == p], return_counts=True)
        best = max(((int(g), int(n)) for g, n in zip(gs, counts, strict=True) if g),
                   key=lambda t: t[1], default=(0, 0))
        home[p] = best
    for g in g_area:  # one cell in several objects: merge them into the largest
        if g == 0:
            continue
        parts = sorted((p for p, (h, n) in home.items() if h == g and n > 0.5 * area[p]),
                       key=lambda p: -area[p])
        for other in parts[1:]:
            fixes.append((area[other], Fix("merge", np.stack([inner_point(seg == parts[0]),
                                                              inner_point(seg == other)]))))
        if len(parts) >= 2:
            handled_p.update(parts)
            handled_g.add(g)
    for p, (g, n) in home.items():
        if p in handled_p:
            continue
        pm = seg == p
        gs, counts = np.unique(truth[pm], return_counts=True)
        whole = [int(h) for h, k in zip(gs, counts, strict=True) if h and k > 0.5 * g_area[h]]
        if len(whole) >= 2:  # one object over two cells: cut between the first two
            a, b = (np.array(ndi.center_of_mass(truth == h)) for h in whole[:2])
            mid, d = (a + b) / 2, b - a
            normal = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6)
            reach = 2 * np.sqrt(pm.sum())
            fixes.append((pm.sum(), Fix("split", np.stack([mid - reach * normal,
                                                           mid + reach * normal]))))
            handled_g.update(whole[:2])
        elif g == 0 or _iou(pm, truth == g) < 0.5 and n <= 0.5 * area[p]:
            fixes.append((pm.sum(), Fix("delete", inner_point(pm)[None])))  # a false object
    for g in g_area:  # cells no object matches: paint them
        if g == 0 or g in handled_g:
            continue
        gm = truth == g
        if not any(_iou(seg == p, gm) >= 0.5 for p, (h, _) in home.items() if h == g):
            fixes.append((g_area[g], Fix("paint", inner_point(gm)[None], gm)))
    fixes.sort(key=lambda f: -f[0])
    return [f for _, f in fixes[:limit]]
