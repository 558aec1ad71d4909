"""``IdMapping``: one table's learned hash function, raw id -> row in ``[0, num_rows)``.

A mapping is a set of *entries* (ids whose row was chosen by a fitting method: hot ids, clustered
ids) plus a seeded hash that places every other id (rare, unseen, negative, out of any range) in
a reserved region of rows. Only the entries cost memory, stored in whichever layout is cheaper
for this table:

* ``dense``: a row per id over the span ``[offset, offset + len(table))`` of the entry ids, in the
  narrowest signed integer that holds the rows (:func:`dense_row_dtype`: int8 up to 128 rows, int16
  up to 2^15, else int32). Ids of the span without an entry hold their precomputed hash row, so
  applying it is one gather and a range check. Cost: 1, 2 or 4 bytes x span.
* ``perfect_hash``: a static perfect hash table of keys (int32 relative to ``offset`` when the
  span fits, else int64) and rows (2 bytes up to 2^15 rows, 3 up to 2^23, else 4) at 97% load, with
  a 2-byte pilot per ~4.5 entries (:mod:`~lhf_torchrec.mapping.perfect_hash`): three gathers (four
  with 3-byte rows) and a comparison per id, no search. Cost: about 6.6 / 7.7 bytes x entries with
  int32 keys (2 / 3-byte rows), 10.8 / 11.8 with int64 keys. Relative keys too wide for int32 whose
  bits and the rows' fit in 63 (e.g. a 2^40 span into up to 2^22 rows) are stored as one int64 record
  per slot: two gathers, 8.8 bytes x entries.
* ``sorted``: sorted keys (int32 relative to ``offset`` when the span fits, else int64) and int32
  rows, applied with ``searchsorted`` (a binary search). Cost: 8 or 12 bytes x entries.
* ``none``: no entries (the hashing trick).

:func:`storage_cost` picks the cheapest storage from the number of entries, their span and the
rows, so budgets and the planner count a mapping's bytes before it is fitted, and lookup speed never
takes rows from the table: the perfect hash table wherever it is no larger than sorted keys (any
table of up to 2^23 rows but a handful of entries), sorted keys elsewhere.

``probes=2`` is frequency-based double hashing: an id without an entry takes two distinct rows of
the hash region, whose embeddings the bag sums. Only ``remap_jagged`` can express that in a
KeyedJaggedTensor (an id becomes two values); ``__call__`` returns an (n, 2) tensor with -1 in the
second column for ids that have an entry.

A *bucketed* mapping (``num_buckets=B``, the foundation of mappings co-sharded row-wise with their
table) splits its M rows into B buckets of M / B rows. It is a function of the id's bucket hash
``h = bucket_hash(id, B, seed)`` only (:mod:`~lhf_torchrec.mapping.hashing`), because the rank that
owns a bucket in a co-sharded table only ever sees h (:mod:`lhf_torchrec.modules.cosharded`): the
bucket is the value range h falls in, entries are keyed by h (a sparse storage, int64 keys), and an
id without an entry is hashed, by h, into its bucket's own hash region (``bucket_hash_regions``:
offset and rows inside the bucket, one pair per bucket). So every id's row lies in
``[b * M / B, (b + 1) * M / B)``; ``hash_offset`` and ``hash_rows`` are unused (0 and M). About four
64-bit ids share each h: two ids with the same h map to the same row (:meth:`IdMapping.from_entries`
refuses entries for both; bucketed fitting keeps the more accessed one, see
:func:`~lhf_torchrec.mapping.buckets.bucket_profiles`).

The mapping is an ``nn.Module`` whose tensors are buffers, so it moves with ``.to(device)`` and is
saved in a model's ``state_dict``. ``save``/``load`` use safetensors with a checksum.

Compiled apply: ``mapping.compile()`` (:meth:`IdMapping.compile`, ``nn.Module.compile`` with
:data:`COMPILE_SETTINGS`) turns the lookup and the hash into one fused kernel, one graph for every
batch size; the first call compiles (3-12 s on CPU). Eager, every element-wise op of the hash is a
pass over memory (docs/performance.md, "Apply throughput"). ``forward`` has no data-dependent
control flow when compiled or exported, so ``torch.compile`` of a module that applies mappings
compiles them too, and ``torch.export`` exports a mapping.
"""

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from lhf_torchrec.files import atomic_write, read_safetensors
from lhf_torchrec.mapping import native, perfect_hash
from lhf_torchrec.mapping.hashing import bucket_hash, bucket_hashes, hash_ids, input_hash_size

FORMAT_VERSION = 1
_INT32_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_HASH_CHUNK = 1 << 16  # ids hashed at once when a dense table precomputes its span's hash rows
_ENTRY_CHUNK = 1 << 18  # bucketed entries hashed and checked at once
MAPPINGS_FORMAT = "lhf_torchrec.mapping"
# What IdMapping.compile passes to torch.compile: one graph (a graph break is an error), dynamic batch
# size. "cpp.simdlen": 1 makes inductor's CPU code scalar: its vectorized code loads gathered elements
# through a stack buffer, 2-3x slower than scalar loads for the random gathers a lookup is made of
# (measured on AVX2: docs/performance.md, "Apply throughput"). It does not apply to GPU (triton) code.
COMPILE_SETTINGS: Dict[str, Any] = {"fullgraph": True, "dynamic": True, "options": {"cpp.simdlen": 1}}


SPARSE_STORAGES = ("perfect_hash", "sorted")


def _sparse_cost(num_entries: int, key_bytes: int, num_rows: int, key_bits: int = 64) -> Tuple[str, int]:
    """The cheaper sparse storage and its bytes (keys of ``key_bytes``, ``key_bits`` relative to the
    smallest); the perfect hash table (faster) on a tie."""
    sorted_bytes = num_entries * (4 + key_bytes)
    table_bytes = perfect_hash.table_bytes(num_entries, key_bytes, num_rows, key_bits)
    return ("perfect_hash", table_bytes) if table_bytes <= sorted_bytes else ("sorted", sorted_bytes)


def dense_row_dtype(num_rows: int) -> torch.dtype:
    """The narrowest signed integer dtype of a dense table's rows: rows lie in ``[0, num_rows)`` and -1
    marks an id without an entry in a double-hashing table. Narrow rows are what make a dense table the
    cheapest storage for small tables (a 125-id table into 10 rows: 125 bytes instead of 500), whose
    budget would otherwise hash most of their ids (docs/results.md, stop 16)."""
    return torch.int8 if num_rows <= 128 else torch.int16 if num_rows <= 1 << 15 else torch.int32


def storage_cost(num_entries: int, span: int, num_rows: int) -> Tuple[str, int]:
    """The storage for ``num_entries`` entry ids spread over ``span`` ids, mapped into ``num_rows`` rows,
    and its bytes: the cheapest one, so that lookup speed never costs the table rows.

    On a tie the faster: dense (one gather), then the perfect hash table (three gathers), then sorted
    keys (a binary search). The perfect hash table stores rows as int16 when ``num_rows`` fits, which
    is what makes it the cheapest for tables of up to 2^15 rows (docs/method.md, "Storage").
    """
    if num_entries == 0:
        return "none", 0
    sparse = _sparse_cost(num_entries, 4 if span - 1 <= _INT32_MAX else 8, num_rows, perfect_hash.key_bits(span))
    dense_bytes = dense_row_dtype(num_rows).itemsize * span
    return ("dense", dense_bytes) if dense_bytes <= sparse[1] else sparse


def bucketed_storage_cost(num_entries: int, num_rows: int) -> Tuple[str, int]:
    """Storage and bytes of the entries of a bucketed mapping into ``num_rows`` rows, keyed by int64
    bucket hash."""
    return _sparse_cost(num_entries, 8, num_rows) if num_entries else ("none", 0)


def _eager_cpu(ids: torch.Tensor) -> bool:
    """Whether ``forward`` may take data-dependent shortcuts (a host sync, a shape that depends on the
    values): eager on CPU they save whole passes over memory. Compiled (``torch.compile``: one fused
    kernel hashes every id for about the cost of a gather, and a data-dependent shape would break the
    graph) and on accelerators (a sync stalls the stream) the branch-free form is faster."""
    return ids.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_buckets(table: str, num_rows: int, num_buckets: int, regions: torch.Tensor, probes: int,
                   storage: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """A bucketed mapping's rows split into whole buckets, each with a hash region inside it, and its
    entries are keyed by bucket hash (int64 keys)."""
    if storage == "dense" or (storage == "sorted" and tensors["keys"].dtype != torch.int64):
        raise ValueError(f"table '{table}': a bucketed mapping keys its entries by int64 bucket hash "
                         f"('perfect_hash', 'sorted' with int64 keys, or 'none'), got storage '{storage}'")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"table '{table}': num_buckets must be an integer >= 1, got {num_buckets!r}")
    if num_rows % num_buckets:
        raise ValueError(f"table '{table}': {num_rows} rows do not split into {num_buckets} equal buckets")
    rows_per_bucket = num_rows // num_buckets
    if regions.shape != (num_buckets, 2) or regions.dtype.is_floating_point:
        raise ValueError(f"table '{table}': bucket_hash_regions must be an integer ({num_buckets}, 2) tensor, "
                         f"got {regions.dtype} {tuple(regions.shape)}")
    offset, rows = regions[:, 0].long(), regions[:, 1].long()
    bad = (offset < 0) | (rows < probes) | (offset + rows > rows_per_bucket)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"table '{table}': bucket {b}'s hash region [{int(offset[b])}, {int(offset[b] + rows[b])}) "
                         f"must lie in its {rows_per_bucket} rows and hold at least {probes} row(s)")


def _duplicate_key(keys: np.ndarray, bucket_width: int) -> Optional[int]:
    """The smallest key that ``keys`` holds more than once, or None.

    Keys in bucket order (``keys // bucket_width`` never decreasing: the entries of a bucketed fit, and
    their gather across ranks, whose buckets are contiguous ranges in rank order) are sorted one
    bucket at a time, so the sort copies one bucket's keys; any other order sorts a copy of all."""
    bounds = [0]
    for start in range(0, keys.size, _ENTRY_CHUNK):
        steps = np.diff(keys[start:start + _ENTRY_CHUNK + 1] // bucket_width)
        if (steps < 0).any():  # not in bucket order
            bounds = [0]
            break
        bounds.extend((start + 1 + np.flatnonzero(steps)).tolist())
    bounds.append(keys.size)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        run = np.sort(keys[lo:hi])
        same = np.flatnonzero(run[1:] == run[:-1])
        if same.size:
            return int(run[same[0]])
    return None


def bucket_entry_keys(entry_ids: np.ndarray, entry_rows: np.ndarray, num_rows: int, num_buckets: int, seed: int,
                      table: str = "table") -> np.ndarray:
    """The int64 bucket hash of every entry id of a bucketed mapping (what its entries are keyed by),
    after checking the entries as :meth:`IdMapping.from_entries` does, errors naming the ids: no id
    twice, no two ids of one bucket hash, every row in [0, ``num_rows``) and in its id's bucket.

    A distributed fit keys each rank's entries with it before the gather (:mod:`lhf_torchrec.distributed.fit`):
    every rank then receives 12 bytes per entry (key and int32 row, :meth:`IdMapping.from_bucket_keys`)
    instead of the id, its int64 row and the key computed again."""
    entry_ids = np.asarray(entry_ids, dtype=np.int64)
    entry_rows = np.asarray(entry_rows)
    _check_entry_rows(entry_rows, num_rows, table)
    width = input_hash_size(num_buckets) // num_buckets
    keys = bucket_hashes(entry_ids, num_buckets, seed)
    same = _duplicate_key(keys, width)
    if same is not None:
        i, j = np.flatnonzero(keys == same)[:2]
        what = (f"id {entry_ids[i]} has more than one entry" if entry_ids[i] == entry_ids[j] else
                f"ids {entry_ids[i]} and {entry_ids[j]} have the same bucket hash {same} (a bucketed "
                f"mapping cannot tell them apart): give only one of them an entry")
        raise ValueError(f"table '{table}': {what}")
    outside = _outside_bucket(keys, entry_rows, width, num_rows // num_buckets)
    if outside is not None:
        raise ValueError(f"table '{table}': entry row {entry_rows[outside]} of id {entry_ids[outside]} is outside "
                         f"its bucket {keys[outside] // width}")
    return keys


def _check_entry_rows(rows: np.ndarray, num_rows: int, table: str) -> None:
    """Raises unless every entry row lies in [0, ``num_rows``)."""
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        bad = rows[(rows < 0) | (rows >= num_rows)][0]
        raise ValueError(f"table '{table}': entry row {bad} is outside [0, {num_rows})")


def _outside_bucket(keys: np.ndarray, rows: np.ndarray, bucket_width: int, rows_per_bucket: int) -> Optional[int]:
    """The first entry whose row is not in its key's bucket, or None (by chunk: no entry-sized temporaries)."""
    for start in range(0, keys.size, _ENTRY_CHUNK):
        buckets = keys[start:start + _ENTRY_CHUNK] // bucket_width
        outside = np.flatnonzero(rows[start:start + _ENTRY_CHUNK] // rows_per_bucket != buckets)
        if outside.size:
            return start + int(outside[0])
    return None


class IdMapping(nn.Module):
    """Maps raw int64 ids to rows of a compressed embedding table.

    Built by the fitting methods (:func:`lhf_torchrec.fit_mapping`) or :meth:`from_entries`;
    applied with ``mapping(ids)``. Example::

        mapping = IdMapping.from_entries(np.array([7, 42]), np.array([0, 1]), num_rows=10,
                                         hash_offset=2, hash_rows=8, method="frequency")
        mapping(torch.tensor([42, 7, 123456789]))   # tensor([1, 0, <a row in [2, 10)>])
    """

    def __init__(
        self,
        num_rows: int,
        *,
        hash_offset: int = 0,
        hash_rows: Optional[int] = None,
        probes: int = 1,
        seed: int = 0,
        storage: str = "none",
        offset: int = 0,
        tensors: Optional[Mapping[str, torch.Tensor]] = None,
        num_entries: int = 0,
        method: str = "hash",
        params: Optional[Mapping] = None,
        layout: Optional[Mapping[str, int]] = None,
        table_name: str = "table",
        entry_share: Optional[float] = None,
        num_buckets: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
            raise ValueError(f"table '{table_name}': num_rows must be an integer >= 1, got {num_rows!r}")
        hash_rows = num_rows - hash_offset if hash_rows is None else hash_rows
        if hash_rows < probes or hash_offset < 0 or hash_offset + hash_rows > num_rows:
            raise ValueError(
                f"table '{table_name}': hash region [{hash_offset}, {hash_offset + hash_rows}) must lie in "
                f"[0, {num_rows}) and hold at least {probes} row(s)"
            )
        if probes not in (1, 2):
            raise ValueError(f"table '{table_name}': probes must be 1 or 2, got {probes}")
        tensors = dict(tensors or {})
        expected = {"none": set(), "dense": {"table"}, "sorted": {"keys", "values"},
                    "perfect_hash": set({"records": perfect_hash.RECORD_TENSORS,
                                         "remainders": perfect_hash.REMAINDER_TENSORS,
                                         "split": perfect_hash.TENSORS}[perfect_hash.slot_layout_of(tensors)])}
        needed = expected.get(storage, set()) | ({"bucket_hash_regions"} if num_buckets is not None else set())
        if storage not in expected or set(tensors) != needed:
            raise ValueError(
                f"table '{table_name}': storage '{storage}'{' (bucketed)' if num_buckets is not None else ''} "
                f"needs tensors {sorted(needed)}, got {sorted(tensors)}"
            )
        if storage == "dense" and tensors["table"].dtype not in (torch.int8, torch.int16, torch.int32):
            raise ValueError(f"table '{table_name}': a dense table's rows must be int8, int16 or int32, "
                             f"got {tensors['table'].dtype}")
        if storage == "perfect_hash":
            perfect_hash.check(tensors, num_rows, table_name)
            # Python ints: multiplying by a scalar is cheaper than by a one-element tensor.
            self._group_hash = tuple(int(w) for w in tensors["group_hash"])
        if num_buckets is not None:
            _check_buckets(table_name, int(num_rows), num_buckets, tensors["bucket_hash_regions"], probes, storage,
                           tensors)
        self.num_rows = int(num_rows)
        self.hash_offset = int(hash_offset)
        self.hash_rows = int(hash_rows)
        self.probes = int(probes)
        self.seed = int(seed)
        self.storage = storage
        self.offset = int(offset)
        self.num_entries = int(num_entries)
        self.method = method
        self.params = dict(params or {})
        self.layout = {k: int(v) for k, v in (layout or {"hashed": num_rows}).items()}
        self.table_name = table_name
        # Share of the fitting data's id accesses that hit an entry (None: not recorded); a much
        # lower share on training data means the mapping was fitted on other data.
        self.entry_share = None if entry_share is None else float(entry_share)
        self.num_buckets = None if num_buckets is None else int(num_buckets)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.contiguous())
        self._check_rows()
        # The slot layout the CPU kernel applies (native.py), where it can run.
        self._native_layout = (perfect_hash.slot_layout_of(tensors) if storage == "perfect_hash" and probes == 1
                               and num_buckets is None and native.load() else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_entries(
        cls,
        entry_ids: np.ndarray,
        entry_rows: np.ndarray,
        num_rows: int,
        *,
        bucket_hash_regions: Optional[torch.Tensor] = None,
        **settings: Any,
    ) -> "IdMapping":
        """Builds a mapping from explicit (id, row) entries, in the cheaper storage for them.

        ``settings`` are the keyword arguments of :class:`IdMapping` that do not describe storage
        (``hash_offset``, ``hash_rows``, ``probes``, ``seed``, ``method``, ``params``, ``layout``,
        ``table_name``, ``num_buckets``), with the constructor's defaults. Bucketed (``num_buckets``):
        ``bucket_hash_regions`` is a (B, 2) tensor of (offset, rows) of each bucket's hash region
        inside the bucket, and every entry's row must lie in its id's bucket.
        """
        base = {} if bucket_hash_regions is None else {"bucket_hash_regions": bucket_hash_regions.to(torch.int32)}
        # The same settings without entries: checks them, and hashes the ids a dense table precomputes.
        hashed = cls(num_rows, tensors=dict(base), **settings)
        table_name = hashed.table_name
        entry_ids = np.asarray(entry_ids, dtype=np.int64)
        entry_rows = np.asarray(entry_rows, dtype=np.int64)
        if hashed.num_buckets is not None:
            keys = bucket_entry_keys(entry_ids, entry_rows, hashed.num_rows, hashed.num_buckets, hashed.seed,
                                     table_name)
            return cls._bucketed_from_keys(hashed, keys, entry_rows, base, settings)
        _check_entry_rows(entry_rows, num_rows, table_name)
        order = np.argsort(entry_ids, kind="stable")
        entry_ids, entry_rows = entry_ids[order], entry_rows[order]
        if entry_ids.size and np.any(entry_ids[1:] == entry_ids[:-1]):
            dup = entry_ids[1:][entry_ids[1:] == entry_ids[:-1]][0]
            raise ValueError(f"table '{table_name}': id {dup} has more than one entry")
        span = int(entry_ids[-1]) - int(entry_ids[0]) + 1 if entry_ids.size else 0
        storage, _ = storage_cost(int(entry_ids.size), span, hashed.num_rows)
        return cls._stored(hashed, entry_ids, entry_rows, storage, base, settings)

    @classmethod
    def _stored(cls, hashed: "IdMapping", keys: np.ndarray, rows: np.ndarray, storage: str,
                base: Dict[str, torch.Tensor], settings: Mapping[str, Any]) -> "IdMapping":
        """The mapping of ``hashed``'s settings whose entries are (sorted unique int64 ``keys``, ``rows``),
        in ``storage``. Keys are ids, or bucket hashes for a bucketed mapping (whose perfect hash table
        takes them in any order: :meth:`_bucketed_from_entries`)."""
        tensors: Dict[str, torch.Tensor] = dict(base)
        storage = storage if keys.size else "none"  # without entries every storage is the hash alone
        offset = int(keys[0]) if keys.size else 0
        if storage == "dense":
            if hashed.num_buckets is not None:
                raise ValueError(f"table '{hashed.table_name}': a bucketed mapping cannot be stored densely")
            span = int(keys[-1]) - offset + 1 if keys.size else 0
            if hashed.probes == 1:
                # Precompute the hash of every id in the span: lookups then never hash in-span ids.
                # By chunk: hashing makes several span-sized int64 temporaries, out of cache (7x slower at 1e7).
                table = torch.empty(span, dtype=dense_row_dtype(hashed.num_rows))
                for start in range(0, span, _HASH_CHUNK):
                    table[start:start + _HASH_CHUNK] = hashed(
                        torch.arange(start, min(span, start + _HASH_CHUNK), dtype=torch.int64) + offset)
            else:
                table = torch.full((span,), -1, dtype=dense_row_dtype(hashed.num_rows))
            table[torch.from_numpy(keys - offset)] = torch.from_numpy(rows).to(table.dtype)
            tensors["table"] = table
        elif storage in SPARSE_STORAGES:
            # int32 keys relative to the smallest when they fit (as storage_cost counts them). Bucketed
            # mappings keep int64 keys: storage_cost does not know their span.
            # Wider keys relative to the smallest go into perfect hash records where they pack with the rows,
            # int64 keys into remainders where those cost no more (perfect_hash.slot_layout).
            bits = perfect_hash.key_bits(int(keys[-1]) - offset + 1) if hashed.num_buckets is None else 64
            relative = bits <= 31
            slot_layout = (perfect_hash.slot_layout(int(keys.size), 4 if relative else 8, hashed.num_rows, bits)
                           if storage == "perfect_hash" else None)
            offset = offset if relative or slot_layout == "records" else 0
            if storage == "sorted":
                tensors["keys"] = torch.from_numpy((keys - offset).astype(np.int32) if relative else keys)
                tensors["values"] = torch.from_numpy(rows.astype(np.int32))
            else:
                tensors.update(perfect_hash.build(torch.from_numpy(keys - offset if offset else keys),
                                                  torch.from_numpy(rows), hashed.seed,
                                                  hashed.table_name, torch.int32 if relative else torch.int64,
                                                  hashed.num_rows, slot_layout))
        elif storage != "none":
            raise ValueError(f"table '{hashed.table_name}': unknown storage '{storage}'")
        return cls(hashed.num_rows, storage=storage, offset=offset, tensors=tensors, num_entries=int(keys.size),
                   **settings)

    def _settings(self) -> Dict[str, Any]:
        """The constructor's keyword arguments that do not describe storage."""
        return {"hash_offset": self.hash_offset, "hash_rows": self.hash_rows, "probes": self.probes, "seed": self.seed,
                "method": self.method, "params": self.params, "layout": self.layout, "table_name": self.table_name,
                "entry_share": self.entry_share, "num_buckets": self.num_buckets}

    def stored_entries(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys, rows) of the stored entries, sorted by key, both int64: keys are ids, or bucket hashes
        for a bucketed mapping. A dense table's entries are the ids of its span whose row is not
        their hash row (:meth:`has_entry`)."""
        if self.storage == "sorted":
            keys = self.keys.to(torch.int64) + self.offset if self.keys.dtype == torch.int32 else self.keys
            return keys, self.values.to(torch.int64)
        if self.storage == "perfect_hash":
            keys, rows = self._slot_entries()
            real = rows >= 0
            keys, order = torch.sort(keys[real] + self.offset)
            return keys, rows[real].index_select(0, order)
        if self.storage == "dense":
            ids = torch.arange(self.table.numel(), dtype=torch.int64, device=self.table.device) + self.offset
            real = self.has_entry(ids)
            return ids[real], self.table[real].to(torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty

    def with_storage(self, storage: str) -> "IdMapping":
        """The same function stored in ``storage`` (``dense``, ``sorted``, ``perfect_hash``; ``none``
        when there are no entries), e.g. to compare layouts. Example::

            mapping.with_storage("sorted")(ids).equal(mapping(ids))   # True
        """
        keys, rows = (t.cpu().numpy() for t in self.stored_entries())
        base = {"bucket_hash_regions": self.bucket_hash_regions.cpu()} if self.num_buckets is not None else {}
        settings = self._settings()
        hashed = type(self)(self.num_rows, tensors=dict(base), **settings)
        return self._stored(hashed, keys, rows, storage, base, settings)

    @classmethod
    def from_bucket_keys(
        cls, keys: np.ndarray, rows: np.ndarray, num_rows: int, *, bucket_hash_regions: torch.Tensor, **settings: Any
    ) -> "IdMapping":
        """A bucketed mapping (``settings`` must give ``num_buckets``) from entries keyed by bucket hash
        (int64 ``keys``, as :func:`bucket_entry_keys` gives them, with their ``rows`` of any integer
        dtype): :meth:`from_entries` without the ids. Errors name the keys: each key once, in
        [0, input_hash_size), its row in its bucket.

        What a distributed fit assembles the replicated mapping from (each rank has checked its own
        entries by id: :func:`bucket_entry_keys`)."""
        if settings.get("num_buckets") is None:
            raise ValueError(f"table '{settings.get('table_name', 'table')}': entries keyed by bucket hash make a "
                             f"bucketed mapping: give num_buckets")
        base = {"bucket_hash_regions": bucket_hash_regions.to(torch.int32)}
        hashed = cls(num_rows, tensors=dict(base), **settings)
        table_name, width = hashed.table_name, hashed._bucket_width
        keys, rows = np.asarray(keys), np.asarray(rows)
        if keys.dtype != np.int64 or keys.shape != rows.shape or keys.ndim != 1 or not np.issubdtype(rows.dtype,
                                                                                                    np.integer):
            raise ValueError(f"table '{table_name}': bucket keys must be 1-D int64 with one integer row each, got "
                             f"{keys.dtype} {keys.shape} keys and {rows.dtype} {rows.shape} rows")
        _check_entry_rows(rows, num_rows, table_name)
        if keys.size and (keys.min() < 0 or keys.max() >= input_hash_size(hashed.num_buckets)):
            bad = keys[(keys < 0) | (keys >= input_hash_size(hashed.num_buckets))][0]
            raise ValueError(f"table '{table_name}': bucket hash {bad} is outside [0, "
                             f"{input_hash_size(hashed.num_buckets)})")
        same = _duplicate_key(keys, width)
        if same is not None:
            raise ValueError(f"table '{table_name}': bucket hash {same} has more than one entry")
        outside = _outside_bucket(keys, rows, width, hashed.rows_per_bucket)
        if outside is not None:
            raise ValueError(f"table '{table_name}': entry row {rows[outside]} of bucket hash {keys[outside]} is "
                             f"outside its bucket {keys[outside] // width}")
        return cls._bucketed_from_keys(hashed, keys, rows, base, settings)

    @classmethod
    def _bucketed_from_keys(cls, hashed: "IdMapping", keys: np.ndarray, rows: np.ndarray,
                            base: Dict[str, torch.Tensor], settings: Mapping[str, Any]) -> "IdMapping":
        """The bucketed mapping of checked entries keyed by bucket hash h. A perfect hash table does not
        depend on its entries' order (:func:`~lhf_torchrec.mapping.perfect_hash.build`), so they stay in
        the given order: the whole mapping of a distributed fit is assembled on every rank with the
        build's own memory over the gathered keys and rows, no sorted copies. Only sorted keys (``sorted``
        storage) sort."""
        storage, _ = bucketed_storage_cost(int(keys.size), hashed.num_rows)
        if storage == "sorted":
            order = np.argsort(keys, kind="stable")
            keys, rows = keys[order], rows[order]
        return cls._stored(hashed, keys, rows, storage, base, settings)

    def _slot_entries(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(int64 relative key, row) of every perfect hash slot; row -1 where empty."""
        if "slot_records" in self._buffers:
            return perfect_hash.record_values(self.slot_records, self.num_rows)
        if "slot_remainders" in self._buffers:
            return perfect_hash.remainder_values(self.slot_remainders, self.group_pilots, self._group_hash,
                                                 self.num_rows)
        return self.slot_keys.to(torch.int64), perfect_hash.slot_row_values(dict(self.named_buffers()))

    def _check_rows(self) -> None:
        if self.storage == "perfect_hash":
            low, high = perfect_hash.slot_row_range(dict(self.named_buffers()), self.num_rows)
        else:
            rows = {"dense": "table", "sorted": "values"}.get(self.storage)
            rows = getattr(self, rows) if rows is not None else None
            if rows is None or not rows.numel():
                return
            low, high = int(rows.min()), int(rows.max())
        if high >= self.num_rows or low < -1:
            raise ValueError(f"table '{self.table_name}': stored rows exceed [0, {self.num_rows})")

    @property
    def nbytes(self) -> int:
        """Bytes of memory the mapping holds (its buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def has_entry(self, ids: torch.Tensor) -> torch.Tensor:
        """True where an id has a stored entry (its row was chosen by fitting, not hashed)."""
        flat = self._keys_of(ids.reshape(-1))
        _, found = self._lookup(flat)
        if self.storage == "dense" and self.probes == 1:
            # Dense tables store hash rows for in-span ids without an entry: not entries (an entry
            # whose row equals its hash row counts as hashed: it maps the same either way).
            found = found & ~self._hashed_in_span(flat)
        return found.view(ids.shape)

    def _hashed_in_span(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(ids)[0] == self._hashed(ids)

    @property
    def rows_per_bucket(self) -> int:
        """Rows of each bucket (all rows when unbucketed)."""
        return self.num_rows // (self.num_buckets or 1)

    @property
    def _bucket_width(self) -> int:
        """Bucket hashes per bucket: bucket b holds h in ``[b * width, (b + 1) * width)``."""
        return input_hash_size(self.num_buckets) // self.num_buckets

    def _keys_of(self, ids: torch.Tensor) -> torch.Tensor:
        """What entries are keyed by and hashes hash (flat int64): the bucket hash of a bucketed
        mapping, else the id itself."""
        ids = ids.to(torch.int64)
        return ids if self.num_buckets is None else bucket_hash(ids, self.num_buckets, self.seed)

    def bucket_entry_counts(self) -> torch.Tensor:
        """Entries of each bucket, a (num_buckets,) int64 tensor (bucketed mappings only)."""
        if self.num_buckets is None:
            raise ValueError(f"table '{self.table_name}': the mapping is not bucketed")
        rows = self.stored_entries()[1].cpu()
        return torch.bincount(rows // self.rows_per_bucket, minlength=self.num_buckets)

    def _hash_region(self, keys: torch.Tensor) -> Tuple[Union[int, torch.Tensor], Union[int, torch.Tensor]]:
        """(first row, rows) of the hash region of each key: the table's, or the one of its bucket."""
        if self.num_buckets is None:
            return self.hash_offset, self.hash_rows
        bucket = torch.div(keys, self._bucket_width, rounding_mode="floor")
        region = self.bucket_hash_regions.index_select(0, bucket).to(torch.int64)
        return bucket * self.rows_per_bucket + region[:, 0], region[:, 1]

    def _hashed(self, ids: torch.Tensor) -> torch.Tensor:
        """The hash row of every (flat int64) key (:meth:`_keys_of`), whether it has an entry or not."""
        first, rows = self._hash_region(ids)
        return first + hash_ids(ids, rows, self.seed)

    # ------------------------------------------------------------------ applying
    def compile(self, **settings: Any) -> None:
        """Compiles ``forward`` in place with ``torch.compile`` (``nn.Module.compile``): :data:`COMPILE_SETTINGS`,
        updated by ``settings``. Same rows as eager; the first call compiles, and sizes 0 and 1 once more
        (dynamo specializes them). Example::

            mapping.compile()
            mapping(ids)   # compiles on the first call, then one fused kernel per call

        The mapping's seed, sizes and offsets are constants of its kernel, so every mapping compiled on
        its own is another compiled version of the same function, of which dynamo keeps
        ``torch._dynamo.config.recompile_limit`` (8): beyond, raise the limit, or compile the module that
        applies the mappings (one graph for all of them).
        """
        super().compile(**{**COMPILE_SETTINGS, **settings})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (same shape; an extra last dim of 2 when ``probes == 2``)."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"table '{self.table_name}': ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"table '{self.table_name}': ids must be an integer tensor, got dtype {ids.dtype}")
        flat = self._keys_of(ids.reshape(-1))
        if self._native_layout is not None and flat.device.type == "cpu":
            if self._native_layout == "split":
                slots, rows_low, rows_high = self.slot_keys, self.slot_rows, self.slot_rows_high
            else:
                slots = self.get_buffer(f"slot_{self._native_layout}")
                rows_low = rows_high = self.group_pilots[:0]
            return native.perfect_hash_rows(
                flat, slots, rows_low, rows_high, self.group_pilots, self.group_hash,
                native.LAYOUTS[self._native_layout], perfect_hash.record_row_bits(self.num_rows), self.offset,
                self.hash_offset, self.hash_rows, self.seed).view(ids.shape)
        if self.storage == "dense" and self.probes == 1 and _eager_cpu(flat) and flat.numel():
            # Eager CPU fast path: when every id lies in the stored span (one reduction, no host sync
            # cost on CPU), a lookup is a single gather: no range masks, nothing to hash.
            low, high = torch.aminmax(flat)
            if int(low) >= self.offset and int(high) < self.offset + self.table.numel():
                index = flat - self.offset if self.offset else flat
                return self.table.index_select(0, index).to(torch.int64).view(ids.shape)
        rows, found = self._lookup(flat)
        if self.probes == 1:
            return self._fill_hashed(rows, found, flat).view(ids.shape)
        first, second = self._double_hash(flat)
        rows = torch.where(found, rows, first)
        second = torch.where(found, torch.full_like(second, -1), second)
        return torch.stack([rows, second], dim=-1).view(*ids.shape, 2)

    def remap_jagged(
        self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Remaps the values of a jagged feature; with ``probes == 2`` bags grow by one value per hashed id."""
        if self.probes == 1:
            return self(values), lengths, weights
        rows = self(values)
        keep = rows >= 0
        per_value = keep.sum(dim=1)
        bag_of_value = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        new_lengths = torch.zeros_like(lengths).index_add_(0, bag_of_value, per_value.to(lengths.dtype))
        new_weights = None if weights is None else torch.repeat_interleave(weights, per_value)
        return rows[keep], new_lengths, new_weights

    def _lookup(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, found): rows of ids that have a stored row; ``found`` is False where they must be hashed."""
        # index_select, not tensor[index]: on CPU advanced indexing is several times slower.
        if self.storage == "dense":
            # Clamp in id space, then subtract: ids - offset could wrap around int64 for extreme ids.
            table: torch.Tensor = self.table
            clamped = ids.clamp(self.offset, self.offset + table.numel() - 1)
            rows = table.index_select(0, clamped - self.offset if self.offset else clamped).to(torch.int64)
            in_span = clamped == ids
            return rows, (in_span & (rows >= 0)) if self.probes == 2 else in_span
        if self.storage == "sorted":
            keys: torch.Tensor = self.keys
            if keys.dtype == torch.int32:
                clamped = ids.clamp(self.offset, min(self.offset + _INT32_MAX, _INT64_MAX))
                query = (clamped - self.offset).to(torch.int32)
                in_range = clamped == ids
            else:
                query, in_range = ids, None
            pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
            found = keys.index_select(0, pos) == query
            found = found & in_range if in_range is not None else found
            return self.values.index_select(0, pos).to(torch.int64), found
        if self.storage == "perfect_hash":
            # Relative keys: ids - offset wraps around for extreme ids, but equals a key k only
            # when id = offset + k (mod 2^64), i.e. for the entry's id itself.
            keys = ids - self.offset if self.offset else ids
            if "slot_records" in self._buffers:
                return perfect_hash.lookup_records(keys, self.slot_records, perfect_hash.record_row_bits(self.num_rows),
                                                   self.group_pilots, self._group_hash)
            if "slot_remainders" in self._buffers:
                return perfect_hash.lookup_remainders(keys, self.slot_remainders,
                                                      perfect_hash.record_row_bits(self.num_rows), self.group_pilots,
                                                      self._group_hash)
            return perfect_hash.lookup(keys, self.slot_keys, self.slot_rows, self.slot_rows_high, self.group_pilots,
                                       self._group_hash)
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)

    def _fill_hashed(self, rows: torch.Tensor, found: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.storage == "none":
            return self._hashed(ids)
        if _eager_cpu(ids):
            # Eager on CPU hash only the ids that need it: each op of the hash is a pass over memory,
            # and most lookups of a fitted table hit an entry.
            missing = (~found).nonzero().squeeze(1)
            if missing.numel():
                rows.index_copy_(0, missing, self._hashed(ids.index_select(0, missing)))
            return rows
        return torch.where(found, rows, self._hashed(ids))

    def _double_hash(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        offset, hash_rows = self._hash_region(ids)
        first = hash_ids(ids, hash_rows, self.seed)
        # The second probe is drawn from the other hash_rows - 1 rows, so the two rows always differ.
        step = 1 + hash_ids(ids, hash_rows - 1, self.seed + 1)
        second = torch.remainder(first + step, hash_rows)
        return offset + first, offset + second

    # ------------------------------------------------------------------ description and persistence
    def metadata(self) -> Dict:
        meta = {
            "format_version": FORMAT_VERSION,
            "table_name": self.table_name,
            "method": self.method,
            "params": self.params,
            "num_rows": self.num_rows,
            "num_entries": self.num_entries,
            "seed": self.seed,
            "storage": self.storage,
            "offset": self.offset,
            "hash_offset": self.hash_offset,
            "hash_rows": self.hash_rows,
            "probes": self.probes,
            "layout": self.layout,
            "nbytes": self.nbytes,
        }
        if self.entry_share is not None:  # absent, files written before it was recorded keep their checksum
            meta["entry_share"] = self.entry_share
        if self.num_buckets is not None:  # absent when unbucketed: older files load (and check) unchanged
            meta["num_buckets"] = self.num_buckets
        return meta

    def _state_tensors(self) -> Dict[str, torch.Tensor]:
        return {name: buf.detach().cpu().contiguous() for name, buf in self.named_buffers()}

    @property
    def fingerprint(self) -> str:
        """sha256 of the metadata and tensors: equal fingerprints mean the same function."""
        meta = self.metadata()
        del meta["table_name"]  # the same function under another table name is the same function
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for name, tensor in sorted(self._state_tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    # The fingerprint travels in state_dict as extra state (a uint8 tensor, so DCP stores it like any
    # tensor). Loading runs after the buffers were copied in: a checkpoint whose mapping differs from
    # this module's (other rows, entries, seed or method) is an error, never a silent remap.
    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(bytes.fromhex(self.fingerprint)), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        loaded = bytes(state.to("cpu", torch.uint8).tolist()).hex()
        if loaded != self.fingerprint:
            raise ValueError(
                f"table '{self.table_name}': the mapping in the checkpoint (fingerprint {loaded[:12]}) is not "
                f"this module's mapping (fingerprint {self.fingerprint[:12]}, method={self.method}, "
                f"num_rows={self.num_rows}); load the matching mappings first"
            )

    def extra_repr(self) -> str:
        return (
            f"table={self.table_name!r}, method={self.method!r}, num_rows={self.num_rows}, "
            f"entries={self.num_entries}, storage={self.storage!r}, nbytes={self.nbytes}, layout={self.layout}"
            + (f", num_buckets={self.num_buckets}" if self.num_buckets is not None else "")
        )

    def save(self, path: str) -> None:
        """Writes this mapping alone to a safetensors file (atomically)."""
        save_mappings(path, {self.table_name: self})

    @classmethod
    def load(cls, path: str) -> "IdMapping":
        mappings = load_mappings(path)
        if len(mappings) != 1:
            raise ValueError(f"{path}: holds {len(mappings)} mappings ({sorted(mappings)}); use load_mappings")
        return next(iter(mappings.values()))


def save_mappings(path: str, mappings: Mapping[str, IdMapping]) -> None:
    """Writes the mappings of several tables to one safetensors file, atomically.

    Each table's metadata (method, hyper-parameters, rows, entries, seed, layout, format version)
    and a sha256 checksum go into the file's header; no pickle is involved.
    """
    from safetensors.torch import save as safetensors_save

    tensors: Dict[str, torch.Tensor] = {}
    header: Dict[str, str] = {"format": MAPPINGS_FORMAT, "format_version": str(FORMAT_VERSION)}
    for table, mapping in mappings.items():
        if "/" in table:
            raise ValueError(f"table name '{table}' may not contain '/'")
        meta = mapping.metadata()
        meta["table_name"] = table
        meta["checksum"] = mapping.fingerprint
        header[f"table/{table}"] = json.dumps(meta, sort_keys=True)
        for name, tensor in mapping._state_tensors().items():
            tensors[f"{table}/{name}"] = tensor
    with atomic_write(path) as f:
        f.write(safetensors_save(tensors, metadata=header))


def load_mappings(path: str, device: Optional[torch.device] = None) -> Dict[str, IdMapping]:
    """Reads a file written by :func:`save_mappings`; every table's checksum is verified."""
    header, tensors = read_safetensors(path, "mapping file")
    if header.get("format") != MAPPINGS_FORMAT:
        raise ValueError(f"{path}: not an lhf_torchrec mapping file (header format={header.get('format')!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: mapping format version {header.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    out: Dict[str, IdMapping] = {}
    for key, value in header.items():
        if not key.startswith("table/"):
            continue
        table = key[len("table/"):]
        try:
            meta = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata of table '{table}' is not valid JSON ({e})") from e
        own = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.split("/", 1)[0] == table}
        try:
            mapping = IdMapping(
                meta["num_rows"],
                hash_offset=meta["hash_offset"],
                hash_rows=meta["hash_rows"],
                probes=meta["probes"],
                seed=meta["seed"],
                storage=meta["storage"],
                offset=meta["offset"],
                tensors=own,
                num_entries=meta["num_entries"],
                method=meta["method"],
                params=meta["params"],
                layout=meta["layout"],
                table_name=table,
                entry_share=meta.get("entry_share"),
                num_buckets=meta.get("num_buckets"),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: mapping of table '{table}' is malformed ({e})") from e
        if mapping.fingerprint != meta.get("checksum"):
            raise ValueError(f"{path}: checksum mismatch for table '{table}': the file is corrupted or was edited")
        out[table] = mapping.to(device) if device is not None else mapping
    if not out:
        raise ValueError(f"{path}: holds no mappings")
    return out
