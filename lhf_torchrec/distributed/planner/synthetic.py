"""Synthetic mappings for capacity planning: the shape of a fitted mapping without data."""

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torchrec import EmbeddingBagConfig

from lhf_torchrec.distributed.planner.memory import format_bytes
from lhf_torchrec.mapping.budget import row_bytes
from lhf_torchrec.mapping.buckets import MIN_ROWS_PER_BUCKET
from lhf_torchrec.mapping import perfect_hash
from lhf_torchrec.mapping.id_mapping import IdMapping, bucketed_storage_cost, dense_row_dtype, storage_cost


# Synthetic mappings leave smaller tables at full size: they are a negligible share of the memory.
MIN_COMPRESSED_IDS = 10_000
# The fullest of B buckets, in standard deviations above the mean bucket (see fullest_bucket_entries).
FULLEST_BUCKET_SIGMAS = 4.0


def fullest_bucket_entries(num_entries: int, num_buckets: int) -> int:
    """Entries of the fullest of ``num_buckets`` buckets when ``num_entries`` entries fall into buckets
    uniformly at random: the mean plus :data:`FULLEST_BUCKET_SIGMAS` standard deviations (the count
    of one bucket is binomial, and the largest of B such counts exceeds the mean by sqrt(2 ln B)
    deviations, 3.7 at B = 1024)."""
    mean = num_entries / num_buckets
    spread = math.sqrt(mean * (1 - 1 / num_buckets))
    return min(num_entries, math.ceil(mean + FULLEST_BUCKET_SIGMAS * spread))


def synthetic_mappings(
    tables: Sequence[EmbeddingBagConfig],
    compression: float,
    *,
    optimizer: str = "sgd",
    entry_fraction: float = 0.1,
    min_ids: int = MIN_COMPRESSED_IDS,
    num_buckets: Optional[int] = None,
) -> Dict[str, IdMapping]:
    """Mappings with the byte cost and row count of a fitted mapping, for planning without data.

    Assumption: a fitted mapping stores an entry for ``entry_fraction`` of a table's ids (hot and
    well-observed ids; every other id is hashed and costs nothing), in the storage a fit would
    choose (:func:`~lhf_torchrec.mapping.id_mapping.storage_cost`, the cheapest: dense, 4 bytes per id,
    a perfect hash table of int32 keys and int16 rows, about 6.6 bytes per entry, up to 2^15 rows, or
    sorted int32 keys and rows, 8 bytes per entry). The
    table keeps as many rows as fit in ``1 / compression`` of its full training bytes (weights and
    optimizer state) once the mapping is paid for. Tables with fewer than ``min_ids`` ids stay full
    size. The entries are zeros: these mappings are for the planner, never for lookups.

    With ``num_buckets`` (B), as ``lhf fit --num-buckets``: a table whose budget holds at least
    2 rows per bucket gets a bucketed mapping (rows a multiple of B; entries keyed by the 64-bit
    bucket hash, ~10.8 bytes each in a perfect hash table up to 2^15 rows, else 12 as sorted keys, and 8 bytes per
    bucket for its hash region, as the fitting budget
    counts them); the others stay unbucketed. Each bucketed mapping's fullest bucket holds
    :func:`fullest_bucket_entries` entries, the other buckets share the rest evenly (what
    ``IdMapping.bucket_entry_counts`` reports, and what the co-sharded layout pads every bucket to).
    """
    if not compression > 1:
        raise ValueError(f"compression must be > 1 (full bytes / compressed bytes), got {compression}")
    if not 0.0 <= entry_fraction <= 1.0:
        raise ValueError(f"entry_fraction must be in [0, 1], got {entry_fraction}")
    if num_buckets is not None and (isinstance(num_buckets, bool) or not isinstance(num_buckets, int)
                                    or num_buckets < 1):
        raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
    mappings: Dict[str, IdMapping] = {}
    for table in tables:
        ids = table.num_embeddings
        if ids < min_ids:
            continue
        per_row = row_bytes(table.embedding_dim, optimizer)
        budget = ids * per_row / compression
        entries = math.ceil(entry_fraction * ids)
        if num_buckets is not None and entries:
            bucketed = _bucketed(table.name, budget, per_row, entries, num_buckets, compression, entry_fraction)
            if bucketed is not None:
                mappings[table.name] = bucketed
                continue
        storage, nbytes, rows = _rows_left(budget, per_row, lambda num_rows: storage_cost(entries, ids, num_rows))
        if rows < 1:
            raise ValueError(
                f"table '{table.name}': {compression}x leaves {format_bytes(budget)} for "
                f"this table, but its mapping alone needs {format_bytes(nbytes)} ({entries} entries, {storage} "
                "storage); lower the compression or the entry fraction"
            )
        if storage == "dense":
            tensors = {"table": torch.zeros(ids, dtype=dense_row_dtype(rows))}
        elif storage == "none":
            tensors = {}
        else:  # ids - 1 < 2^31: int32 keys
            tensors = _sparse_tensors(storage, entries, torch.int32, torch.zeros(entries, dtype=torch.int32), rows)
        mappings[table.name] = IdMapping(
            rows, storage=storage, tensors=tensors, num_entries=entries if tensors else 0, method="synthetic",
            params={"compression": compression, "entry_fraction": entry_fraction}, table_name=table.name,
        )
    return mappings


def _bucketed(
    name: str, budget: float, per_row: int, entries: int, num_buckets: int, compression: float, entry_fraction: float
) -> Optional[IdMapping]:
    """A synthetic bucketed mapping, or None when the budget holds fewer than 2 rows per bucket."""
    storage, _, rows = _rows_left(budget - 8 * num_buckets, per_row,
                                 lambda num_rows: bucketed_storage_cost(entries, num_rows))
    rows = rows // num_buckets * num_buckets
    if rows < MIN_ROWS_PER_BUCKET * num_buckets:
        return None
    fullest = fullest_bucket_entries(entries, num_buckets)
    rest = torch.arange(entries - fullest, dtype=torch.int64) % max(1, num_buckets - 1) + 1
    buckets = torch.cat([torch.zeros(fullest, dtype=torch.int64), rest])
    rows_per_bucket = rows // num_buckets
    tensors = _sparse_tensors(storage, entries, torch.int64, (buckets * rows_per_bucket).to(torch.int32), rows)
    tensors["bucket_hash_regions"] = torch.tensor([[0, rows_per_bucket]], dtype=torch.int32).repeat(num_buckets, 1)
    return IdMapping(
        rows, storage=storage, tensors=tensors, num_entries=entries, method="synthetic", table_name=name,
        params={"compression": compression, "entry_fraction": entry_fraction, "fullest_bucket_entries": fullest},
        num_buckets=num_buckets,
    )


def _rows_left(budget: float, per_row: int, cost: Callable[[int], Tuple[str, int]]) -> Tuple[str, int, int]:
    """(storage, mapping bytes, rows): the rows the budget holds once the mapping, whose bytes depend on
    the rows (:func:`~lhf_torchrec.mapping.perfect_hash.row_bytes`), is paid for."""
    storage, nbytes = cost(max(1, int(budget // per_row)))
    guess = int((budget - nbytes) // per_row)
    if guess < 1:
        return storage, nbytes, guess
    storage, nbytes = cost(guess)  # fewer rows can only make the mapping cheaper: count it for them
    rows = int((budget - nbytes) // per_row)
    if storage == "perfect_hash":
        rows = min(rows, perfect_hash.rows_limit(guess))  # keep the rows within reach of the row bytes counted
    return storage, nbytes, rows


def _sparse_tensors(storage: str, entries: int, key_dtype: torch.dtype, rows: torch.Tensor,
                    num_rows: int) -> Dict[str, torch.Tensor]:
    """Zero keys and the given entry rows in the shapes of ``storage`` (sorted or perfect_hash)."""
    if storage == "sorted":
        return {"keys": torch.zeros(entries, dtype=key_dtype), "values": rows}
    if perfect_hash.slot_layout(entries, key_dtype.itemsize, num_rows) == "remainders":
        low_bits = perfect_hash.record_row_bits(num_rows)
        slots, groups = perfect_hash.table_sizes(entries, low_bits)
        remainders = torch.full((slots,), (1 << low_bits) - 1, dtype=torch.int64)  # empty: the all-ones row
        remainders[:entries] = rows  # the entries' rows (high bits 0), so that bucket_entry_counts sees them
        return {"slot_remainders": remainders, "group_pilots": torch.zeros(groups, dtype=torch.int16),
                "group_hash": torch.ones(4, dtype=torch.int64)}
    slots, groups = perfect_hash.table_sizes(entries)
    slot_rows = torch.full((slots,), -1, dtype=torch.int64)
    slot_rows[:entries] = rows  # the entries' rows, so that bucket_entry_counts sees them
    low, high = perfect_hash.encode_rows(slot_rows, num_rows)
    return {"slot_keys": torch.zeros(slots, dtype=key_dtype), "slot_rows": low, "slot_rows_high": high,
            "group_pilots": torch.zeros(groups, dtype=torch.int16), "group_hash": torch.ones(4, dtype=torch.int64)}
