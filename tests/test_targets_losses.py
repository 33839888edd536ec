import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from _synthetic import sparse_annotation, touching_disks
from napari_unet.losses import prior_consistency, weighted_cross_entropy
from napari_unet.targets import (
    BG,
    BOUNDARY,
    IGNORE_INDEX,
    INTERIOR,
    OUTSIDE_CELL,
    border_weights,
    instances_to_annotation,
    make_targets,
)


def test_conventions_unpainted_is_ignored_background_is_one():
    _, labels = touching_disks((128, 128))
    ann = sparse_annotation(labels, 3)
    target, weight = make_targets(ann)
    beside_a_cell = ndi.binary_dilation(ann >= 2) & (ann == 0)
    assert beside_a_cell.any()  # the sparse annotation's cells touch unpainted neighbours
    assert (target[(ann == 0) & ~beside_a_cell] == IGNORE_INDEX).all()
    assert (weight[(ann == 0) & ~beside_a_cell] == 0).all()
    assert (target[ann == 1] == BG).all()
    assert set(np.unique(target[ann >= 2])) == {INTERIOR, BOUNDARY}


def test_unpainted_pixels_next_to_a_painted_cell_are_known_not_interior():
    ann = np.zeros((40, 60), np.int32)
    ann[10:30, 10:30] = 2  # an unpainted neighbour may touch it anywhere
    ann[10:30, 40:50] = 1
    target, weight = make_targets(ann)
    ring = ndi.binary_dilation(ann == 2) & (ann == 0)
    assert (target[ring] == OUTSIDE_CELL).all() and ring.sum() == 4 * 20
    assert (target[~ring & (ann == 0)] == IGNORE_INDEX).all()
    # weighted as painted background (the border term adds nothing with one cell)
    assert (weight[ring] == weight[15, 45]).all() and weight[15, 45] > 0
    # painted background next to a cell stays background
    ann[10:30, 30] = 1
    assert (make_targets(ann)[0][10:30, 30] == BG).all()


def test_outside_cell_loss_penalises_interior_only():
    target = torch.full((1, 1, 3), OUTSIDE_CELL)
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, BG, 0, 0] = logits[0, BOUNDARY, 0, 1] = logits[0, INTERIOR, 0, 2] = 8.0
    per_pixel = [float(weighted_cross_entropy(logits[..., i:i + 1], target[..., i:i + 1],
                                              torch.ones(1, 1, 1))) for i in range(3)]
    # background or boundary: no loss to speak of, either way; interior: -log(2 e^-8)
    assert per_pixel[0] == pytest.approx(per_pixel[1]) and per_pixel[0] < 1e-3
    assert per_pixel[2] == pytest.approx(8 - np.log(2), abs=1e-3)
    logits.requires_grad_(True)
    weighted_cross_entropy(logits, target, torch.ones(1, 1, 3)).backward()
    assert logits.grad[0, INTERIOR, 0, 2] > 0  # pushes interior down


def test_complete_region_makes_unpainted_pixels_background():
    ann = np.zeros((64, 64), np.int32)
    ann[10:20, 10:20] = 2
    complete = np.zeros_like(ann, bool)
    complete[:32] = True
    target, _ = make_targets(ann, complete)
    assert (target[:32][ann[:32] == 0] == BG).all()
    assert (target[32:] == IGNORE_INDEX).all()


def test_touching_cells_get_boundary_and_high_border_weight():
    ann = np.ones((40, 60), np.int32)
    ann[10:30, 10:30] = 2
    ann[10:30, 30:50] = 3  # touches cell 2 along column 29/30
    target, weight = make_targets(ann, w0=10, sigma=5)
    assert (target[15:25, 29:31] == BOUNDARY).all()
    # Pixels between two cells weigh much more than background far from any cell.
    assert weight[15:25, 29:31].mean() > 3 * weight[0, 0]


def test_border_weight_peaks_in_narrow_gaps():
    cells = np.zeros((30, 60), np.int32)
    cells[10:20, 10:28] = 1
    cells[10:20, 31:50] = 2
    w = border_weights(cells, w0=10, sigma=5)
    assert w[15, 29] == pytest.approx(10 * np.exp(-(2 + 2) ** 2 / 50), rel=0.2)
    assert w[15, 29] > 5 * w[0, 59]


def test_bad_annotations_raise_clear_errors():
    with pytest.raises(ValueError, match="integer"):
        make_targets(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="2D"):
        make_targets(np.zeros((2, 8, 8), np.int32))


def test_instances_to_annotation():
    labels = np.array([[0, 1], [2, 0]])
    assert instances_to_annotation(labels).tolist() == [[1, 2], [3, 1]]


def test_loss_ignores_unannotated_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    target = torch.randint(0, 3, (2, 16, 16))
    target[:, :8] = IGNORE_INDEX
    weight = torch.rand(2, 16, 16) + 0.5
    loss = weighted_cross_entropy(logits, target, weight)
    loss.backward()
    assert torch.all(logits.grad[:, :, :8] == 0)
    assert torch.any(logits.grad[:, :, 8:] != 0)
    # Changing predictions where nothing is annotated does not change the loss.
    other = logits.detach().clone()
    other[:, :, :8] = torch.randn(2, 3, 8, 16) * 100
    assert weighted_cross_entropy(other, target, weight).item() == pytest.approx(loss.item())


def test_loss_weights_and_empty_batch():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 5.0  # confident "background"
    target = torch.tensor([[[0, 1], [-1, -1]]])
    w_even = weighted_cross_entropy(logits, target, torch.ones(1, 2, 2))
    w_heavy = weighted_cross_entropy(logits, target, torch.tensor([[[1.0, 9.0], [1, 1]]]))
    assert w_heavy > w_even  # the misclassified pixel counts more
    empty = torch.full((1, 2, 2), IGNORE_INDEX)
    assert weighted_cross_entropy(logits, empty, torch.ones(1, 2, 2)).item() == 0.0


def test_prior_consistency_acts_on_unannotated_pixels_only():
    torch.manual_seed(0)
    prior = torch.randn(2, 3, 8, 8)
    target = torch.full((2, 8, 8), IGNORE_INDEX)
    target[:, :4] = BG
    assert float(prior_consistency(prior.clone(), prior, target)) == pytest.approx(0, abs=1e-6)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = prior_consistency(logits, prior, target)
    assert loss.item() > 0
    loss.backward()
    assert (logits.grad[:, :, :4] == 0).all() and (logits.grad[:, :, 4:] != 0).any()
    full = torch.zeros((2, 8, 8), dtype=torch.long)
    assert float(prior_consistency(logits, prior, full)) == 0
