"""Frequency-weighted k-means in torch, flat for small problems and hierarchical for large ones.

Clustering is what makes ids that the model sees as similar share a row, so its objective is the
access-weighted quantization error ``sum_i w_i ||x_i - c(i)||^2`` (w_i = access count): a popular
id moved far from its embedding costs more than a rare one.

``n * k`` distances per Lloyd step do not fit for 10M ids into 1M rows, so :func:`cluster` goes
hierarchical: a coarse k-means into a few cells (fitted on a sample), then each cell gets a
share of the k clusters proportional to its weighted error (the allocation that minimizes the total
error when every cell's error falls at the same rate with more clusters) and is clustered the same
way, down to cells small enough for a flat k-means. Runs on any device torch runs on.

Memory: the points may be given as rows of a larger matrix (``rows``), e.g. the embedding table
itself, so the n x d matrix of points to cluster is never copied whole (only sample, block and
cell by cell); labels are int32. For 1e8 points that saves 3.2 GB (d = 8) and 0.4 GB.
"""

import math
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm


# Largest distance block (rows x centers) computed at once: 2^24 floats = 64 MiB.
_BLOCK = 1 << 24
# Points per chunk where a pass over all points would otherwise make n-sized temporaries; small enough
# for a chunk's gathered points to stay in cache (1M-point chunks took 2.5x longer at 1e7 points).
_CHUNK = 1 << 16


def _weighted_sample(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices, drawn with probability proportional to weight (Efraimidis-Spirakis)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    keys = torch.log(u.clamp_min(1e-300)) / weights.to(torch.float64).clamp_min(1e-12)
    return torch.topk(keys, k).indices


def _points(x: torch.Tensor, rows: Optional[torch.Tensor], which) -> torch.Tensor:
    """Points ``which`` (a slice or an index) of ``x``, or of ``x[rows]`` without gathering all of it."""
    return x[which] if rows is None else x[rows[which]]


def assign(x: torch.Tensor, centers: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest center (int32) of every point and the squared distance to it, in blocks.

    The points are the rows of ``x``, or ``x[rows]`` (gathered one block at a time).
    """
    n = x.shape[0] if rows is None else rows.shape[0]
    center_sq = (centers * centers).sum(1)
    step = max(1, _BLOCK // max(1, centers.shape[0]))
    if n <= step:  # one block (every leaf of the hierarchy): no preallocated outputs to copy into
        block = _points(x, rows, slice(None))
        best, idx = torch.addmm(center_sq, block, centers.T, beta=1.0, alpha=-2.0).min(dim=1)
        return idx.to(torch.int32), (best + (block * block).sum(1)).clamp_min_(0)
    labels = torch.empty(n, dtype=torch.int32, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        block = _points(x, rows, slice(start, start + step))
        d = torch.addmm(center_sq, block, centers.T, beta=1.0, alpha=-2.0)
        best, idx = d.min(dim=1)
        labels[start:start + step] = idx
        dist[start:start + step] = (best + (block * block).sum(1)).clamp_min_(0)
    return labels, dist


def weighted_kmeans(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    n_iter: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on weighted points. Returns (centers (k, d), labels (n,) int32).

    Seeds are k distinct points drawn by weight; a cluster that empties is re-seeded with the point
    that contributes most to the error.
    """
    n = x.shape[0]
    if k >= n:
        return x.clone(), torch.arange(n, dtype=torch.int32, device=x.device)
    w = weights.to(x.dtype)
    weighted_x = x * w[:, None]
    centers = x[_weighted_sample(weights, k, generator)].clone()
    labels = torch.full((n,), -1, dtype=torch.int32, device=x.device)
    for _ in range(n_iter):
        new_labels, dist = assign(x, centers)
        changed = (new_labels != labels).sum().item()
        labels = new_labels
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
        sums = torch.zeros_like(centers).index_add_(0, labels, weighted_x)
        empty = (mass <= 0).nonzero().squeeze(1)
        centers = sums / mass.clamp_min(1e-12)[:, None]
        if empty.numel():
            # Points are taken from distinct clusters' worst offenders; their labels move with them.
            worst = torch.topk(dist * w, empty.numel()).indices
            centers[empty] = x[worst]
            labels[worst] = empty.to(labels.dtype)
        if changed <= tol * n and empty.numel() == 0:
            break
    return centers, labels


def _allocate(errors: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Integer shares of k, proportional to ``errors``, each in [1, size]: water-filling."""
    sizes = sizes.cpu()
    share = (sizes > 0).to(torch.int64)
    remaining = k - int(share.sum())
    errors = errors.double().clamp_min(1e-30).cpu()
    while remaining > 0:
        open_ = share < sizes
        if not open_.any():
            break
        ideal = torch.where(open_, errors / errors[open_].sum() * remaining, torch.zeros_like(errors))
        add = torch.minimum(ideal.floor().to(torch.int64), sizes - share)
        if add.sum() == 0:
            # Fewer than one whole cluster per open cell is left: give them to the largest remainders.
            order = torch.argsort(torch.where(open_, ideal - ideal.floor(), torch.full_like(ideal, -1.0)), descending=True)
            add = torch.zeros_like(share)
            add[order[:remaining]] = 1
            add = torch.minimum(add, sizes - share)
        share += add
        remaining -= int(add.sum())
    return share


def cluster(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_iter: int = 20,
    max_branching: int = 128,
    sample_per_cell: int = 256,
    progress: bool = True,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cluster labels (int32) in ``[0, min(k, n))`` for every point; flat or hierarchical by problem size.

    The points are the rows of ``x``, or ``x[rows]`` when ``rows`` is given (never gathered whole).
    """
    n = x.shape[0] if rows is None else rows.shape[0]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    bar = tqdm(total=n, desc="k-means", unit="id", disable=not progress, leave=False, delay=2.0)
    try:
        return _cluster(x, rows, weights, k, n_iter, max_branching, sample_per_cell, generator, bar)
    finally:
        bar.close()


def _cluster(x, rows, weights, k, n_iter, max_branching, sample_per_cell, generator, bar) -> torch.Tensor:
    n = x.shape[0] if rows is None else rows.shape[0]
    if k >= n or k <= max_branching:
        labels = weighted_kmeans(_points(x, rows, slice(None)), weights, k, n_iter=n_iter, generator=generator)[1]
        bar.update(n)
        return labels
    # A Lloyd step costs n x k distances: instead split into `cells` coarse cells, share k among them
    # by their weighted error, and cluster each cell the same way. With L = ceil(log k / log
    # max_branching) levels of k^(1/L) cells each, every level costs about n x k^(1/L) distances.
    levels = math.ceil(math.log(k) / math.log(max_branching))
    cells = math.ceil(k ** (1.0 / levels))
    sample = min(n, cells * sample_per_cell)
    picked = torch.randperm(n, generator=generator, device=x.device)[:sample]
    coarse, _ = weighted_kmeans(_points(x, rows, picked), weights[picked], cells, n_iter=n_iter, generator=generator)
    cell_of, dist = assign(x, coarse, rows)
    cell_error = torch.zeros(cells, dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK):  # chunks in order: the same sums as one pass, without n-sized temporaries
        part = slice(start, start + _CHUNK)
        cell_error.index_add_(0, cell_of[part], (dist[part] * weights[part].to(x.dtype)).double())
    del dist
    cell_size = torch.bincount(cell_of, minlength=cells)
    share = _allocate(cell_error, cell_size, k)

    labels = torch.empty(n, dtype=torch.int32, device=x.device)
    order = torch.argsort(cell_of, stable=True)
    del cell_of
    bounds = [0] + torch.cumsum(cell_size, 0).tolist()
    first_label = 0
    for cell in range(cells):
        members = order[bounds[cell]:bounds[cell + 1]]
        if members.numel() == 0:
            continue
        kc = int(share[cell])
        local = _cluster(_points(x, rows, members), None, weights[members], kc, n_iter, max_branching,
                         sample_per_cell, generator, bar)
        labels[members] = first_label + local
        first_label += min(kc, members.numel())
    return labels


def cluster_centers(
    x: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, k: int, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Weighted mean of each cluster (rows of clusters without members are zero); points as in :func:`cluster`."""
    w = weights.to(x.dtype)
    mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, labels.shape[0], _CHUNK):  # in order: the same sums as one pass
        part = slice(start, start + _CHUNK)
        sums.index_add_(0, labels[part], _points(x, rows, part) * w[part, None])
    return sums / mass.clamp_min(1e-12)[:, None]
