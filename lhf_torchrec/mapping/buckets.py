"""Bucketed fitting: a mapping whose rows split into B buckets, each fitted on its own ids.

The foundation of mappings co-sharded with their tables: TorchRec's row-wise sharding gives each
rank a contiguous block of rows, and a bucketed mapping keeps every id inside its bucket's rows
``[b * M / B, (b + 1) * M / B)``, so a rank that owns whole buckets owns every id that lands there.
An id's bucket is a fixed, seeded function of the raw id (:func:`~lhf_torchrec.mapping.hashing.bucket_of`).
Inside a bucket the method is unchanged: its estimator is fitted on the bucket's share of the
profile with M / B rows (hot ids own rows, well-observed ids are clustered, every other id, seen or
not, is hashed into the bucket's own hash region).

A table needs at least ``MIN_ROWS_PER_BUCKET`` rows per bucket; :func:`check_bucket_rows` says which
bucket counts and row counts work when it has fewer.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lhf_torchrec.mapping.embeddings import EmbeddingsLike
from lhf_torchrec.mapping.hashing import bucket_hashes, input_hash_size
from lhf_torchrec.mapping.id_mapping import IdMapping, _duplicate_key, bucket_entry_keys
from lhf_torchrec.mapping.methods import MappingEstimator, RowSplit, make_estimator
from lhf_torchrec.mapping.profile import IdProfile

logger = logging.getLogger(__name__)

# Two rows per bucket at least: a learned method then keeps one row beside the hash region.
MIN_ROWS_PER_BUCKET = 2


class TooFewRowsForBuckets(ValueError):
    """A table has too few rows for the requested number of buckets."""


def check_bucket_rows(num_rows: int, num_buckets: int, table: str) -> None:
    """Raises unless ``num_rows`` splits into ``num_buckets`` equal buckets of enough rows."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"table '{table}': num_buckets must be an integer >= 1, got {num_buckets!r}")
    if num_rows < MIN_ROWS_PER_BUCKET * num_buckets:
        raise TooFewRowsForBuckets(
            f"table '{table}': {num_rows} rows cannot hold {num_buckets} buckets of at least {MIN_ROWS_PER_BUCKET} "
            f"rows each; use at most {num_rows // MIN_ROWS_PER_BUCKET} buckets, or at least "
            f"{MIN_ROWS_PER_BUCKET * num_buckets} rows (a larger budget), or no buckets"
        )
    if num_rows % num_buckets:
        raise ValueError(f"table '{table}': {num_rows} rows do not split into {num_buckets} equal buckets; "
                         f"use {num_rows - num_rows % num_buckets} rows")


def cosharded_slots(num_rows: int, num_buckets: int, max_bucket_entries: int) -> int:
    """K, the entries each row of a co-sharded mapping has room for.

    A co-sharded mapping (:mod:`lhf_torchrec.modules.cosharded`) stores a bucket's entries in a
    (rows of the bucket, K) block: TorchRec shards every managed-collision buffer by its first
    dimension, which must be the table's rows. So every bucket pays for the fullest one.
    """
    rows_per_bucket = num_rows // num_buckets
    return max(1, -(-int(max_bucket_entries) // rows_per_bucket))


def cosharded_bytes(num_rows: int, num_buckets: int, max_bucket_entries: int) -> int:
    """Bytes of a co-sharded mapping over all ranks; a rank holding r of the rows holds r / num_rows of it.

    Per row: K int64 keys and K int32 rows (:func:`cosharded_slots`), and one int32 of the
    bucket's hash region (offset and rows, in the first two rows of each bucket).
    """
    return num_rows * (12 * cosharded_slots(num_rows, num_buckets, max_bucket_entries) + 4)


def bucket_profiles(profile: IdProfile, num_buckets: int, seed: int) -> List[IdProfile]:
    """The profile of each bucket's ids (ids stay sorted; ``total`` is the bucket's counted accesses).

    A bucketed mapping is a function of the bucket hash h (:func:`bucket_hash`), which about four
    64-bit ids share: of profiled ids with the same h only the most accessed one (the smaller id on a
    tie) is kept, so it alone can get an entry and the others take its row. With n profiled ids this
    happens with probability about n^2 / 2^63 (negligible below a billion ids); it is logged.
    """
    hashes = bucket_hashes(profile.ids, num_buckets, seed)
    ids, counts = profile.ids, profile.counts
    width = input_hash_size(num_buckets) // num_buckets
    # Rare: sort out who keeps the hash (a lexsort holds several arrays as long as the ids).
    if _duplicate_key(hashes, width) is not None:
        by_hash = np.lexsort((ids, -counts, hashes))  # by h, then most accessed first, then smaller id
        first = np.ones(by_hash.size, dtype=bool)
        sorted_hashes = hashes[by_hash]
        first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
        del sorted_hashes
        dropped = by_hash[~first]
        logger.info("%d profiled id(s) share a bucket hash with a more accessed id and take its row (e.g. id %d)",
                    dropped.size, ids[dropped[0]])
        keep = np.sort(by_hash[first])
        del by_hash, first
        ids, counts, hashes = ids[keep], counts[keep], hashes[keep]
    buckets = hashes  # in place: the bucket of each id
    buckets //= width
    order = np.argsort(buckets, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(buckets, minlength=num_buckets))])
    del buckets, hashes
    ids = ids[order]
    counts = counts[order]
    del order
    return [
        IdProfile(ids[lo:hi], counts[lo:hi], int(counts[lo:hi].sum()), profile.capacity, profile.error_bound)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def _all_hashed(estimator: MappingEstimator) -> RowSplit:
    """A bucket without profiled ids: all its rows are hash rows."""
    rows = estimator.num_rows
    return RowSplit(rows, 0, 0, rows, 0, 0, rows, estimator.probes)


def bucket_split(estimator: MappingEstimator, profile: IdProfile, table: str) -> RowSplit:
    """The row split of one bucket (``estimator`` has the bucket's rows)."""
    return estimator.split(profile, table) if profile.num_ids else _all_hashed(estimator)


def total_split(splits: List[RowSplit]) -> RowSplit:
    """The splits of all buckets added up (hash regions are per bucket: the whole table is given)."""
    rows = sum(s.num_rows for s in splits)
    return RowSplit(rows, sum(s.num_hot for s in splits), sum(s.num_clustered for s in splits),
                    sum(s.num_hashed for s in splits), sum(s.num_entries for s in splits), 0, rows, splits[0].probes)


@dataclass(frozen=True)
class BucketFits:
    """The fitted entries of the buckets ``[first_bucket, first_bucket + len(splits))`` of a mapping.

    ``entry_rows`` are rows of the whole table; entries are in bucket order (a bucket's as its
    estimator returned them). :func:`fit_bucket_range` makes one; :func:`assemble_bucketed` turns one that covers every
    bucket into the mapping.
    """

    first_bucket: int
    splits: List[RowSplit]
    entry_ids: np.ndarray
    entry_rows: np.ndarray
    entry_counts: np.ndarray  # entries of each bucket

    @property
    def end_bucket(self) -> int:
        return self.first_bucket + len(self.splits)


def fit_bucket_range(
    method: str,
    num_rows: int,
    num_buckets: int,
    profiles: Sequence[IdProfile],
    embeddings: Optional[EmbeddingsLike] = None,
    *,
    first_bucket: int = 0,
    seed: int = 0,
    table: str = "table",
    **hyperparams,
) -> BucketFits:
    """Fits ``method`` in the buckets ``first_bucket, first_bucket + 1, ...``, one per profile of
    ``profiles`` (each as :func:`bucket_profiles` gives it). ``embeddings`` must cover those buckets' ids.

    The piece of :func:`fit_bucketed` that a rank of a distributed fit runs on the buckets it owns
    (:mod:`lhf_torchrec.distributed.fit`); a bucket's fit depends on its own profile only.
    """
    check_bucket_rows(num_rows, num_buckets, table)
    if first_bucket < 0 or first_bucket + len(profiles) > num_buckets:
        raise ValueError(f"table '{table}': buckets [{first_bucket}, {first_bucket + len(profiles)}) are not "
                         f"among the {num_buckets} buckets")
    rows_per_bucket = num_rows // num_buckets
    estimator = make_estimator(method, rows_per_bucket, seed=seed, **hyperparams)
    entry_ids: List[np.ndarray] = []
    entry_rows: List[np.ndarray] = []
    splits: List[RowSplit] = []
    bar = tqdm(profiles, desc=f"fit {table} ({len(profiles)} buckets)", unit="bucket", leave=False,
               disable=len(profiles) < 16)
    for bucket, bucket_profile in enumerate(bar, start=first_bucket):
        if bucket_profile.num_ids:
            split, ids, rows = estimator.fit_entries(bucket_profile, embeddings, table)
        else:
            split, ids, rows = _all_hashed(estimator), np.zeros(0, np.int64), np.zeros(0, np.int64)
        splits.append(split)
        entry_ids.append(np.asarray(ids, np.int64))
        entry_rows.append(bucket * rows_per_bucket + np.asarray(rows, np.int64))
    return BucketFits(first_bucket, splits, np.concatenate(entry_ids or [np.zeros(0, np.int64)]),
                      np.concatenate(entry_rows or [np.zeros(0, np.int64)]),
                      np.array([ids.size for ids in entry_ids], np.int64))


@dataclass(frozen=True)
class KeyedFits:
    """:class:`BucketFits` whose entries are keyed by bucket hash (int64 ``keys``, int32 ``rows``, 12 bytes
    an entry): what a replicated mapping is gathered and assembled from across ranks (:func:`keyed_fits`,
    :func:`assemble_keyed`)."""

    first_bucket: int
    splits: List[RowSplit]
    keys: np.ndarray
    rows: np.ndarray
    entry_counts: np.ndarray

    @property
    def end_bucket(self) -> int:
        return self.first_bucket + len(self.splits)


def keyed_fits(fits: BucketFits, num_rows: int, num_buckets: int, *, seed: int = 0, table: str = "table") -> KeyedFits:
    """``fits`` keyed by bucket hash, their entries checked (errors name the ids:
    :func:`~lhf_torchrec.mapping.id_mapping.bucket_entry_keys`). A bucket's entries are checked whole
    in any range of buckets, so checking each rank's range checks the mapping."""
    if num_rows >= 1 << 31:
        raise ValueError(f"table '{table}': {num_rows} rows do not fit the int32 rows of keyed entries")
    keys = bucket_entry_keys(fits.entry_ids, fits.entry_rows, num_rows, num_buckets, seed, table)
    return KeyedFits(fits.first_bucket, fits.splits, keys, fits.entry_rows.astype(np.int32), fits.entry_counts)


def _assembly_settings(method: str, num_rows: int, num_buckets: int, first_bucket: int, splits: List[RowSplit],
                       seed: int, table: str, hyperparams: dict) -> dict:
    """The keyword arguments of the bucketed mapping of every bucket's ``splits`` (``hyperparams`` as fitted)."""
    if (first_bucket, first_bucket + len(splits)) != (0, num_buckets):
        raise ValueError(f"table '{table}': a mapping needs the fits of all {num_buckets} buckets, got buckets "
                         f"[{first_bucket}, {first_bucket + len(splits)})")
    estimator = make_estimator(method, num_rows // num_buckets, seed=seed, **hyperparams)
    regions = torch.tensor([[s.hash_offset, s.hash_rows] for s in splits], dtype=torch.int32)
    return dict(hash_offset=0, hash_rows=num_rows, probes=estimator.probes, seed=seed, method=method,
                params=estimator.get_params(), layout=total_split(splits).layout(), table_name=table,
                num_buckets=num_buckets, bucket_hash_regions=regions)


def assemble_bucketed(
    method: str, num_rows: int, num_buckets: int, fits: BucketFits, *, seed: int = 0, table: str = "table",
    **hyperparams,
) -> IdMapping:
    """The bucketed mapping of ``fits``, which must cover every bucket (``hyperparams`` as fitted)."""
    settings = _assembly_settings(method, num_rows, num_buckets, fits.first_bucket, fits.splits, seed, table,
                                  hyperparams)
    return IdMapping.from_entries(fits.entry_ids, fits.entry_rows, num_rows, **settings)


def assemble_keyed(
    method: str, num_rows: int, num_buckets: int, fits: KeyedFits, *, seed: int = 0, table: str = "table",
    **hyperparams,
) -> IdMapping:
    """:func:`assemble_bucketed` of keyed fits (:func:`keyed_fits`): the same mapping, built from the
    keys and int32 rows (:meth:`IdMapping.from_bucket_keys`)."""
    settings = _assembly_settings(method, num_rows, num_buckets, fits.first_bucket, fits.splits, seed, table,
                                  hyperparams)
    return IdMapping.from_bucket_keys(fits.keys, fits.rows, num_rows, **settings)


def fit_bucketed(
    method: str,
    num_rows: int,
    num_buckets: int,
    profile: Optional[IdProfile],
    embeddings: Optional[EmbeddingsLike] = None,
    *,
    seed: int = 0,
    table: str = "table",
    **hyperparams,
) -> IdMapping:
    """Fits ``method`` in each of ``num_buckets`` buckets of ``num_rows / num_buckets`` rows.

    Example::

        mapping = fit_bucketed("frequency", 1024, 64, profile, table="t_C1")
        mapping(ids) // 16 == bucket_of(ids, 64, seed=0)     # every id stays in its bucket
    """
    check_bucket_rows(num_rows, num_buckets, table)
    profiles = bucket_profiles(profile, num_buckets, seed) if profile is not None else [IdProfile.empty()] * num_buckets
    fits = fit_bucket_range(method, num_rows, num_buckets, profiles, embeddings, seed=seed, table=table, **hyperparams)
    return assemble_bucketed(method, num_rows, num_buckets, fits, seed=seed, table=table, **hyperparams)
