"""Low-dimensional id embeddings, the input of the learned mapping methods.

Two forms are accepted wherever embeddings are:

* a 2-d tensor (or array) ``E`` where row ``i`` is the embedding of raw id ``i``: the weight of a
  full-size table, e.g. ``ebc.embedding_bags["t"].weight`` reduced by :func:`embeddings_from_table`;
* :class:`IdEmbeddings` (ids, vectors) for sparse id spaces, as :func:`lhf_torchrec.learn_embeddings`
  returns them.
"""

from dataclasses import dataclass
from typing import Tuple, Union

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
        order = np.argsort(ids, kind="stable")
        if ids.size > 1 and np.any(np.diff(ids[order]) == 0):
            raise ValueError("IdEmbeddings: ids must be unique")
        object.__setattr__(self, "ids", ids[order])
        object.__setattr__(self, "vectors", self.vectors[torch.from_numpy(order)] if ids.size else self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


EmbeddingsLike = Union[IdEmbeddings, torch.Tensor, np.ndarray]


def embeddings_of(embeddings: EmbeddingsLike, ids: np.ndarray, table: str = "table") -> Tuple[np.ndarray, torch.Tensor]:
    """(has, vectors): which of ``ids`` have an embedding, and those embeddings as float32 on CPU.

    Raises ``ValueError`` naming the table and the id when an embedding is NaN or infinite.
    """
    if isinstance(embeddings, IdEmbeddings):
        if embeddings.ids.size == 0:
            return np.zeros(ids.shape, bool), embeddings.vectors.new_zeros((0, embeddings.dim))
        pos = np.minimum(np.searchsorted(embeddings.ids, ids), embeddings.ids.size - 1)
        has = embeddings.ids[pos] == ids
        vectors = embeddings.vectors.detach()[torch.from_numpy(pos[has])]
    else:
        table_weight = torch.as_tensor(embeddings).detach()
        if table_weight.ndim != 2:
            raise ValueError(f"table '{table}': embeddings must be 2-d (ids x dim), got shape {tuple(table_weight.shape)}")
        has = (ids >= 0) & (ids < table_weight.shape[0])
        vectors = table_weight[torch.from_numpy(ids[has])]
    vectors = vectors.to("cpu", torch.float32)
    finite = torch.isfinite(vectors).all(dim=1)
    if not bool(finite.all()):
        bad = ids[has][int((~finite).nonzero()[0])]
        raise ValueError(f"table '{table}': the embedding of id {bad} is NaN or infinite")
    return has, vectors


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
