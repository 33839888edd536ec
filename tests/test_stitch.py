"""3D stitching of per-plane instances (napari_unet.stitch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import sparse
from skimage.segmentation import relabel_sequential

from napari_unet.stitch import match_planes, stitch_planes, stitch_planes_iter

# ../shared/data next to the checkout (or next to a folder above it, for a worktree).
DEMO = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[1:]
             if (p / "shared" / "data").is_dir()), Path("shared/data")) / "dsb_nuclei_demo"
NUCLEI3D = DEMO / "images" / "nuclei3d.tif"
NUCLEI3D_LABELS = DEMO / "labels" / "nuclei3d.tif"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ap(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> float:
    """Instance AP = TP / (TP + FP + FN) at IoU > thr, any dimensionality."""
    try:
        from napari_unet.evaluate import evaluate_pair
    except ImportError:
        pass
    else:
        return float(evaluate_pair(pred, gt, iou_threshold=thr)["ap"])
    p, g = relabel_sequential(pred)[0].ravel(), relabel_sequential(gt)[0].ravel()
    m = sparse.coo_array((np.ones(p.size), (p, g)), shape=(p.max() + 1, g.max() + 1)).toarray()
    sp, sg = m.sum(1), m.sum(0)
    iou = (m / (sp[:, None] + sg[None, :] - m))[1:, 1:]
    tp = int((iou > thr).sum())
    return tp / (p.max() + g.max() - tp)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b split the image into the same objects, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _per_plane(volume: np.ndarray, axis: int = 0, seed: int = 0) -> np.ndarray:
    """Slice a 3D label volume into planes with ids meaningful only inside each plane."""
    rng = np.random.default_rng(seed)
    planes = []
    for plane in np.moveaxis(volume, axis, 0):
        seq = relabel_sequential(plane)[0]
        perm = np.concatenate([[0], rng.permutation(int(seq.max())) + 1])  # shuffle ids
        planes.append(perm[seq] * 7)  # not consecutive either
    return np.moveaxis(np.stack(planes), 0, axis)


def _blobs(shape=(28, 96, 96)) -> np.ndarray:
    """Ellipsoids: isolated ones, a pair touching side by side, a pair stacked along z."""
    zz, yy, xx = np.indices(shape)
    out = np.zeros(shape, np.int32)
    # Centres between planes, so no object ends in a single-pixel tip (where two stacked
    # cells touch, such tips would be ambiguous).
    centres = [
        (8.5, 20, 20, 6.2, 9, 9), (18.5, 20, 70, 7.2, 10, 8), (10.5, 70, 22, 5.2, 8, 8),
        (14.5, 60, 55, 6.2, 8, 8), (14.5, 60, 71, 6.2, 8, 8),  # touching in y/x
        (6.5, 80, 80, 5.2, 9, 9), (16.5, 82, 79, 5.2, 9, 9),  # stacked along z
    ]
    for k, (cz, cy, cx, rz, ry, rx) in enumerate(centres, start=1):
        inside = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out[inside & (out == 0)] = k
    return out


def test_blobs_are_stitched_back():
    gt = _blobs()
    planes = _per_plane(gt)
    assert _ap(planes, gt) < 0.5  # the per-plane ids alone are not 3D objects
    out = stitch_planes(planes)
    assert out.dtype == np.int32
    assert _ap(out, gt) == 1.0
    assert _same_partition(out, gt)
    # Objects are numbered 1..N in order of first appearance along the stack.
    assert set(np.unique(out)) == set(range(gt.max() + 1))
    firsts = [np.argmax((out == k).any(axis=(1, 2))) for k in range(1, out.max() + 1)]
    assert firsts == sorted(firsts)


def test_stacked_cells_need_the_dip_split():
    gt = _blobs()
    planes = _per_plane(gt)
    merged = stitch_planes(planes, threshold=0.5, split_ratio=None)
    assert merged.max() == gt.max() - 1  # the two stacked ellipsoids became one
    assert _same_partition(stitch_planes(planes, threshold=0.5), gt)


def test_iou_rule_and_arbitrary_axis_and_volumes():
    gt = _blobs()
    planes = _per_plane(gt)
    assert _same_partition(stitch_planes(planes, iou_threshold=0.1), gt)
    # (Z, T, Y, X) stitched along axis 0.
    zt = np.stack([planes, planes[:, ::-1]], axis=1)
    out = stitch_planes(zt, axis=0)
    assert _same_partition(out[:, 0], gt) and _same_partition(out[:, 1], gt[:, ::-1])
    # (T, Z, Y, X): each volume stitched on its own, ids unique across volumes.
    both = np.stack([planes, planes[:, ::-1]])
    out = stitch_planes(both, axis=1)
    assert _same_partition(out[0], gt) and _same_partition(out[1], gt[:, ::-1])
    assert not set(np.unique(out[0])[1:]) & set(np.unique(out[1])[1:])


def test_zarr_in_place_and_progress(tmp_path):
    gt = _blobs()
    store = zarr.create_array(str(tmp_path / "l.zarr"), shape=gt.shape, dtype=np.int32,
                              chunks=(1, *gt.shape[1:]), zarr_format=2)
    store[:] = _per_plane(gt)
    steps = [p.step for p in stitch_planes_iter(store, out=store, anisotropy=2.5)]
    assert steps == list(range(1, 2 * gt.shape[0] + 1))
    assert _same_partition(store[:], gt)
    assert store.attrs["stitch"]["anisotropy"] == 2.5
    assert store.attrs["stitch"]["n_objects"] == gt.max()
    # Stitching its own output again changes nothing: only the partition of planes matters.
    before = store[:]
    stitch_planes(store, out=store)
    np.testing.assert_array_equal(store[:], before)


def test_match_planes_is_one_to_one():
    a = np.zeros((20, 20), np.int64)
    a[2:18, 2:18] = 1  # one big object (two cells merged in this plane)
    b = np.zeros_like(a)
    b[2:18, 2:10], b[2:18, 10:18] = 1, 2
    ia, jb, iou, overlap = match_planes(a, b, 1, 2, 0.3, "overlap")
    assert ia.tolist() == [1] and len(jb) == 1  # continues one cell, not both
    assert iou[0] == pytest.approx(0.5) and overlap[0] == 1.0
    assert match_planes(a, b, 1, 2, 0.6, "iou")[0].size == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"axis": 1}, "last two"), ({"axis": 5}, "out of range"), ({"threshold": 0}, r"\(0, 1\]"),
     ({"metric": "dice"}, "metric"), ({"anisotropy": 0}, "anisotropy")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stitch_planes(np.zeros((3, 8, 8), np.int32), **kwargs)


def test_bad_labels():
    with pytest.raises(ValueError, match="3D"):
        stitch_planes(np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="integers"):
        stitch_planes(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="negative"):
        stitch_planes(-np.ones((3, 8, 8), np.int32))


def _nuclei3d() -> tuple[np.ndarray, np.ndarray]:
    if not (NUCLEI3D.exists() and NUCLEI3D_LABELS.exists()):
        pytest.skip("shared nuclei3d demo stack not available")
    import tifffile

    return tifffile.imread(NUCLEI3D), tifffile.imread(NUCLEI3D_LABELS).astype(np.int32)


def test_nuclei3d_ground_truth_planes_restitch():
    """Upper bound on real nuclei: re-stitch the ground truth cut into planes."""
    _, gt = _nuclei3d()
    aps = {
        "defaults (overlap 0.7, split 0.85)": _ap(stitch_planes(_per_plane(gt)), gt),
        "iou 0.25": _ap(stitch_planes(_per_plane(gt), iou_threshold=0.25), gt),
        "iou 0.25, no split": _ap(stitch_planes(_per_plane(gt), iou_threshold=0.25,
                                                split_ratio=None), gt),
    }
    print("\nnuclei3d ground-truth planes re-stitched, 3D AP@0.5:",
          {k: round(v, 3) for k, v in aps.items()})
    assert aps["defaults (overlap 0.7, split 0.85)"] >= 0.95


def test_nuclei3d_bundled_model_plane_by_plane():
    from napari_unet.model import bundled_model_path, load_model
    from napari_unet.segment import segment

    if not bundled_model_path().exists():
        pytest.skip("the bundled model is not there yet")
    image, gt = _nuclei3d()
    planes = segment(image, load_model(), device="cpu")
    out = stitch_planes(planes)
    ap3d = _ap(out, gt)
    ap2d = np.mean([_ap(planes[z], gt[z]) for z in range(gt.shape[0]) if gt[z].any()])
    print(f"\nnuclei3d, bundled model plane by plane + stitching: 3D AP@0.5 {ap3d:.3f} "
          f"({out.max()} objects, {len(np.unique(gt)) - 1} true); mean 2D AP@0.5 {ap2d:.3f}")
    # Relative to the model's own 2D quality, so a new bundled model does not break it, but
    # stitching that links nothing (~11x the objects) or everything fails it.
    n_true = len(np.unique(gt)) - 1
    assert abs(int(out.max()) - n_true) <= 0.3 * n_true
    assert int(planes.max()) > 3 * int(out.max())
    assert ap3d >= 0.6 * ap2d
