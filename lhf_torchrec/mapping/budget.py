"""Memory budgets: total bytes = table rows x (embedding + optimizer state) + mapping bytes.

Every comparison between methods is made at equal total bytes, with the mapping counted: an int32
entry per id costs as much as a sixteenth of a dim-16 fp32 row, so a mapping that stored every id
would cap compression. :func:`plan_budget` finds the largest number of rows M whose table plus
mapping fits a budget, for any method, from the access profile alone.

The learned methods cluster only ids seen at least ``min_count`` times (the estimator's default, 10).
At a budget that number is a floor: the budget raises it until the clustered ids' entries take at
most ``mapping_share`` of the bytes, so ``fit_mapping(..., num_rows=M)`` and a budget that gives M
rows use the same threshold unless the budget needs a higher one (then ``plan.hyperparams`` says which).
"""

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import torch
import torchrec.optim as trec_optim

from lhf_torchrec.mapping.buckets import (
    MIN_ROWS_PER_BUCKET,
    TooFewRowsForBuckets,
    bucket_profiles,
    bucket_split,
    check_bucket_rows,
    total_split,
)
from lhf_torchrec.mapping.id_mapping import bucketed_storage_cost, storage_cost
from lhf_torchrec.mapping.methods import (
    METHODS,
    LearnedClustering,
    MappingEstimator,
    ProfileLike,
    RowSplit,
    as_profile,
    make_estimator,
    ranked_ids,
)
from lhf_torchrec.mapping.profile import IdProfile

WEIGHT_BYTES = 4  # fp32 table weights

# At a budget, at most this share of the bytes goes to the entries of the clustered ids.
MAPPING_SHARE = 0.25


@dataclass(frozen=True)
class TableOptimizer:
    """A fused table optimizer: the class TorchRec's planner reads from each table's weight (set with
    ``apply_optimizer_in_backward``) and its state per row, in floats, as a function of the dim."""

    cls: Type[torch.optim.Optimizer]
    state_floats: Callable[[int], int]


OPTIMIZERS: Dict[str, TableOptimizer] = {
    "sgd": TableOptimizer(torch.optim.SGD, lambda dim: 0),
    "rowwise_adagrad": TableOptimizer(trec_optim.RowWiseAdagrad, lambda dim: 1),
    "adagrad": TableOptimizer(torch.optim.Adagrad, lambda dim: dim),
    "adam": TableOptimizer(torch.optim.Adam, lambda dim: 2 * dim),
}


def table_optimizer(name: str) -> TableOptimizer:
    """The optimizer called ``name`` (clear error for unknown names)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def row_bytes(embedding_dim: int, optimizer: str = "sgd") -> int:
    """Bytes one table row costs during training: fp32 weights plus the optimizer's state."""
    state_floats = table_optimizer(optimizer).state_floats
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    return WEIGHT_BYTES * (embedding_dim + state_floats(embedding_dim))


class BudgetTooSmall(ValueError):
    """A table's budget cannot hold the method at all (its smallest mapping and one row)."""


@dataclass(frozen=True)
class BudgetPlan:
    """A method's row split at a budget, and what each part costs in bytes."""

    table: str
    method: str
    embedding_dim: int
    optimizer: str
    split: RowSplit
    storage: str
    table_bytes: int
    optimizer_bytes: int
    mapping_bytes: int
    budget_bytes: int
    hyperparams: Dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.split.num_rows

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.optimizer_bytes + self.mapping_bytes

    def as_dict(self) -> Dict:
        out = asdict(self)
        out.update(out.pop("split"))
        out["total_bytes"] = self.total_bytes
        return out


class _PrefixCost:
    """Mapping bytes when the entries are the E most accessed ids, for any E, in O(1), into M rows."""

    def __init__(self, profile: IdProfile) -> None:
        ranked = ranked_ids(profile)
        self._low = np.minimum.accumulate(ranked) if ranked.size else ranked
        self._high = np.maximum.accumulate(ranked) if ranked.size else ranked

    def span(self, num_entries: int) -> Tuple[int, int]:
        """(smallest, largest) id of the ``num_entries`` most accessed ids (> 0 of them)."""
        return int(self._low[num_entries - 1]), int(self._high[num_entries - 1])

    def __call__(self, num_entries: int, num_rows: int):
        if num_entries == 0:
            return storage_cost(0, 0, num_rows)
        low, high = self.span(num_entries)
        return storage_cost(num_entries, high - low + 1, num_rows)


def _bucketed_cost(splits, num_rows: int) -> Tuple[str, int]:
    """Storage and bytes of a bucketed mapping into ``num_rows`` rows: its entries (keyed by bucket
    hash), and each bucket's hash region, two int32."""
    storage, entry_bytes = bucketed_storage_cost(sum(s.num_entries for s in splits), num_rows)
    return storage, entry_bytes + 8 * len(splits)


def _min_count_that_fits(histogram: Tuple[np.ndarray, np.ndarray], prefix_cost: Callable[[int, int], Tuple[str, int]],
                         max_bytes: float, max_rows: int) -> int:
    """The smallest access count threshold whose well-observed ids fit in ``max_bytes`` of mapping (counted
    for the most rows the budget could hold, ``max_rows``: a mapping into fewer rows costs no more).
    ``histogram``: the distinct access counts, ascending, and how many ids have each."""
    thresholds, ids_per_count = histogram
    at_least = np.cumsum(ids_per_count[::-1])[::-1]  # ids with at least each threshold's count
    low, high = 0, thresholds.size  # cost falls as the threshold rises: find the first that fits
    while low < high:
        mid = (low + high) // 2
        if prefix_cost(int(at_least[mid]), max_rows)[1] <= max_bytes:
            high = mid
        else:
            low = mid + 1
    return int(thresholds[low]) if low < thresholds.size else int(thresholds[-1]) + 1


class BudgetStatistics:
    """What :func:`plan_budget` reads of a profile, here from the whole profile in this process.

    A bucketed plan reads two things only: the histogram of access counts (how many ids have each
    count, for the learned methods' ``min_count``) and, for each table size it tries, every bucket's
    row split. Both are sums over buckets, so :class:`lhf_torchrec.distributed.fit.RankBudgetStatistics`
    computes them from each rank's buckets and combines them with collectives. An unbucketed plan
    ranks every id (:attr:`profile`).
    """

    def __init__(self, profile: IdProfile, table: str = "table") -> None:
        self.profile, self.table = profile, table
        self._buckets: Dict[Tuple[int, int], list] = {}

    @property
    def num_ids(self) -> int:
        return self.profile.num_ids

    def count_histogram(self) -> Tuple[np.ndarray, np.ndarray]:
        """(distinct access counts ascending, number of ids with each)."""
        values, ids = np.unique(self.profile.counts, return_counts=True)
        return values, ids.astype(np.int64)

    def bucket_splits(self, estimator: MappingEstimator, num_buckets: int, seed: int) -> List[RowSplit]:
        """Every bucket's row split with ``estimator`` (which has a bucket's rows), in bucket order."""
        if (num_buckets, seed) not in self._buckets:
            self._buckets = {(num_buckets, seed): bucket_profiles(self.profile, num_buckets, seed)}
        return [bucket_split(estimator, p, self.table) for p in self._buckets[num_buckets, seed]]


def plan_budget(
    data: Union[ProfileLike, BudgetStatistics],
    *,
    embedding_dim: int,
    total_bytes: int,
    method: str = "combination",
    optimizer: str = "sgd",
    table: str = "table",
    mapping_share: float = MAPPING_SHARE,
    num_buckets: Optional[int] = None,
    seed: int = 0,
    **hyperparams,
) -> BudgetPlan:
    """The largest table (rows M) of ``method`` whose weights, optimizer state and mapping fit in
    ``total_bytes``, with its hot / clustered / hashed split. ``hyperparams`` go to the estimator.

    With ``num_buckets`` (B) the mapping is bucketed (:mod:`lhf_torchrec.mapping.buckets`, whose
    buckets depend on ``seed``): M is a multiple of B, the split is the sum of the buckets' splits and
    the mapping bytes count each bucket's entries and hash region. Too few rows for B buckets raise
    :class:`~lhf_torchrec.mapping.buckets.TooFewRowsForBuckets`.

    Learned methods: ``min_count`` (the estimator's, default 10) is a floor; the budget raises it to
    the smallest access count whose ids' entries take at most ``mapping_share`` of the budget, and
    rarer ids are hashed. The value used is in ``plan.hyperparams``.

    ``data``: a profile (or accesses), or the :class:`BudgetStatistics` of one (a distributed
    budget: :class:`~lhf_torchrec.distributed.fit.RankBudgetStatistics`, the same plan on every rank).

    Example::

        plan = plan_budget(profile, embedding_dim=16, total_bytes=full_bytes // 10, method="combination")
        plan.num_rows, plan.split.num_hot, plan.mapping_bytes
    """
    statistics = data if isinstance(data, BudgetStatistics) else BudgetStatistics(as_profile(data, table), table)
    if statistics.num_ids == 0:
        raise ValueError(f"table '{table}': no ids to fit on (the data is empty)")
    per_row = row_bytes(embedding_dim, optimizer)
    # Bucketed mappings key entries by bucket hash: their bytes depend on the entry count only.
    prefix_cost = _PrefixCost(statistics.profile) if num_buckets is None else bucketed_storage_cost
    if not 0 < mapping_share <= 1:
        raise ValueError(f"table '{table}': mapping_share must be in (0, 1], got {mapping_share}")
    floor = make_estimator(method, 1, **hyperparams)
    if isinstance(floor, LearnedClustering):
        fits = _min_count_that_fits(statistics.count_histogram(), prefix_cost, mapping_share * total_bytes,
                                    max(1, int(total_bytes) // per_row))
        hyperparams["min_count"] = max(fits, floor.min_count)

    buckets = 1 if num_buckets is None else num_buckets
    if num_buckets is not None:
        check_bucket_rows(MIN_ROWS_PER_BUCKET * num_buckets, num_buckets, table)  # B itself is valid

    def plan_for(num_rows: int) -> BudgetPlan:
        if num_buckets is None:
            split = make_estimator(method, num_rows, **hyperparams).split(statistics.profile, table)
            storage, mapping_bytes = prefix_cost(split.num_entries, num_rows)
        else:
            estimator = make_estimator(method, num_rows // num_buckets, **hyperparams)
            splits = statistics.bucket_splits(estimator, num_buckets, seed)
            split = total_split(splits)
            storage, mapping_bytes = _bucketed_cost(splits, num_rows)
        weight = num_rows * WEIGHT_BYTES * embedding_dim
        return BudgetPlan(table, method, embedding_dim, optimizer, split, storage, weight,
                          num_rows * per_row - weight, mapping_bytes, int(total_bytes), dict(hyperparams))

    # Search rows per bucket (M / B); unbucketed, one bucket holds all M rows.
    probes = METHODS[method].probes if method in METHODS else 1
    low = probes if num_buckets is None else max(probes, MIN_ROWS_PER_BUCKET)
    high = max(low, int(total_bytes) // per_row // buckets)
    smallest = plan_for(low * buckets)
    if smallest.total_bytes > total_bytes:
        if num_buckets is not None:
            raise TooFewRowsForBuckets(
                f"table '{table}': a budget of {total_bytes} bytes cannot hold {num_buckets} buckets of at least "
                f"{low} rows each with method '{method}' ({smallest.total_bytes} bytes, {smallest.mapping_bytes} of "
                f"them mapping; one row {per_row} bytes); use fewer buckets, a larger budget, or no buckets"
            )
        raise BudgetTooSmall(
            f"table '{table}': a budget of {total_bytes} bytes cannot hold method '{method}': its mapping alone "
            f"needs {smallest.mapping_bytes} bytes and one row {per_row} bytes"
        )
    while low < high:  # the largest M with plan_for(M) within budget; total bytes grow with M
        mid = (low + high + 1) // 2
        if plan_for(mid * buckets).total_bytes <= total_bytes:
            low = mid
        else:
            high = mid - 1
    return plan_for(low * buckets)
