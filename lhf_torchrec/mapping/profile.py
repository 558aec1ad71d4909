"""Access profiles: how often each raw id of a feature was looked up in historical data.

Two kinds, one type (:class:`IdProfile`):

* exact: every distinct id with its count; memory 16 bytes per distinct id;
* heavy hitters (``capacity=k``): a Misra-Gries summary that keeps at most ``k`` counters
  (16 bytes each, plus the chunk being merged) however long the stream. Every reported count
  is a lower bound of the true count and undercounts by at most ``error_bound``, which is at
  most N / (k + 1) for N accesses (Misra and Gries, 1982; merging two summaries keeps the
  bound, Agarwal et al., "Mergeable Summaries", 2012). Any id with more than N / (k + 1)
  accesses is guaranteed to be kept.

Profiles are numpy (no torch needed) and merge associatively, so shards of data or workers can
be profiled separately and combined with :meth:`IdProfile.merge`.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Union

import numpy as np
import torch

IdArray = Union[np.ndarray, torch.Tensor]


def as_id_array(ids: IdArray, table: str = "table") -> np.ndarray:
    """Validates raw ids (numpy or torch, any integer dtype) and returns a flat int64 numpy array."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"table '{table}': ids must be integers, got a tensor of dtype {ids.dtype}")
        ids = ids.detach().to("cpu", torch.int64).numpy()
    else:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"table '{table}': ids must be integers, got an array of dtype {ids.dtype}")
        if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"table '{table}': uint64 id {ids.max()} does not fit in int64")
    return ids.reshape(-1).astype(np.int64, copy=False)


@dataclass(frozen=True)
class IdProfile:
    """Access counts of one feature (or table): sorted unique ``ids`` and their ``counts``.

    ``total`` counts every access seen, including those of ids a heavy-hitter summary dropped.
    ``capacity`` is None for exact profiles. ``error_bound`` is the largest possible undercount
    of any reported count (0 when exact).
    """

    ids: np.ndarray
    counts: np.ndarray
    total: int
    capacity: Optional[int] = None
    error_bound: int = 0

    def __post_init__(self) -> None:
        if self.ids.shape != self.counts.shape or self.ids.ndim != 1:
            raise ValueError(f"ids {self.ids.shape} and counts {self.counts.shape} must be equal 1-d shapes")

    @property
    def exact(self) -> bool:
        return self.capacity is None

    @property
    def num_ids(self) -> int:
        return int(self.ids.size)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.counts.nbytes)

    @classmethod
    def empty(cls, capacity: Optional[int] = None) -> "IdProfile":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, capacity, 0)

    @classmethod
    def from_ids(cls, ids: IdArray, capacity: Optional[int] = None, table: str = "table") -> "IdProfile":
        """Profiles one array of accesses (one entry per lookup)."""
        flat = as_id_array(ids, table)
        unique, counts = np.unique(flat, return_counts=True)
        profile = cls(unique, counts.astype(np.int64), int(flat.size), capacity, 0)
        return profile._shrink() if capacity is not None else profile

    def merge(self, other: "IdProfile") -> "IdProfile":
        """Combines the counts of two profiles of the same feature (e.g. two data shards)."""
        if self.capacity != other.capacity:
            raise ValueError(f"cannot merge profiles with capacities {self.capacity} and {other.capacity}")
        ids = np.concatenate([self.ids, other.ids])
        counts = np.concatenate([self.counts, other.counts])
        unique, inverse = np.unique(ids, return_inverse=True)
        summed = np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.int64)
        merged = IdProfile(unique, summed, self.total + other.total, self.capacity,
                           self.error_bound + other.error_bound)
        return merged._shrink() if self.capacity is not None else merged

    def _shrink(self) -> "IdProfile":
        k = self.capacity
        if k is None or self.ids.size <= k:
            return self
        # Misra-Gries: subtract the (k+1)-th largest count from every counter, keep the positive ones.
        kth = int(np.partition(self.counts, self.counts.size - k - 1)[self.counts.size - k - 1])
        keep = self.counts > kth
        return IdProfile(self.ids[keep], self.counts[keep] - kth, self.total, k, self.error_bound + kth)

    def top(self, k: int) -> np.ndarray:
        """The ``k`` most accessed ids, most accessed first (ties broken by smaller id)."""
        order = np.lexsort((self.ids, -self.counts))
        return self.ids[order[:k]]

    def counts_of(self, ids: IdArray) -> np.ndarray:
        """Counts of arbitrary ids (0 for ids not in the profile)."""
        query = as_id_array(ids)
        if self.ids.size == 0:
            return np.zeros(query.shape, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, query), self.ids.size - 1)
        return np.where(self.ids[pos] == query, self.counts[pos], 0)


class FeatureProfiler:
    """Accumulates :class:`IdProfile` s per feature from KJT batches or per-feature id arrays.

    Example::

        profiler = FeatureProfiler()
        for batch in loader:
            profiler.update_kjt(batch.sparse_features)
        profiles = profiler.profiles()   # {"C1": IdProfile, ...}

    ``capacity`` switches every feature to heavy-hitter mode with that many counters.
    ``chunk_size`` bounds how many raw accesses are buffered per feature before they are folded in.
    """

    def __init__(self, capacity: Optional[int] = None, chunk_size: int = 1 << 22) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.chunk_size = chunk_size
        self._profiles: Dict[str, IdProfile] = {}
        self._pending: Dict[str, list] = {}
        self._pending_size: Dict[str, int] = {}

    def update(self, feature: str, ids: IdArray) -> None:
        flat = as_id_array(ids, feature)
        self._pending.setdefault(feature, []).append(flat)
        self._pending_size[feature] = self._pending_size.get(feature, 0) + flat.size
        if self._pending_size[feature] >= self.chunk_size:
            self._flush(feature)

    def update_kjt(self, features) -> None:
        """Counts every value of a ``KeyedJaggedTensor`` under its key."""
        for key, values in zip(features.keys(), features.values().split(features.length_per_key())):
            self.update(key, values)

    def _flush(self, feature: str) -> None:
        chunks = self._pending.pop(feature, [])
        self._pending_size[feature] = 0
        if not chunks:
            return
        chunk = IdProfile.from_ids(np.concatenate(chunks), self.capacity, feature)
        previous = self._profiles.get(feature)
        self._profiles[feature] = chunk if previous is None else previous.merge(chunk)

    def profiles(self) -> Dict[str, IdProfile]:
        for feature in list(self._pending):
            self._flush(feature)
        return dict(self._profiles)


def profile_batches(batches: Iterable, capacity: Optional[int] = None) -> Dict[str, IdProfile]:
    """Profiles a stream of ``torchrec.datasets.utils.Batch`` or ``KeyedJaggedTensor`` objects."""
    profiler = FeatureProfiler(capacity=capacity)
    for batch in batches:
        profiler.update_kjt(getattr(batch, "sparse_features", batch))
    return profiler.profiles()


def merge_profiles(profiles: Iterable[IdProfile]) -> IdProfile:
    """Merges the profiles of several features that share one embedding table."""
    merged: Optional[IdProfile] = None
    for p in profiles:
        merged = p if merged is None else merged.merge(p)
    if merged is None:
        raise ValueError("no profiles to merge")
    return merged
