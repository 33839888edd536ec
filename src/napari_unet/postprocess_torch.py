"""Instance post-processing in torch, on the device that holds the maps.

The same seeded watershed as :func:`napari_unet.postprocess.instances_from_probs` (the
scikit-image reference and the CPU default), built from whole-image tensor operations so a
GPU segments a plane without copying its maps to the host: only the int32 labels come back.

- smoothing: scipy's ``gaussian_filter`` (truncate 4.0, mode "reflect"), separable, as
  float32 multiply-adds of shifted views (no convolution: cuDNN's TF32 would round the
  surface before it is thresholded);
- connected components (4-connectivity, as ``ndimage.label``): hooking and pointer jumping
  over the mask's edges, rounds growing with the log of a component's size; ids follow the
  first pixel in raster order, as ``ndimage.label`` numbers them;
- the watershed: a synchronous Bellman-Ford on the minimax ("flooding") order. A pixel is
  flooded from the neighbour the priority flood would pop first: the highest bottleneck
  level of its path from a seed, then the fewest steps on that level (scikit-image's
  first-in-first-out order on plateaus), then the larger seed id. The three are packed into
  one int64 key so a sweep is one max over the four neighbours of the pixels to flood;
- sizes by ``bincount``; holes: background components cut off from the plane border by one
  label (the lowest, as the per-object fill of the reference gives them); relabelling by a
  cumulative sum (keeps the order, as ``relabel_sequential``).
"""

from __future__ import annotations

import numpy as np
import torch

from .postprocess import DISTANCE, N_CLASSES, PostprocessConfig
from .targets import BG, INTERIOR

# Host syncs (convergence checks) only every this many sweeps: a sweep is cheap on a GPU and
# a sync stalls the queue.
_CHECK_EVERY = 4
# Bits of the flooding key: the bottleneck level (float32 bits of a value in [0, 1] fit
# in 30) sits above bit 33; the step count and the seed id share the 33 bits below.
_LEVEL_SHIFT = 33


def resolve_post_device(setting: str, device: torch.device) -> bool:
    """Whether instance post-processing runs on ``device`` (True) or on the host's CPU.

    ``auto``: on CUDA and MPS; on a CPU the scikit-image path is the faster one.
    """
    if setting == "device":
        return True
    if setting == "cpu":
        return False
    if setting == "auto":
        return device.type in ("cuda", "mps")
    raise ValueError(f"post_device must be 'auto', 'cpu' or 'device', got {setting!r}")


def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma)`` of an (H, W) float32 tensor."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return x
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (sigma * sigma) * taps**2)
    weights = (weights / weights.sum()).astype(np.float32).tolist()
    for axis in (0, 1):
        n = x.shape[axis]
        # scipy's "reflect" (d c b a | a b c d | d c b a), for any radius: fold the index
        # into one period of 2n.
        i = torch.arange(-radius, n + radius, device=x.device) % (2 * n)
        i = torch.where(i >= n, 2 * n - 1 - i, i)
        padded = x.index_select(axis, i)
        out = padded.narrow(axis, 0, n) * weights[0]
        for k in range(1, 2 * radius + 1):
            out.add_(padded.narrow(axis, k, n), alpha=weights[k])  # one kernel per tap
        x = out
    return x


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of an (H, W) bool mask: int64, 0 outside, else 1 + the flat
    index of the component's first pixel in raster order (so ids sort as ``ndimage.label``
    numbers them).

    Hooking and pointer jumping (Shiloach-Vishkin): every pixel points to a pixel of its
    component with a smaller or equal index; each round, across every edge whose ends point
    to different pixels, the larger pointer is hooked to the smaller (a scatter-min, so the
    result does not depend on the order), then paths are halved. Rounds grow with the log
    of the component size, not with its diameter.
    """
    h, w = mask.shape
    n = h * w
    index = torch.arange(n, device=mask.device, dtype=torch.int64)
    grid = index.view(h, w)
    # The mask's edges, listed once (one host sync each): later rounds touch only them.
    right = grid[:, :-1][mask[:, :-1] & mask[:, 1:]]
    down = grid[:-1][mask[:-1] & mask[1:]]
    a_end, b_end = torch.cat([right, down]), torch.cat([right + 1, down + w])
    parent = index.clone()
    rounds = 0
    while a_end.numel():
        a, b = parent[a_end], parent[b_end]
        if rounds % 2 == 0 and not bool((a != b).any()):
            break
        parent.scatter_reduce_(0, torch.maximum(a, b), torch.minimum(a, b), "amin")
        parent = parent[parent[parent]]
        rounds += 1
    while True:  # full compression: every pixel points to its root
        nxt = parent[parent]
        if not bool((nxt != parent).any()):
            break
        parent = nxt[nxt]
    return torch.where(mask, parent.view(h, w) + 1, 0)


def _compact(ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Renumber ``ids`` (0 = none) to 1..n keeping their order; ids with ``keep[id]`` False
    become 0. Returns the new ids and n."""
    keep = keep.clone()
    keep[0] = False
    new = torch.cumsum(keep, 0)
    new = torch.where(keep, new, 0)
    return new[ids], int(new.max()) if new.numel() else 0


def _seeds(core: torch.Tensor, min_seed_size: int) -> tuple[torch.Tensor, int]:
    """Seeds numbered 1..n in raster order of their first pixel (as ``ndimage.label``)."""
    cc = connected_components(core)
    counts = torch.bincount(cc.view(-1), minlength=core.numel() + 1)
    keep = counts >= max(min_seed_size, 1)
    return _compact(cc, keep)


def flood(surface: torch.Tensor, seeds: torch.Tensor, n_seeds: int,
          mask: torch.Tensor) -> torch.Tensor:
    """Seeded watershed of ``-surface`` restricted to ``mask`` (4-connectivity).

    ``surface`` (H, W) float32 in [0, 1]; ``seeds`` int64 ids 1..``n_seeds``, 0 elsewhere.
    Returns int64 labels; mask pixels no seed reaches stay 0 (as scikit-image's).
    """
    label_bits = max(1, n_seeds.bit_length())
    step_bits = _LEVEL_SHIFT - label_bits
    if step_bits < 4:
        raise ValueError(f"{n_seeds} seeds are too many for the device watershed; use "
                         "post_device='cpu'")
    label_mask = (1 << label_bits) - 1
    steps_max = (1 << step_bits) - 1
    h, w = mask.shape
    n = h * w
    level = surface.clamp(0, 1).contiguous().view(torch.int32).to(torch.int64).view(-1)
    # The step field counts down from steps_max so that fewer steps is a larger key.
    fresh = (level << _LEVEL_SHIFT) | (steps_max << label_bits)
    # Flat keys with one extra slot, always 0, that stands for "off the plane".
    key = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    key[:n] = torch.where(seeds.view(-1) > 0, fresh | seeds.view(-1), 0)
    # Only the pixels to flood are swept (a band around each seed), by their own index and
    # their 4 neighbours': a sweep costs the band, not the plane.
    free = (mask & (seeds == 0)).view(-1).nonzero().squeeze(1)
    y, x = free // w, free % w
    neighbours = torch.stack([torch.where(y > 0, free - w, n), torch.where(y < h - 1, free + w, n),
                              torch.where(x > 0, free - 1, n), torch.where(x < w - 1, free + 1, n)])
    level, fresh = level[free], fresh[free]
    current = key[free]
    one_step = 1 << label_bits
    while free.numel():
        for _ in range(_CHECK_EVERY):
            best = key[neighbours].amax(0)
            # Reached below the path's bottleneck: this pixel is the new bottleneck, 0 steps
            # on it; else one more step on the same level (saturating). An unreached
            # neighbourhood (best 0) stays 0.
            steps = (best >> label_bits) & steps_max
            cand = torch.where((best >> _LEVEL_SHIFT) > level, fresh | (best & label_mask),
                               best - torch.where(steps > 0, one_step, 0))
            key[free] = cand
            changed = cand != current
            current = cand
        if not bool(changed.any()):
            break
    return (key[:n] & label_mask).view(h, w)


def fill_holes(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Fill each object's holes as ``postprocess._fill_holes`` does (4-connectivity): the
    background pixels that no path avoiding the object links to the plane border, given to
    the lowest such object.

    On the device: a background component away from the border with one label around it is
    that label's hole. Components with several labels around them (a small object inside a
    nucleus's hole) are decided on the host on the (small) graph of regions.
    """
    h, w = labels.shape
    bg = labels == 0
    cc = connected_components(bg)
    comp, n_comp = _compact(cc, torch.bincount(cc.view(-1), minlength=h * w + 1) > 0)
    touches = torch.zeros(n_comp + 1, dtype=torch.bool, device=labels.device)
    for edge in (comp[0], comp[-1], comp[:, 0], comp[:, -1]):
        touches[edge] = True
    big = torch.iinfo(torch.int64).max
    lo = torch.full((n_comp + 1,), big, dtype=torch.int64, device=labels.device)
    hi = torch.zeros(n_comp + 1, dtype=torch.int64, device=labels.device)
    target = comp.view(-1)  # labelled pixels are 0 there: they only touch slot 0
    for direction in range(4):
        nb = _shifted(labels, direction, 0).view(-1)
        lo.scatter_reduce_(0, target, torch.where(nb > 0, nb, big), "amin")
        hi.scatter_reduce_(0, target, nb, "amax")
    inner = ~touches & (hi > 0)
    table = torch.where(inner & (lo == hi), hi, 0)
    several = inner & (lo != hi)
    if bool(several.any()):
        table = torch.where(several, _enclosing(labels, comp, n_comp, n_labels, touches,
                                                several), table)
    return torch.where(bg, table[comp], labels)


def _enclosing(labels: torch.Tensor, comp: torch.Tensor, n_comp: int, n_labels: int,
               touches: torch.Tensor, several: torch.Tensor) -> torch.Tensor:
    """For background components bordering several labels: the lowest label that cuts them
    off from the plane border (0: none), from the region adjacency graph on the host."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as graph_components

    stride = n_labels + 1
    bg = labels == 0
    pairs, links = [], []
    for direction in range(4):
        nb = _shifted(labels, direction, 0)
        at = bg & (nb > 0)
        pairs.append(comp[at] * stride + nb[at])
        if direction in (1, 3):  # each label-label contact once
            at = (labels > 0) & (nb > 0) & (labels != nb)
            links.append(labels[at] * stride + nb[at])
    pairs_h = torch.unique(torch.cat(pairs)).cpu().numpy()
    links_h = torch.unique(torch.cat(links)).cpu().numpy()
    rim = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    rim_h = torch.unique(rim[rim > 0]).cpu().numpy()
    touches_h, several_h = touches.cpu().numpy(), several.cpu().numpy()
    # Nodes: 0 the border (with every component touching it), 1..n_comp the other
    # components, n_comp + label the labels.
    pc, pl = pairs_h // stride, pairs_h % stride
    src = np.concatenate([np.where(touches_h[pc], 0, pc), links_h // stride + n_comp,
                          np.zeros(len(rim_h), np.int64)])
    dst = np.concatenate([pl + n_comp, links_h % stride + n_comp, rim_h + n_comp])
    n_nodes = n_comp + n_labels + 1
    # Most such components are gaps between touching cells, open to the outside through
    # them. Necessary for a label A to cut a component off: every other label around it
    # is off the outside background (no component touching the border, not on the
    # border). Only the candidates that pass get the exact test on the graph.
    outside = np.zeros(n_labels + 1, bool)
    outside[pl[touches_h[pc]]] = True
    outside[rim_h] = True
    around = several_h[pc]
    n_outside = np.bincount(pc[around & outside[pl]], minlength=n_comp + 1)
    # A candidate pair (component, A): A is the one outside label around it, or any
    # label around it when none is outside.
    cand = around & (n_outside[pc] <= 1) & (outside[pl] | (n_outside[pc] == 0))
    out = np.zeros(n_comp + 1, np.int64)
    for a in np.unique(pl[cand]):  # ascending: the lowest enclosing label wins
        keep = (src != a + n_comp) & (dst != a + n_comp)
        graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (src[keep], dst[keep])),
                           shape=(n_nodes, n_nodes))
        _, part = graph_components(graph, directed=False)
        mine = np.unique(pc[cand & (pl == a)])
        cut = mine[(part[mine] != part[0]) & (out[mine] == 0)]
        out[cut] = a
    return torch.from_numpy(out).to(labels.device)


def _shifted(x: torch.Tensor, direction: int, fill: int) -> torch.Tensor:
    """Each pixel's neighbour above, below, left or right (``fill`` off the plane)."""
    out = torch.full_like(x, fill)
    if direction == 0:
        out[1:] = x[:-1]
    elif direction == 1:
        out[:-1] = x[1:]
    elif direction == 2:
        out[:, 1:] = x[:, :-1]
    else:
        out[:, :-1] = x[:, 1:]
    return out


@torch.inference_mode()
def instances_from_maps(background: torch.Tensor, interior: torch.Tensor,
                        distance: torch.Tensor | None = None,
                        config: PostprocessConfig | None = None) -> np.ndarray:
    """The seeded watershed of :func:`postprocess.instances_from_probs` on (H, W) maps on
    any torch device: P(background), P(interior), the distance map if the model has one.

    Returns int32 labels 1..N on the host, numbered as the reference numbers them.
    """
    c = config or PostprocessConfig()
    has_distance = distance is not None
    seeds = c.seeds if c.seeds != "auto" else ("mix" if has_distance else "interior")
    if seeds != "interior" and not has_distance:
        raise ValueError(f"seeds={seeds!r} needs a model with a distance output; use 'auto'")
    interior = interior.float()
    if seeds == "interior":
        surface, level = interior, c.seed_threshold
    else:
        dist = distance.float()  # type: ignore[union-attr]
        surface = dist if seeds == "distance" else 0.5 * (interior + dist)
        level = c.distance_threshold
    if c.smooth_sigma > 0:
        surface = gaussian_smooth(surface, c.smooth_sigma)
    mask = (1.0 - background.float()) > c.foreground_threshold
    if mask.numel() == 0:
        return np.zeros(tuple(mask.shape), np.int32)
    seed_ids, n_seeds = _seeds((surface > level) & mask, c.min_seed_size)
    if n_seeds == 0:
        return np.zeros(tuple(mask.shape), np.int32)
    labels = flood(surface, seed_ids, n_seeds, mask)
    if c.min_size > 1:
        counts = torch.bincount(labels.view(-1), minlength=n_seeds + 1)
        labels = torch.where((counts >= c.min_size)[labels], labels, 0)
    if c.fill_holes:
        labels = fill_holes(labels, n_seeds)
    present = torch.bincount(labels.view(-1), minlength=n_seeds + 1) > 0
    labels, _ = _compact(labels, present)
    return labels.to(torch.int32).cpu().numpy()


def instances_from_probs_torch(probs: torch.Tensor,
                               config: PostprocessConfig | None = None) -> np.ndarray:
    """:func:`postprocess.instances_from_probs` of a (3, H, W) or (4, H, W) tensor."""
    if probs.ndim != 3 or probs.shape[0] not in (N_CLASSES, N_CLASSES + 1):
        raise ValueError(
            f"expected (3, H, W) class probabilities or (4, H, W) with a distance map, got "
            f"shape {tuple(probs.shape)}")
    distance = probs[DISTANCE] if probs.shape[0] > DISTANCE else None
    return instances_from_maps(probs[BG], probs[INTERIOR], distance, config)


__all__ = ["connected_components", "fill_holes", "flood", "gaussian_smooth",
           "instances_from_maps", "instances_from_probs_torch", "resolve_post_device"]
