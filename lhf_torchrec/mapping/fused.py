"""The mappings of many tables applied together: one pass per storage instead of one per table.

Applying each table's :class:`~lhf_torchrec.mapping.id_mapping.IdMapping` on its own costs a dozen
small torch ops per table, whatever its size: with 26 tables of 4096 ids each op is mostly fixed cost.
:class:`FusedIdMappings` packs the tables' storages end to end and applies them to the ids of all
tables at once, each id with its own table's parameters (int64 tensors gathered per id):

* ``dense`` tables: one array of all tables per row dtype (int8, int16, int32), then one gather; each
  id clamped into its table's span (as ``IdMapping`` does), or, when one min/max per table shows every
  id inside it, not;
* ``perfect_hash`` tables: one set of slot and pilot arrays per layout (remainders of int64 keys; split
  slots of each key dtype and no, 1- or 2-byte high row bits), looked up by
  :func:`~lhf_torchrec.mapping.perfect_hash.lookup` (or ``lookup_remainders``) with per-id group hashes,
  sizes and starts. Layouts of int32 keys and 3- or 4-byte rows are packed as one int64 *record* per
  slot (key in the high word, row in the low one), read once per id instead of three times (key, low
  and high row bits): these are large tables whose arrays outgrow the caches, where each random read
  costs more than the hashing. A record takes 8 bytes where the split arrays take 7 (3-byte rows) or
  8: at most 1 byte a slot more (1/7 of the slots' bytes), counted by :func:`runtime_bytes`;
* ``none`` tables and every id without an entry: one :func:`~lhf_torchrec.mapping.hashing.hash_with_coefficients`
  call, each id with its table's seed coefficients and hash region;
* small ``sorted`` tables (the fit's choice for a handful of entries; a binary search per id, the
  slowest lookup) run from a dense copy of the same function over at most :data:`RUNTIME_DENSE_IDS`
  ids (4 KiB).

Features of equal size (one id per sample, the usual input) are mapped as a (features, ids) matrix
whose rows take their table's parameters by broadcasting, so no parameter is gathered per id (the
columns are gathered once per batch layout and kept).

The packed arrays are the mappings' own memory: packing replaces each mapping's buffers by views of
them (the same values; strided views of the records), so nothing is stored twice and the mappings
save, load and fingerprint as before. What the mappings do not hold is counted by
:func:`runtime_bytes`: the dense copies of sorted tables, the unused byte of 3-byte-row records and the
per-table parameters. Tables it does not fuse (:func:`fusable`: double hashing, bucketed mappings,
larger sorted tables) stay on their mapping's own path.

Two byte counts, one rule: ``IdMapping.nbytes`` is what a fitted mapping holds (its file, the fit's
byte budget, the CLI's and pipeline's fit reports), ``nbytes + runtime_bytes`` what a module that
applies it holds (``IdRemapper.state_bytes``, the sharding planner, quantized remaps, a training job's
``mapping_bytes``, the module benchmark). The fit does not count runtime bytes: how a mapping runs
depends on the module (which tables are fused together, the byte order), and counting them would
change which storage the fit picks (a small ``sorted`` table would look 4 KiB dearer than a perfect
hash one, whose eager lookup is slower).

FBGEMM's multi-table remaps do not serve here. ``torch.ops.fbgemm.pruned_hashmap_lookup`` (linear
probing over (key, row) pairs, one C++ call for all tables) finds the entries of the module benchmark's
batch (26 tables x 4096 ids, ``frequency`` mappings) in about half the time of this whole remap, but
its table is a second copy of the entries: 16 bytes per entry at load 0.5 with int32 keys (raw ids
below 2^31 only), 20 at load 0.8 with int64 keys, against ~7 in the perfect hash table, i.e. 2-3x the
mappings' memory on every replica; and it returns -1 for a miss, which still needs the hash.
``pruned_array_lookup`` is the dense gather without a range check (an id outside a table reads out
of bounds), which the dense pass needs.
"""

import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lhf_torchrec.mapping import perfect_hash
from lhf_torchrec.mapping.hashing import hash_coefficients, hash_with_coefficients
from lhf_torchrec.mapping.id_mapping import IdMapping

# Ids of the dense copy a small sorted table runs from (4 KiB): ids [0, 1024) when its entries lie
# there (small tables of ids counted from 0: no id of theirs misses the copy and needs the hash), else
# the span of its entries when it is no wider.
RUNTIME_DENSE_IDS = 1024
_HASH_RANGE = 1 << 31
# Batch layouts (pass, features' tables, chunk) whose parameter columns are kept.
_MAX_LAYOUTS = 256
# Ids mapped at once: int64 temporaries of 256 KiB.
CHUNK = 1 << 15
# int64 parameters of a table, gathered per id: hash (num_buckets, a0, a1, a2, b, first row), dense
# (start - offset, offset, last id), perfect hash (offset, 4 group-hash words, groups, slots, group and
# slot start, low bits of a remainders table).
_PARAMS = {"none": 6, "dense": 6 + 3, "perfect_hash": 6 + 10}


def fusable(mapping: IdMapping) -> bool:
    """Whether :class:`FusedIdMappings` applies ``mapping`` (else it runs on its own)."""
    if mapping.probes != 1 or mapping.num_buckets is not None or "slot_records" in mapping._buffers:
        return False  # perfect hash records (keys of 32-63 bits) are looked up by their mapping
    return mapping.storage != "sorted" or _runtime_ids(mapping) is not None


def runtime_bytes(mapping: IdMapping) -> int:
    """Bytes a fused ``mapping`` takes besides its own buffers (0 when it is not fused): the dense copy
    of a small sorted table, the unused byte of each record of 3-byte rows, the table's parameters."""
    if not fusable(mapping):
        return 0
    if mapping.storage == "sorted":
        return 4 * _runtime_ids(mapping)[1] + 8 * _PARAMS["dense"]
    if _in_records(mapping):  # the unused byte of each record with 3-byte rows
        return (2 - mapping.slot_rows_high.element_size()) * mapping.slot_keys.numel() + 8 * _PARAMS[mapping.storage]
    return 8 * _PARAMS[mapping.storage]


def _in_records(mapping: IdMapping) -> bool:
    """Whether a fused perfect hash ``mapping`` is packed as int64 records (:class:`FusedIdMappings`): int32
    keys and 3- or 4-byte rows (at 2-byte rows a record would cost 8 bytes a slot instead of 6)."""
    return (mapping.storage == "perfect_hash" and perfect_hash.slot_layout_of(mapping._buffers) == "split"
            and mapping.slot_keys.dtype == torch.int32
            and mapping.slot_rows_high.numel() > 0 and sys.byteorder == "little")


def _runtime_ids(mapping: IdMapping) -> Optional[Tuple[int, int]]:
    """(first id, count) of the ids the dense copy of a sorted ``mapping`` covers; None: too wide."""
    keys = mapping.keys
    first, last = int(keys[0]), int(keys[-1])
    if keys.dtype == torch.int32:
        first, last = first + mapping.offset, last + mapping.offset
    if 0 <= first and last < RUNTIME_DENSE_IDS:
        return 0, RUNTIME_DENSE_IDS
    return (first, last - first + 1) if last - first < RUNTIME_DENSE_IDS else None


def _dense_copy(mapping: IdMapping) -> IdMapping:
    """The same function as the sorted ``mapping``, stored densely over :func:`_runtime_ids`."""
    first, count = _runtime_ids(mapping)
    # first + count may be 2^63 (an entry at the largest id): add first to the offsets instead.
    ids = torch.arange(count, dtype=torch.int64, device=mapping.keys.device).add_(first)
    return IdMapping(mapping.num_rows, hash_offset=mapping.hash_offset, hash_rows=mapping.hash_rows, seed=mapping.seed,
                     storage="dense", offset=first, tensors={"table": mapping(ids).to(torch.int32)},
                     num_entries=mapping.num_entries, table_name=mapping.table_name)


class FusedIdMappings:
    """Applies the mappings of several tables with one pass per storage.

    Built from ``{table: mapping}``; it applies the :func:`fusable` ones (``tables``), which must be on
    one device. Their buffers become views of the packed arrays (:meth:`is_current` tells when they no
    longer are, e.g. after a move to another device: build it again). Example::

        fused = FusedIdMappings({"t1": m1, "t2": m2})
        rows_a, rows_b = fused([ids_a, ids_b], ["t1", "t2"])   # == [m1(ids_a), m2(ids_b)]
    """

    def __init__(self, mappings: Mapping[str, IdMapping]) -> None:
        self._mappings = dict(mappings)
        self.tables = [t for t, m in mappings.items() if fusable(m)]
        self.code = {t: i for i, t in enumerate(self.tables)}
        devices = {b.device for t in self.tables for b in mappings[t].buffers()}
        if len(devices) > 1:
            raise ValueError(f"the mappings of tables {self.tables} are on several devices {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        # Runtime form of each table: sorted tables as their dense copy.
        runtime = {t: _dense_copy(mappings[t]) if mappings[t].storage == "sorted" else mappings[t] for t in self.tables}
        self.kind = {t: runtime[t].storage for t in self.tables}
        # Views the mappings' buffers were replaced by: (mapping, buffer name, view).
        self._views: List[Tuple[IdMapping, str, torch.Tensor]] = []
        num = len(self.tables)
        # Per-table parameters: one int64 row per parameter (gathered per id with a 1-D index_select;
        # a 2-D gather is many times slower on CPU).
        hashing = torch.tensor([[runtime[t].hash_rows, *hash_coefficients(runtime[t].seed), runtime[t].hash_offset]
                                for t in self.tables], dtype=torch.int64).reshape(num, 6)
        seeds = {runtime[t].seed for t in self.tables}
        # One seed (the usual case): its coefficients are the same for every id, only the region varies.
        self._coefficients = (torch.tensor([_HASH_RANGE, *hash_coefficients(seeds.pop())], device=device)
                              if len(seeds) == 1 else None)
        self._hashing = [row.contiguous().to(device) for row in hashing.t()]
        # One dense pass per row dtype (dense tables store rows as int8, int16 or int32): a packed table
        # of one dtype lets every table's buffer be a view of it, no wider copy.
        dense_layouts: Dict[torch.dtype, List[str]] = {}
        for t in (t for t in self.tables if self.kind[t] == "dense"):
            dense_layouts.setdefault(runtime[t].table.dtype, []).append(t)
        self._dense = [self._pack_dense(ts, runtime, mappings, num, device) for ts in dense_layouts.values()]
        # One pass per layout: key dtype and high row bits (none, int8 or int16). Tables without high bits
        # (up to 2^15 rows) take a pass of their own rather than one that reads high bits: reading and
        # masking off another table's high bits costs 8 int64 ops per id, a pass ~40 op launches.
        layouts: Dict[Tuple, List[str]] = {}
        for t in (t for t in self.tables if self.kind[t] == "perfect_hash"):
            if "slot_remainders" in runtime[t]._buffers:
                layouts.setdefault(("remainders",), []).append(t)
                continue
            high = runtime[t].slot_rows_high
            layouts.setdefault((runtime[t].slot_keys.dtype, high.dtype if high.numel() else None), []).append(t)
        self._hash_tables = [self._pack_perfect_hash(ts, runtime, num, device) for ts in layouts.values()]
        # Passes in order: each dense dtype, each perfect hash layout, hash only. Each table's ids go to its pass.
        passes = [*dense_layouts.values(), *layouts.values(), [t for t in self.tables if self.kind[t] == "none"]]
        self._pass = {t: p for p, ts in enumerate(passes) for t in ts}
        self._code_tensors: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        self._column_cache: Dict[Tuple, List[List[torch.Tensor]]] = {}
        self._num_passes = len(passes)

    # ------------------------------------------------------------------ packing
    def _share(self, mapping: IdMapping, name: str, packed: torch.Tensor, start: int) -> None:
        """Makes ``mapping``'s buffer ``name`` the view of ``packed`` it was copied to."""
        view = packed[start:start + mapping._buffers[name].numel()]
        mapping._buffers[name] = view
        self._views.append((mapping, name, view))

    def _pack_dense(self, tables: List[str], runtime: Mapping[str, IdMapping], mappings: Mapping[str, IdMapping],
                    num: int, device: torch.device) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        params = torch.zeros(3, num, dtype=torch.int64)
        starts: Dict[str, int] = {}
        start = 0
        for t in tables:
            table = runtime[t].table
            starts[t] = start
            offset = runtime[t].offset
            # start - offset as an int64 (it wraps for offsets near -2^63; so does the sum, back into range)
            shift = (start - offset + (1 << 63)) % (1 << 64) - (1 << 63)
            params[:, self.code[t]] = torch.tensor([shift, offset, offset + table.numel() - 1])
            start += table.numel()
        parts = [runtime[t].table for t in tables]
        packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=device)
        for t in tables:
            if mappings[t].storage == "dense":  # a sorted table's dense copy is nobody's buffer
                self._share(mappings[t], "table", packed, starts[t])
        return packed, [row.contiguous().to(device) for row in params]

    def _pack_perfect_hash(self, tables: List[str], runtime: Mapping[str, IdMapping], num: int,
                           device: torch.device) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
        # Per table: offset, the 4 group-hash words, groups, slots, group and slot start, low bits.
        params = torch.zeros(10, num, dtype=torch.int64)
        remainders = "slot_remainders" in runtime[tables[0]]._buffers
        slot_name = "slot_remainders" if remainders else "slot_keys"
        names = ("slot_remainders", "group_pilots") if remainders else ("slot_keys", "slot_rows", "slot_rows_high",
                                                                         "group_pilots")
        starts = {name: 0 for name in names}
        at: Dict[str, Dict[str, int]] = {}
        for t in tables:
            m = runtime[t]
            at[t] = dict(starts)
            low_bits = perfect_hash.record_row_bits(m.num_rows) if remainders else 0
            params[:, self.code[t]] = torch.tensor([m.offset, *m._group_hash, m.group_pilots.numel(),
                                                    m._buffers[slot_name].numel(), starts["group_pilots"],
                                                    starts[slot_name], low_bits])
            for name in names:
                starts[name] += m._buffers[name].numel()
        parts = {name: [runtime[t]._buffers[name] for t in tables] for name in names}
        if _in_records(runtime[tables[0]]):
            # One int64 record per slot: its int32 key in the high word, its row (low 16 bits, high bits) in
            # the low one; the tables' key and row buffers become strided views of the records.
            records = torch.zeros(starts["slot_keys"], dtype=torch.int64, device=device)
            halves = records.view(torch.int16).view(-1, 4)
            high = parts["slot_rows_high"][0].dtype
            packed = {"slot_keys": records.view(torch.int32).view(-1, 2)[:, 1], "slot_rows": halves[:, 0],
                      "slot_rows_high": halves[:, 1] if high == torch.int16 else records.view(torch.int8).view(-1, 8)[:, 2],
                      "group_pilots": torch.cat(parts["group_pilots"]), "records": records}
            for name in ("slot_keys", "slot_rows", "slot_rows_high"):
                packed[name].copy_(torch.cat(parts[name]))
        else:
            packed = {name: torch.cat([x for x in parts[name] if x.numel()]) if starts[name] else parts[name][0]
                      for name in names}
        for t in tables:
            for name in names:
                if starts[name]:  # a layout without high bits keeps each table's own (empty) tensor
                    self._share(runtime[t], name, packed[name], at[t][name])
        return packed, [row.contiguous().to(device) for row in params]

    def is_current(self, mappings: Mapping[str, IdMapping]) -> bool:
        """Whether this still applies exactly ``mappings`` (the same mapping objects, whose buffers are
        still the views of the packed arrays: a move or an assignment replaces them)."""
        return (len(mappings) == len(self._mappings)
                and all(t in mappings and mappings[t] is m for t, m in self._mappings.items())
                and all(m._buffers[name] is view for m, name, view in self._views))

    # ------------------------------------------------------------------ applying
    def __call__(self, ids: Sequence[torch.Tensor], tables: Sequence[str]) -> List[torch.Tensor]:
        """The int64 rows of each tensor of ids in ``ids``, mapped by its table in ``tables``."""
        order = sorted(range(len(ids)), key=lambda i: self._pass[tables[i]])
        if not order:
            return []
        lengths = [ids[i].numel() for i in order]
        values = torch.cat([ids[i].reshape(-1).to(torch.int64) for i in order])
        out = torch.empty_like(values)
        begin = 0
        for p in range(self._num_passes):
            members = [(self.code[tables[i]], n) for i, n in zip(order, lengths) if self._pass[tables[i]] == p]
            end = begin + sum(n for _, n in members)
            if end > begin:
                self._apply_pass(p, values[begin:end], out[begin:end], members)
            begin = end
        result: List[Optional[torch.Tensor]] = [None] * len(ids)
        for i, part in zip(order, out.split(lengths)):
            result[i] = part.view(ids[i].shape)
        return result  # type: ignore[return-value]

    def _apply_pass(self, p: int, ids: torch.Tensor, out: torch.Tensor, members: List[Tuple[int, int]]) -> None:
        """Writes to ``out`` the rows of ``ids``: the ids of the tables in ``members`` ((code, count) each,
        end to end), all of pass ``p``."""
        codes = self._codes(tuple(c for c, _ in members), ids.device)
        width = members[0][1]
        if all(n == width for _, n in members):
            # Features of equal size (one id per sample, the usual input): a (features, ids) matrix
            # whose rows take their table's parameters by broadcasting a column, no per-id gather.
            ids, out, index = ids.view(-1, width), out.view(-1, width), codes.view(-1, 1)
            step = max(1, CHUNK // width)
            columns = self._columns(p, tuple(c for c, _ in members), step, ids.device)
        else:
            index = torch.repeat_interleave(codes, torch.tensor([n for _, n in members], device=ids.device),
                                            output_size=ids.numel())
            step = CHUNK
        # By chunks: every op's temporaries stay small (in cache, and below the size at which the C
        # allocator maps fresh pages for each, which costs more than the op on 1e5 ids).
        for k, start in enumerate(range(0, ids.shape[0], step)):
            chunk = slice(start, start + step)
            params = columns[k] if index.shape != ids.shape else self._gathered(p, index[chunk])
            if p == self._num_passes - 1:
                out[chunk] = self._hashed(ids[chunk], index[chunk], params)
            else:
                self._fill(out[chunk], *self._lookup(p, ids[chunk], params), ids[chunk], index[chunk])

    def _params(self, p: int) -> List[torch.Tensor]:
        """The per-table parameters of pass ``p`` (one int64 row each, indexed by table code)."""
        if p < len(self._dense):
            return self._dense[p][1]
        return self._hashing if p == self._num_passes - 1 else self._hash_tables[p - len(self._dense)][1]

    def _gathered(self, p: int, index: torch.Tensor) -> List[torch.Tensor]:
        """The parameters of pass ``p`` of the tables ``index`` (codes), shaped like it."""
        return [perfect_hash.gather(param, index) for param in self._params(p)]

    def _columns(self, p: int, codes: Tuple[int, ...], step: int, device: torch.device) -> List[List[torch.Tensor]]:
        """The parameters of pass ``p`` as (tables, 1) columns of each chunk of ``step`` tables of a
        (features, ids) matrix, gathered once per batch layout (a dozen tiny gathers per chunk and call
        otherwise cost ~0.3 ms a batch)."""
        key = (p, codes, step, device)
        if key not in self._column_cache:
            if len(self._column_cache) >= _MAX_LAYOUTS:  # inputs whose features change from batch to batch
                self._column_cache.clear()
            index = self._codes(codes, device).view(-1, 1)
            self._column_cache[key] = [self._gathered(p, index[start:start + step])
                                       for start in range(0, len(codes), step)]
        return self._column_cache[key]

    def _codes(self, codes: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``codes`` as a tensor on ``device``, made once (a host-to-device copy each call would wait)."""
        key = (codes, device)
        if key not in self._code_tensors:
            self._code_tensors[key] = torch.tensor(codes, dtype=torch.int64, device=device)
        return self._code_tensors[key]

    def _lookup(self, p: int, ids: torch.Tensor, params: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(rows, found) of the ids of pass ``p`` (dense, or a perfect hash layout), ``params`` the pass's
        parameters of their tables (shaped like ``ids`` or broadcasting to it); found None: all found."""
        if p < len(self._dense):
            dense_table = self._dense[p][0]
            shift, offset, last = params
            if ids.device.type == "cpu" and ids.dim() == 2:
                # Rows of one table each: when every id lies in its table's span (e.g. small tables of ids
                # counted from 0) one min/max reduction replaces the clamp, its comparison and its check.
                low, high = torch.aminmax(ids, dim=1, keepdim=True)
                if bool(low.ge(offset).logical_and_(high.le(last)).all()):
                    return perfect_hash.gather(dense_table, ids + shift), None
            # Clamp in id space, then shift: ids - offset could wrap around int64 for extreme ids.
            clamped = torch.clamp(ids, offset, last)
            found = clamped == ids
            if ids.device.type == "cpu" and bool(found.all()):  # a reduction costs far less than nonzero
                found = None
            return perfect_hash.gather(dense_table, clamped.add_(shift)), found
        tensors = self._hash_tables[p - len(self._dense)][0]
        offset, w0, w1, w2, w3, groups, slots, group_start, slot_start, low_bits = params
        if "slot_remainders" in tensors:  # int64 keys, not relative
            return perfect_hash.lookup_remainders(ids, tensors["slot_remainders"], low_bits, tensors["group_pilots"],
                                                  (w0, w1, w2, w3), groups, slots, group_start, slot_start)
        # Relative keys wrap around for extreme ids, but equal a key only for the entry's id (IdMapping).
        keys = ids - offset
        if "records" in tensors:
            # One read of the slot's record instead of its key, low and high row bits (three random reads
            # into arrays that outgrow the caches): key in the high word, row in the low one.
            return perfect_hash.lookup_records(keys, tensors["records"], 32, tensors["group_pilots"], (w0, w1, w2, w3),
                                               groups, slots, group_start, slot_start)
        return perfect_hash.lookup(keys, tensors["slot_keys"], tensors["slot_rows"], tensors["slot_rows_high"],
                                   tensors["group_pilots"], (w0, w1, w2, w3), groups, slots, group_start, slot_start)

    def _hashed(self, ids: torch.Tensor, index: torch.Tensor, params: Optional[List[torch.Tensor]] = None
                ) -> torch.Tensor:
        """The hash row of each id in its table's hash region (``IdMapping._hashed``, all tables at once);
        ``index``: their tables' codes, ``params`` the hash parameters gathered for it (else gathered here)."""
        rows, *coefficients, offset = self._gathered(self._num_passes - 1, index) if params is None else params
        if self._coefficients is None:
            return hash_with_coefficients(ids, torch.stack([rows, *coefficients], dim=-1)).add_(offset)
        # hash_with_coefficients ends with (h * num_buckets) >> 31 of h in [0, 2^31 - 1): with
        # num_buckets = 2^31 it returns h itself, and the per-id scaling gives each id its table's range.
        return hash_with_coefficients(ids, self._coefficients).mul_(rows).bitwise_right_shift_(31).add_(offset)

    def _fill(self, out: torch.Tensor, rows: torch.Tensor, found: Optional[torch.Tensor], ids: torch.Tensor,
              index: torch.Tensor) -> None:
        """Writes to ``out`` the ``rows`` where ``found`` (None: everywhere), else the hash rows of the ids
        (as ``IdMapping`` fills them)."""
        if found is None:
            out.copy_(rows)
        elif ids.device.type == "cpu":
            # On CPU hash only the ids that need it; on accelerators the masked copy would sync.
            out.copy_(rows)
            missing = found.logical_not_().view(-1).nonzero().squeeze(1)
            if missing.numel():
                # The code of a missing id: its own, or its row's in a (features, ids) matrix.
                of_missing = missing if index.shape == ids.shape else torch.div(missing, ids.shape[-1], rounding_mode="floor")
                hashed = self._hashed(ids.view(-1).index_select(0, missing), index.view(-1).index_select(0, of_missing))
                out.view(-1).index_copy_(0, missing, hashed)
        else:
            out.copy_(torch.where(found, rows, self._hashed(ids, index)))
