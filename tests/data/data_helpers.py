"""Slow reference implementations and small data shared by the data-layer tests."""

import numpy as np

from lhf_torchrec.data import CTRData


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (no ties in continuous scores)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    n_pos = pos.sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos)))


def reference_kjt(data: CTRData) -> tuple[list[int], list[int]]:
    """(values, lengths) of a KJT built the slow way: feature by feature, row by row, column by column."""
    values, lengths = [], []
    for name in data.feature_names:
        columns = data.multi_valued[name] if name in data.multi_valued else [data.sparse_names.index(name)]
        for row in data.sparse.tolist():
            ids = [row[c] for c in sorted(columns) if row[c] != -1]
            values += ids
            lengths.append(len(ids))
    return values, lengths


def random_ctr_data(rng: np.random.Generator, n: int, multi_valued: bool = True) -> CTRData:
    """Small CTRData with missing values and (optionally) a 3-column multi-valued feature."""
    sparse = rng.integers(0, 50, size=(n, 5))
    sparse[rng.random(sparse.shape) < 0.3] = -1
    return CTRData(
        dense=rng.standard_normal((n, 2)).astype(np.float32),
        sparse=sparse,
        labels=(rng.random(n) < 0.3).astype(np.float32),
        dense_names=["d0", "d1"],
        sparse_names=["a", "t0", "b", "t1", "t2"],
        multi_valued={"tags": [1, 3, 4]} if multi_valued else {},
    )
