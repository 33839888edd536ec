"""Huge planes block by block (issue 10 item 6): same labels as the whole plane, no object
split or duplicated at block borders, only windows read from a lazy plane."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_unet.blocks import needs_blocks, segment_plane_blocks
from napari_unet.model import ModelConfig, UNet, load_model
from napari_unet.postprocess import PostprocessConfig, labels_from_probs
from napari_unet.segment import InferenceConfig, Predictor
from napari_unet.tiling import drain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pointwise(Predictor):
    """Class probabilities from each pixel's own intensity: no context at all, so blocks and
    the whole plane must give exactly the same probabilities (up to blending rounding)."""

    def __call__(self, batch: torch.Tensor, channels=None) -> torch.Tensor:
        x = batch[:, :1].float()
        fg = torch.sigmoid(20 * (x - 0.25))
        core = torch.sigmoid(20 * (x - 0.6))
        maps = torch.cat([1 - fg, fg * core, fg * (1 - core)], dim=1)
        return maps if channels is None else maps[:, list(channels)]


def blobs(shape: tuple[int, int], n: int, seed: int = 0) -> np.ndarray:
    """Bright Gaussian nuclei (radius ~6-10 px, some touching) on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape, np.float32)
    for y, x, s in zip(rng.uniform(0, shape[0], n), rng.uniform(0, shape[1], n),
                       rng.uniform(3, 5, n), strict=True):
        img = np.maximum(img, np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s)))
    return (img * 200 + 10).astype(np.uint8)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered by first appearance in raster order: equal iff same partition."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = np.argsort(first)
    lut = np.zeros(int(ids.max()) + 1, np.int64)
    fg = ids[order] > 0
    lut[ids[order][fg]] = np.arange(1, fg.sum() + 1)
    return lut[labels]


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_blocks_equal_the_whole_plane_and_never_split_objects(model):
    plane = blobs((300, 340), 220, seed=1)
    pred = Pointwise(model, InferenceConfig(tile=64, overlap=32, margin=8, device="cpu"))
    post = PostprocessConfig()
    whole = labels_from_probs(pred.predict(plane), post)
    assert whole.max() > 100
    steps = list(_iter(segment_plane_blocks(plane, pred, post, block=64, halo=32)))
    got, last = steps[-1]
    assert last.fraction == 1.0 and last.cut_objects == 0
    # 30 blocks, >100 objects crossing block borders: identical partition.
    crossing = {int(v) for k in range(64, 340, 64) for v in np.unique(whole[:, k - 1 : k + 1])}
    assert len(crossing) > 30
    np.testing.assert_array_equal(canonical(got), canonical(whole))
    # Lazy input (zarr, read by window) and an on-disk output give the same.
    src = zarr.create_array(store={}, shape=plane.shape, dtype=plane.dtype, chunks=(50, 50))
    src[:] = plane
    out = zarr.create_array(store={}, shape=plane.shape, dtype=np.int32, chunks=(64, 64))
    drain(segment_plane_blocks(src, pred, post, block=64, halo=32, out=out))
    np.testing.assert_array_equal(canonical(out[:]), canonical(whole))
    # Semantic classes: simply the cores.
    sem = PostprocessConfig(mode="semantic")
    np.testing.assert_array_equal(drain(segment_plane_blocks(plane, pred, sem, 64, 32)),
                                  labels_from_probs(pred.predict(plane), sem))


def test_too_small_a_halo_is_reported_not_silent(model):
    plane = blobs((200, 200), 120, seed=2)
    pred = Pointwise(model, InferenceConfig(tile=64, overlap=32, margin=8, device="cpu"))
    last = list(segment_plane_blocks(plane, pred, block=50, halo=2))[-1]
    assert last.cut_objects > 0


def test_real_model_matches_whole_plane_away_from_block_borders(model):
    from napari_unet.sample import load_sample

    plane = np.pad(load_sample()[0], ((0, 200), (0, 150)), mode="reflect")  # 456 x 406
    pred = Predictor(model, InferenceConfig(device="cpu"))
    whole = labels_from_probs(pred.predict(plane), PostprocessConfig())
    got = drain(segment_plane_blocks(plane, pred, block=160, halo=96))
    # Tiles sit elsewhere than in the whole plane, so probabilities differ by rounding:
    # every whole-plane object must be found again (IoU > 0.9), border-crossing ones too.
    ious = []
    for i in range(1, whole.max() + 1):
        m = whole == i
        ids, counts = np.unique(got[m], return_counts=True)
        j = ids[np.argmax(counts)]
        ious.append(0 if j == 0 else (m & (got == j)).sum() / (m | (got == j)).sum())
    ious = np.array(ious)
    assert whole.max() > 20 and (ious > 0.9).mean() > 0.97, np.sort(ious)[:10]


def test_needs_blocks():
    assert needs_blocks((12000, 12000)) and not needs_blocks((2, 2048, 2048))


def _iter(gen):
    """(labels so far, progress) pairs; the last one holds the result."""
    last = None
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            yield stop.value, last
            return
        last = p


def test_segment_image_takes_planes_over_the_budget_block_by_block(monkeypatch):
    """The engine's stack loop (CLI, batch runner, widgets) sends a plane larger than the
    memory budget through the blocks path, with the same objects as the whole-plane path."""
    from napari_unet import blocks as blocks_mod
    from napari_unet.evaluate import evaluate_pair
    from napari_unet.segment import segment_image

    image = blobs((300, 300), 40, seed=3)
    predictor = Pointwise(UNet(ModelConfig(depth=3, base_channels=8)),
                          InferenceConfig(tile=64, overlap=32, device="cpu"))
    whole = drain(segment_image(image, predictor))
    calls = []
    real = blocks_mod.segment_plane_blocks

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, block=128, halo=48, **{k: v for k, v in kwargs.items()
                                                 if k not in ("block", "halo")})

    monkeypatch.setattr(blocks_mod, "PLANE_BUDGET_PIXELS", 200 * 200)
    monkeypatch.setattr(blocks_mod, "segment_plane_blocks", spy)
    blocked = drain(segment_image(image, predictor))
    assert calls == [(300, 300)]
    assert evaluate_pair(blocked, whole)["ap"] > 0.95


def test_cli_writes_a_plane_over_the_budget_block_by_block_into_its_store(tmp_path,
                                                                          monkeypatch):
    """The batch runner streams a huge plane's labels into the output store block by block
    (no whole-plane label array), with the same objects as the in-memory path."""
    import tifffile

    from napari_unet import blocks as blocks_mod
    from napari_unet.cli import main
    from napari_unet.evaluate import evaluate_pair
    from napari_unet.model import save_model

    image = blobs((300, 300), 40, seed=4)
    src = tmp_path / "plane.tif"
    tifffile.imwrite(src, image)
    model_file = save_model(load_model(), tmp_path / "m.safetensors")
    argv = [str(src), "--model", str(model_file), "--tile", "128", "--overlap", "32"]
    assert main(["segment", *argv, "-o", str(tmp_path / "whole.tif")]) == 0
    monkeypatch.setattr(blocks_mod, "PLANE_BUDGET_PIXELS", 200 * 200)
    monkeypatch.setattr(blocks_mod, "DEFAULT_BLOCK", 128)
    calls = []
    real = blocks_mod.segment_plane_blocks

    def spy(plane, predictor, post, **kwargs):
        calls.append(type(kwargs.get("out")).__name__)
        return real(plane, predictor, post, block=128, halo=48, **kwargs)

    monkeypatch.setattr(blocks_mod, "segment_plane_blocks", spy)
    assert main(["segment", *argv, "-o", str(tmp_path / "blocks.tif")]) == 0
    assert calls == ["_StoreWindow"]
    whole, blocked = (tifffile.imread(tmp_path / f"{n}.tif") for n in ("whole", "blocks"))
    assert blocked.max() > 10 and evaluate_pair(blocked, whole)["ap"] > 0.9
