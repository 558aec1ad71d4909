"""The learned hash functions, as estimators: constructor takes hyper-parameters, ``fit`` learns.

Every method produces an :class:`IdMapping` (``mapping_``) whose rows are laid out as::

    [0, H)            hot ids, one row each (most accessed first)
    [H, H + C)        clusters of ids with enough history, by learned embedding
    [H + C, M)        hash region: every other id (rare, unseen, negative) by a seeded hash

=============  ====================================================================================
``hash``        the hashing trick: H = C = 0, every id hashed into all M rows
``frequency``   the H most accessed ids own a row; the rest are hashed into the other M - H rows
``double_hash`` frequency-based double hashing (Zhang et al., RecSys 2020): as ``frequency``, but a
                non-hot id takes two distinct rows of the hash region whose embeddings the bag sums
``learned``     ids with at least ``min_count`` accesses are clustered by their learned embedding
                (access-weighted k-means) into M rows; other ids are hashed over the same M rows
``combination`` hot ids own rows, ids with at least ``min_count`` accesses are clustered into C rows,
                the rest are hashed into R reserved rows: the best mapping of Ghaemmaghami et al.,
                "Learning to Collide" (2022)
=============  ====================================================================================

Which ids get an entry is always a prefix of the ids ranked by access count, so the memory of a
mapping is known from the profile alone (:mod:`lhf_torchrec.mapping.budget` relies on that).
"""

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type, Union

import numpy as np
import torch

from lhf_torchrec.mapping.embeddings import EmbeddingsLike, embedding_rows
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.mapping.kmeans import cluster, cluster_centers
from lhf_torchrec.mapping.profile import IdArray, IdProfile

logger = logging.getLogger(__name__)

ProfileLike = Union[IdProfile, IdArray]

# The learned methods cluster only ids seen at least this often: the embedding a short training run
# gives a rarer id is mostly the noise of its few updates, and clustering on it packs such ids into
# a few large rows, worse than hashing them (docs/results.md: the variants with every id and with
# ids from 5 accesses clustered). At a budget this is a floor (see mapping/budget.py).
MIN_COUNT = 10

# Counts scanned at once where a pass over all of them would make an id-sized temporary.
_CHUNK = 1 << 20


def as_profile(data: ProfileLike, table: str) -> IdProfile:
    """An :class:`IdProfile` of ``data`` (a profile, or an array of accesses), never empty."""
    profile = data if isinstance(data, IdProfile) else IdProfile.from_ids(data, table=table)
    if profile.num_ids == 0:
        raise ValueError(f"table '{table}': no ids to fit on (the data is empty)")
    return profile


def ranked_positions(profile: IdProfile, stop: Optional[int] = None) -> np.ndarray:
    """Positions in ``profile`` of its ``stop`` (default all) most accessed ids, most accessed first,
    ties broken by smaller id.

    The profile's ids are sorted, so a stable sort by count is that order. Only the ids that can be
    in the first ``stop`` are sorted: an O(n) selection finds them (frequency ranks its few hot ids
    of 1e8 without sorting 1e8 counts).
    """
    counts = profile.counts
    n = counts.size
    stop = n if stop is None else max(0, min(stop, n))
    if stop == 0:
        return np.zeros(0, np.int64)
    if stop < n:
        kth = _kth_largest(counts, stop)
        above = np.flatnonzero(counts > kth)
        chosen = np.concatenate([above, _first_equal(counts, kth, stop - above.size)])  # ties: the smaller ids
        return chosen[np.argsort(-counts[chosen], kind="stable")]
    return np.argsort(-counts, kind="stable")


def _kth_largest(counts: np.ndarray, k: int) -> int:
    """The k-th largest of ``counts`` (1 <= k <= size).

    Counts of a Zipf profile are small integers with huge ties (most ids seen once), where a
    selection (np.partition) degrades badly (2.8 s for 1e7 counts); a histogram of the values finds
    the same count in one pass when the largest count is not much above the number of counts.
    """
    top = int(counts.max())
    if int(counts.min()) >= 0 and top <= 4 * counts.size:
        at_least = np.cumsum(np.bincount(counts, minlength=top + 1)[::-1])[::-1]  # at_least[v] = #(counts >= v)
        return int(np.flatnonzero(at_least >= k)[-1])
    return int(np.partition(counts, counts.size - k)[counts.size - k])


def _first_equal(counts: np.ndarray, value: int, k: int) -> np.ndarray:
    """Positions of the first ``k`` counts equal to ``value``, by chunk: most ids can tie (count 1),
    and all their positions would be an id-sized array to keep a few of."""
    found, have = [], 0
    for start in range(0, counts.size, _CHUNK):
        if have >= k:
            break
        hits = np.flatnonzero(counts[start:start + _CHUNK] == value)[: k - have] + start
        found.append(hits)
        have += hits.size
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def ranked_ids(profile: IdProfile) -> np.ndarray:
    """Profiled ids, most accessed first (ties broken by smaller id)."""
    return profile.ids[ranked_positions(profile)]


def _ranked_counts(profile: IdProfile) -> np.ndarray:
    return np.sort(profile.counts)[::-1]


@dataclass(frozen=True)
class RowSplit:
    """How a method spends ``num_rows`` rows, and how many ids get an entry in the mapping."""

    num_rows: int
    num_hot: int
    num_clustered: int
    num_hashed: int
    num_entries: int
    hash_offset: int
    hash_rows: int
    probes: int = 1

    def layout(self) -> Dict[str, int]:
        return {"hot": self.num_hot, "clustered": self.num_clustered, "hashed": self.num_hashed}


def _check_fraction(name: str, value: Union[float, str], table: str) -> None:
    if value == "auto":
        return
    if isinstance(value, str) or not 0.0 <= value <= 1.0:
        raise ValueError(f"table '{table}': {name} must be in [0, 1] or 'auto', got {value!r}")


def balanced_hot_count(ranked_counts: np.ndarray, num_rows: int) -> int:
    """How many of the most accessed ids should own a row (``hot_fraction="auto"``).

    The largest H such that each of the top H ids has at least as many accesses as the average
    row would carry if it and all less accessed ids shared the rows left (``num_rows - h``): giving
    a lighter id a row of its own would spend a row on less traffic than a shared row carries.
    ``ranked_counts`` are the profile's counts, largest first.
    """
    n = min(int(ranked_counts.size), num_rows - 1)
    if n <= 0:
        return 0
    counts = ranked_counts.astype(np.float64)
    before = np.concatenate([[0.0], np.cumsum(counts[: n - 1])])  # accesses of the ids ranked above h
    shared_load = (counts.sum() - before) / (num_rows - np.arange(n))
    below = np.flatnonzero(counts[:n] < shared_load)
    return int(below[0]) if below.size else n


class MappingEstimator:
    """Base class: ``fit(data, embeddings=None, table=...)`` sets ``mapping_`` and ``split_``.

    A method implements ``split`` and ``fit_entries`` (which ids get which row); ``fit`` builds the
    :class:`IdMapping` from them, and a bucketed fit (:mod:`lhf_torchrec.mapping.buckets`) calls
    ``fit_entries`` once per bucket.
    """

    method: str = ""
    needs_embeddings: bool = False
    needs_data: bool = True
    probes: int = 1  # rows per hashed id

    def __init__(self, num_rows: int, *, seed: int = 0) -> None:
        self.num_rows = num_rows
        self.seed = seed

    def get_params(self) -> Dict:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def split(self, profile: IdProfile, table: str = "table") -> RowSplit:
        """The row split this estimator would use for ``profile`` (no fitting)."""
        raise NotImplementedError

    def fit_entries(
        self, profile: Optional[IdProfile], embeddings: Optional[EmbeddingsLike], table: str
    ) -> Tuple[RowSplit, np.ndarray, np.ndarray]:
        """(row split, entry ids, their rows) of this method on ``profile``, without building a mapping."""
        raise NotImplementedError

    def fit(self, data: Optional[ProfileLike], embeddings: Optional[EmbeddingsLike] = None, *, table: str = "table"):
        profile = as_profile(data, table) if data is not None or self.needs_data else None
        self._build(*self.fit_entries(profile, embeddings, table), table)
        return self

    def transform(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mapping_(ids)

    def _check_num_rows(self, table: str) -> None:
        if not isinstance(self.num_rows, (int, np.integer)) or self.num_rows < self.probes:
            raise ValueError(
                f"table '{table}': num_rows must be an integer >= {self.probes} for method '{self.method}', "
                f"got {self.num_rows!r}"
            )

    def _build(self, split: RowSplit, entry_ids: np.ndarray, entry_rows: np.ndarray, table: str) -> IdMapping:
        self.split_ = split
        self.mapping_ = IdMapping.from_entries(
            entry_ids,
            entry_rows,
            split.num_rows,
            hash_offset=split.hash_offset,
            hash_rows=split.hash_rows,
            probes=split.probes,
            seed=self.seed,
            method=self.method,
            params=self.get_params(),
            layout=split.layout(),
            table_name=table,
        )
        return self.mapping_


class HashingTrick(MappingEstimator):
    """``row = hash(id) mod M`` with a seeded universal hash; needs no data."""

    method = "hash"
    needs_data = False

    def split(self, profile: Optional[IdProfile] = None, table: str = "table") -> RowSplit:
        self._check_num_rows(table)
        return RowSplit(self.num_rows, 0, 0, self.num_rows, 0, 0, self.num_rows)

    def fit_entries(self, profile, embeddings, table):
        return self.split(None, table), np.zeros(0, np.int64), np.zeros(0, np.int64)


class FrequencyHashing(MappingEstimator):
    """The ``round(hot_fraction * M)`` most accessed ids own a row; all others share the rest by hash.

    ``hot_fraction="auto"``: as many hot ids as :func:`balanced_hot_count` finds worth a row.
    """

    method = "frequency"

    def __init__(self, num_rows: int, *, hot_fraction: Union[float, str] = 0.5, seed: int = 0) -> None:
        super().__init__(num_rows, seed=seed)
        self.hot_fraction = hot_fraction

    def split(self, profile: IdProfile, table: str = "table") -> RowSplit:
        self._check_num_rows(table)
        _check_fraction("hot_fraction", self.hot_fraction, table)
        m = self.num_rows
        if self.hot_fraction == "auto":
            hot = balanced_hot_count(_ranked_counts(profile), m - self.probes + 1)
        else:
            hot = int(round(self.hot_fraction * m))
        hot = max(0, min(hot, profile.num_ids, m - self.probes))
        return RowSplit(m, hot, 0, m - hot, hot, hot, m - hot, self.probes)

    def fit_entries(self, profile, embeddings, table):
        split = self.split(profile, table)
        self.hot_ids_ = profile.ids[ranked_positions(profile, split.num_hot)]
        return split, self.hot_ids_, np.arange(split.num_hot)


class DoubleHashing(FrequencyHashing):
    """Frequency-based double hashing (Zhang et al. 2020): hot ids own rows; any other id takes two
    distinct rows of the hash region, summed by the bag (SUM pooling only)."""

    method = "double_hash"
    probes = 2


class LearnedClustering(MappingEstimator):
    """Ids with ``>= min_count`` accesses are clustered by embedding (access-weighted k-means) into
    all M rows; every other id is hashed over the same rows."""

    method = "learned"
    needs_embeddings = True

    def __init__(self, num_rows: int, *, min_count: int = MIN_COUNT, n_iter: int = 20, seed: int = 0) -> None:
        super().__init__(num_rows, seed=seed)
        if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        self.min_count = int(min_count)
        if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        self.n_iter = int(n_iter)

    def split(self, profile: IdProfile, table: str = "table") -> RowSplit:
        self._check_num_rows(table)
        m = self.num_rows
        entries = int((profile.counts >= self.min_count).sum())
        return RowSplit(m, 0, m, 0, entries, 0, m)

    def _candidates(self, profile: IdProfile, positions: np.ndarray, embeddings, table: str):
        """(ids, store, rows, counts) of the ids at ``positions`` that have an embedding: their
        vectors are ``store[rows]``, float32 on CPU, not gathered (for 1e8 ids, 3.2 GB at d = 8)."""
        ids = profile.ids[positions]
        has, store, rows = embedding_rows(embeddings, ids, table, sorted_ids=(profile.ids, positions))
        if ids.size and not has.any():
            raise ValueError(f"table '{table}': none of the {ids.size} ids to cluster has an embedding (embeddings "
                             f"of another table or data, or learned only for ids seen more often than this fit's "
                             f"min_count={self.min_count}: lhf learn --min-count)")
        if not has.all():
            logger.warning("table '%s': %d of %d ids to cluster have no embedding; they are hashed (embeddings "
                           "learned from a floor above min_count=%d? lhf learn --min-count)",
                           table, int((~has).sum()), ids.size, self.min_count)
            ids, positions = ids[has], positions[has]
        rows = torch.from_numpy(rows)
        if store.device.type != "cpu" or store.dtype != torch.float32:
            store, rows = store[rows].to("cpu", torch.float32), None  # a copy either way: only the candidates
        return ids, store, rows, profile.counts[positions]

    def _cluster(self, ids: np.ndarray, store: torch.Tensor, rows: Optional[torch.Tensor], counts: np.ndarray,
                 k: int) -> np.ndarray:
        weights = torch.from_numpy(counts).to(torch.float32)
        labels = cluster(store, weights, k, seed=self.seed, n_iter=self.n_iter, rows=rows)
        self.cluster_ids_ = ids
        self.cluster_labels_ = labels.cpu().numpy()
        self.cluster_centers_ = cluster_centers(store, weights, labels, max(k, 1), rows=rows)
        return self.cluster_labels_

    def fit_entries(self, profile, embeddings, table):
        if embeddings is None:
            raise ValueError(f"table '{table}': method '{self.method}' needs learned embeddings")
        split = self.split(profile, table)
        candidates = self._candidates(profile, ranked_positions(profile, split.num_entries), embeddings, table)
        return split, candidates[0], self._cluster(*candidates, split.num_clustered)


class CombinedLearnedHashing(LearnedClustering):
    """The paper's best: hot ids own rows, well-observed ids are clustered, the rest are hashed.

    ``hot_fraction`` and ``hashed_fraction`` of the M rows go to hot ids and to the hash region; the
    rows in between are clusters of ids with ``>= min_count`` accesses. Rows that no id can use (too
    few candidates) go to the hash region. ``"auto"`` lets the profile choose: hot ids by
    :func:`balanced_hot_count`, and the hash region gets the share of the remaining rows that the
    rarely seen ids (``< min_count``) have of the remaining accesses.
    """

    method = "combination"

    def __init__(
        self,
        num_rows: int,
        *,
        hot_fraction: Union[float, str] = 0.5,
        hashed_fraction: Union[float, str] = 0.1,
        min_count: int = MIN_COUNT,
        n_iter: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__(num_rows, min_count=min_count, n_iter=n_iter, seed=seed)
        self.hot_fraction = hot_fraction
        self.hashed_fraction = hashed_fraction

    def split(self, profile: IdProfile, table: str = "table") -> RowSplit:
        self._check_num_rows(table)
        _check_fraction("hot_fraction", self.hot_fraction, table)
        _check_fraction("hashed_fraction", self.hashed_fraction, table)
        fixed = [f for f in (self.hot_fraction, self.hashed_fraction) if f != "auto"]
        if sum(fixed) > 1.0:
            raise ValueError(
                f"table '{table}': hot_fraction + hashed_fraction must be <= 1, got "
                f"{self.hot_fraction} + {self.hashed_fraction}"
            )
        m = self.num_rows
        # Sorting every count (1e8 at scale) is needed only when the profile chooses the split.
        counts = _ranked_counts(profile) if "auto" in (self.hot_fraction, self.hashed_fraction) else None
        if self.hot_fraction == "auto":
            hot = balanced_hot_count(counts, m)
        else:
            hot = int(round(self.hot_fraction * m))
        if self.hashed_fraction == "auto":
            rest = counts[hot:]
            rare_share = rest[rest < self.min_count].sum() / max(1, rest.sum())
            hashed = max(1, int(round((m - min(hot, m - 1)) * rare_share)))
        else:
            hashed = max(1, int(round(self.hashed_fraction * m)))
        hashed = min(hashed, m)
        hot = max(0, min(hot, profile.num_ids, m - hashed))
        well_observed = int((profile.counts >= self.min_count).sum())
        candidates = max(0, well_observed - hot)
        clustered = min(m - hot - hashed, candidates)
        if clustered == 0:  # no cluster row left: the candidates are hashed, they need no entry
            candidates = 0
        hashed = m - hot - clustered
        return RowSplit(m, hot, clustered, hashed, hot + candidates, hot + clustered, hashed)

    def fit_entries(self, profile, embeddings, table):
        if embeddings is None:
            raise ValueError(f"table '{table}': method '{self.method}' needs learned embeddings")
        split = self.split(profile, table)
        ranked = ranked_positions(profile, split.num_entries)
        self.hot_ids_ = profile.ids[ranked[: split.num_hot]]
        candidates = self._candidates(profile, ranked[split.num_hot:], embeddings, table)
        del ranked
        labels = self._cluster(*candidates, split.num_clustered)
        ids = candidates[0]
        del candidates
        entry_ids = np.concatenate([self.hot_ids_, ids])
        entry_rows = np.concatenate([np.arange(split.num_hot), split.num_hot + labels.astype(np.int64)])
        return split, entry_ids, entry_rows


METHODS: Dict[str, Type[MappingEstimator]] = {
    "hash": HashingTrick,
    "frequency": FrequencyHashing,
    "double_hash": DoubleHashing,
    "learned": LearnedClustering,
    "combination": CombinedLearnedHashing,
}


def make_estimator(method: str, num_rows: int, *, seed: int = 0, **hyperparams) -> MappingEstimator:
    """The estimator of ``method`` with these hyper-parameters (clear error for unknown names)."""
    if method not in METHODS:
        raise ValueError(f"unknown mapping method '{method}'; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method](num_rows, seed=seed, **hyperparams)
    except TypeError as e:
        raise TypeError(f"method '{method}': {e}") from e
