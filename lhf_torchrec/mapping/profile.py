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

Exact profiles of streams whose working set does not fit in memory: :class:`SpillingProfiler`
spills each chunk's counts to disk, split by id bucket, and merges them one bucket at a time.
"""

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from lhf_torchrec.mapping.hashing import bucket_of

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

    @property
    def min_id(self) -> int:
        """The smallest profiled id (0 when there is none)."""
        return int(self.ids[0]) if self.ids.size else 0

    @property
    def max_id(self) -> int:
        """The largest profiled id (0 when there is none)."""
        return int(self.ids[-1]) if self.ids.size else 0

    def summary(self) -> "ProfileSummary":
        return ProfileSummary(self.num_ids, self.total, self.min_id, self.max_id)

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


@dataclass(frozen=True)
class ProfileSummary:
    """What the table-level rules (:mod:`lhf_torchrec.mapping.tables`: full rows, vocabularies,
    budgets) read of a profile. A distributed fit has it for the whole profile, which no rank holds."""

    num_ids: int
    total: int
    min_id: int
    max_id: int


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


class SpillingProfiler:
    """Exact profiles through bounded memory: each chunk's (id, count) pairs are spilled to disk,
    one file per feature and bucket, and merged one bucket at a time.

    Example::

        with SpillingProfiler(directory="/scratch") as profiler:
            for batch in loader:
                profiler.update_kjt(batch.sparse_features)
            for bucket, part in profiler.parts("C1"):   # bucket by bucket: never all ids at once
                ...
            profiles = profiler.profiles()               # or all, merged (the result in memory)

    Memory bound, in 16-byte (id, count) pairs: ``chunk_size`` raw accesses buffered per feature,
    plus while merging one bucket its distinct ids and up to ``2 * chunk_size`` spilled pairs (with
    numpy's sort temporaries, a small constant factor more). Disk: every chunk's distinct ids, 16
    bytes each. A bucket is the bucket of an id's bucket hash (:func:`~lhf_torchrec.mapping.hashing.bucket_of`
    with ``num_buckets`` and ``seed``): with the B and seed of a bucketed mapping, :meth:`parts` are
    exactly the ids each of its buckets is fitted on (before the bucket-hash tie rule of
    :func:`~lhf_torchrec.mapping.buckets.bucket_profiles`).

    The profiler owns a fresh temporary directory (under ``directory``, default the system's) and
    removes it on :meth:`close` or leaving the ``with`` block, also on error; it never writes anywhere
    else. Heavy-hitter summaries stay with :class:`FeatureProfiler` (``capacity``): they are bounded already.
    """

    def __init__(self, directory: Optional[str] = None, num_buckets: int = 64, seed: int = 0,
                 chunk_size: int = 1 << 22) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if directory is not None and not os.path.isdir(directory):
            raise FileNotFoundError(f"spill directory {directory!r} does not exist or is not a directory")
        self.num_buckets, self.seed, self.chunk_size = num_buckets, seed, chunk_size
        bucket_of(torch.zeros(1, dtype=torch.int64), num_buckets, seed)  # validates num_buckets early
        self._dir: Optional[str] = tempfile.mkdtemp(prefix="lhf-profile-spill-", dir=directory)
        # A profiler dropped without close() still removes its files (at garbage collection or exit).
        self._remove = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._pending: Dict[str, List[np.ndarray]] = {}
        self._pending_size: Dict[str, int] = {}
        self._runs: Dict[str, List[List[int]]] = {}  # feature -> bucket -> lengths of its spilled runs
        self._totals: Dict[str, int] = {}
        self._files: Dict[str, str] = {}  # feature -> file stem (features may hold any characters)

    @property
    def directory(self) -> Optional[str]:
        """The temporary directory (None once closed)."""
        return self._dir

    def __enter__(self) -> "SpillingProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Removes the spill files."""
        self._remove()
        self._dir = None

    def _path(self, feature: str, bucket: int) -> str:
        if self._dir is None:
            raise ValueError("this SpillingProfiler is closed: its spill files are gone")
        stem = self._files.setdefault(feature, f"f{len(self._files)}")
        return os.path.join(self._dir, f"{stem}-b{bucket}.bin")

    def update(self, feature: str, ids: IdArray) -> None:
        flat = as_id_array(ids, feature)
        self._pending.setdefault(feature, []).append(flat)
        self._pending_size[feature] = self._pending_size.get(feature, 0) + flat.size
        self._totals[feature] = self._totals.get(feature, 0) + int(flat.size)
        if self._pending_size[feature] >= self.chunk_size:
            self._spill(feature)

    def update_kjt(self, features) -> None:
        """Counts every value of a ``KeyedJaggedTensor`` under its key."""
        for key, values in zip(features.keys(), features.values().split(features.length_per_key())):
            self.update(key, values)

    def _spill(self, feature: str) -> None:
        chunks = self._pending.pop(feature, [])
        self._pending_size[feature] = 0
        runs = self._runs.setdefault(feature, [[] for _ in range(self.num_buckets)])
        if not chunks:
            return
        ids, counts = np.unique(np.concatenate(chunks), return_counts=True)
        buckets = bucket_of(torch.from_numpy(ids), self.num_buckets, self.seed).numpy()
        order = np.argsort(buckets, kind="stable")  # ids stay sorted within a bucket
        bounds = np.searchsorted(buckets[order], np.arange(self.num_buckets + 1))
        pairs = np.stack([ids[order], counts[order].astype(np.int64)], axis=1)
        for bucket, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                # Scratch, not an output (no atomic_write): appended runs in the profiler's own temporary
                # directory, read back only through the lengths recorded here, removed with it.
                fd = os.open(self._path(feature, bucket), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    data = memoryview(pairs[lo:hi].tobytes())
                    while data:  # one write may take less than all (at most ~2 GiB on Linux)
                        data = data[os.write(fd, data):]
                finally:
                    os.close(fd)
                runs[bucket].append(int(hi - lo))

    def parts(self, feature: str) -> Iterator[Tuple[int, IdProfile]]:
        """(bucket, exact profile of the bucket's ids) for every bucket, in order; ``total`` counts
        the bucket's accesses. Holds one bucket at a time."""
        self._spill(feature)
        runs = self._runs.get(feature, [[] for _ in range(self.num_buckets)])
        for bucket, lengths in enumerate(runs):
            yield bucket, self._merge_bucket(feature, bucket, lengths)

    def _merge_bucket(self, feature: str, bucket: int, lengths: List[int]) -> IdProfile:
        merged = IdProfile.empty()
        if not lengths:
            return merged
        spilled = np.memmap(self._path(feature, bucket), dtype=np.int64, mode="r", shape=(sum(lengths), 2))
        start = offset = 0
        while start < len(lengths):  # fold runs in batches of at most chunk_size pairs (or one run)
            stop, size = start, 0
            while stop < len(lengths) and (size == 0 or size + lengths[stop] <= self.chunk_size):
                size += lengths[stop]
                stop += 1
            batch = np.array(spilled[offset:offset + size])
            offset += size
            ids, inverse = np.unique(np.concatenate([merged.ids, batch[:, 0]]), return_inverse=True)
            counts = np.bincount(inverse, weights=np.concatenate([merged.counts, batch[:, 1]]),
                                 minlength=ids.size).astype(np.int64)
            merged = IdProfile(ids, counts, int(counts.sum()))
            start = stop
        del spilled
        return merged

    def profile(self, feature: str) -> IdProfile:
        """The feature's whole exact profile (in memory: 16 bytes per distinct id)."""
        parts = [part for _, part in self.parts(feature)]
        ids = np.concatenate([p.ids for p in parts])
        counts = np.concatenate([p.counts for p in parts])
        order = np.argsort(ids)
        return IdProfile(ids[order], counts[order], self._totals.get(feature, 0))

    def profiles(self) -> Dict[str, IdProfile]:
        """Every feature's exact profile, as :meth:`FeatureProfiler.profiles` gives it."""
        return {feature: self.profile(feature) for feature in self._totals}


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
