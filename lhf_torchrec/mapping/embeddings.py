"""Low-dimensional id embeddings, the input of the learned mapping methods.

Two forms are accepted wherever embeddings are:

* a 2-d tensor (or array) ``E`` where row ``i`` is the embedding of raw id ``i``: the weight of a
  full-size table, e.g. ``ebc.embedding_bags["t"].weight`` reduced by :func:`embeddings_from_table`;
* :class:`IdEmbeddings` (ids, vectors) for sparse id spaces, as the learn step
  (:func:`lhf_torchrec.pipeline.steps.learn_model`) gives them.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from lhf_torchrec.mapping.profile import as_id_array


@dataclass(frozen=True)
class IdEmbeddings:
    """Embeddings of a sparse set of ids: ``vectors[i]`` belongs to ``ids[i]`` (ids sorted, unique)."""

    ids: np.ndarray
    vectors: torch.Tensor

    def __post_init__(self) -> None:
        ids = as_id_array(self.ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != ids.size:
            raise ValueError(f"IdEmbeddings: {ids.size} ids but vectors of shape {tuple(self.vectors.shape)}")
        if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            # Not sorted and unique already (sorted is the common case: no copy of ids or vectors then).
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            if np.any(ids[1:] == ids[:-1]):
                raise ValueError("IdEmbeddings: ids must be unique")
            object.__setattr__(self, "vectors", self.vectors[torch.from_numpy(order)])
        object.__setattr__(self, "ids", ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


EmbeddingsLike = Union[IdEmbeddings, torch.Tensor, np.ndarray]

# Ids per chunk of the finiteness check (2^20 x dim floats at a time).
_CHUNK = 1 << 20


def embedding_rows(
    embeddings: EmbeddingsLike,
    ids: np.ndarray,
    table: str = "table",
    *,
    sorted_ids: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """(has, store, rows): which of ``ids`` have an embedding, the matrix holding them (as given: any
    dtype and device), and the row in ``store`` of each id that has one, without gathering the
    vectors (``store[rows]`` are they).

    ``sorted_ids=(all_ids, positions)`` says that ``ids == all_ids[positions]`` for sorted ``all_ids``
    (a profile's ids): when the embeddings are of exactly those ids, an id's row is its position and
    no search is needed. Raises ``ValueError`` naming the table and the id when an embedding is NaN
    or infinite.
    """
    if isinstance(embeddings, IdEmbeddings):
        store = embeddings.vectors.detach()
        known = embeddings.ids
        if known.size == 0:
            return np.zeros(ids.shape, bool), store, np.zeros(0, np.int64)
        if sorted_ids is not None and sorted_ids[0].size == known.size and np.array_equal(sorted_ids[0], known):
            has, rows = np.ones(ids.shape, bool), sorted_ids[1]
        else:
            pos = np.minimum(np.searchsorted(known, ids), known.size - 1)
            has = known[pos] == ids
            rows = pos[has]
    else:
        store = torch.as_tensor(embeddings).detach()
        if store.ndim != 2:
            raise ValueError(f"table '{table}': embeddings must be 2-d (ids x dim), got shape {tuple(store.shape)}")
        has = (ids >= 0) & (ids < store.shape[0])
        rows = ids[has]
    if rows.size >= store.shape[0] // 2 and _all_finite(store):
        return has, store, rows  # the rows are most of the store: one pass in order, not a random gather
    for start in range(0, rows.size, _CHUNK):  # chunks: no copy of all the vectors to check them
        part = store[torch.from_numpy(rows[start:start + _CHUNK])].to(torch.float32)
        finite = torch.isfinite(part).all(dim=1)
        if not bool(finite.all()):
            bad = ids[has][start + int((~finite).nonzero()[0])]
            raise ValueError(f"table '{table}': the embedding of id {bad} is NaN or infinite")
    return has, store, rows


def _all_finite(store: torch.Tensor) -> bool:
    """Whether every value of ``store`` is finite, checked in chunks of rows."""
    return all(bool(torch.isfinite(store[start:start + _CHUNK]).all()) for start in range(0, store.shape[0], _CHUNK))


def embeddings_of(embeddings: EmbeddingsLike, ids: np.ndarray, table: str = "table") -> Tuple[np.ndarray, torch.Tensor]:
    """(has, vectors): which of ``ids`` have an embedding, and those embeddings as float32 on CPU.

    Raises ``ValueError`` naming the table and the id when an embedding is NaN or infinite.
    """
    has, store, rows = embedding_rows(embeddings, ids, table)
    return has, store[torch.from_numpy(rows)].to("cpu", torch.float32)


def embeddings_from_table(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Reduces a trained table (rows x D) to ``dim`` dimensions by PCA; row i stays raw id i.

    The principal axes are the top eigenvectors of the D x D covariance (time and memory linear in
    the number of rows); each axis's sign is fixed by making its largest loading positive, so the
    result is deterministic.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-d, got shape {tuple(weight.shape)}")
    if not 1 <= dim <= weight.shape[1]:
        raise ValueError(f"dim must be in [1, {weight.shape[1]}], got {dim}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or infinite values")
    centered = w - w.mean(dim=0, keepdim=True)
    cov = centered.T @ centered
    _, vecs = torch.linalg.eigh(cov.double())
    axes = vecs[:, -dim:].flip(1).to(torch.float32)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    return centered @ (axes * signs)
