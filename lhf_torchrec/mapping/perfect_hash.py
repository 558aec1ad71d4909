"""A static perfect hash table of int64 keys -> rows, looked up with three or four 1-D gathers.

The ``perfect_hash`` storage of :class:`~lhf_torchrec.mapping.id_mapping.IdMapping` (entries of
sparse 64-bit ids, or of bucket hashes). Hash-and-displace, as PTHash (Pibiri and Trani, 2021):

* a key x is first shifted and mixed, y = mix64(x + c) (a bijection: runs of consecutive keys look
  random after it), and falls into one of G = 2^g *groups* by a multiply-shift hash of y
  (``group_hash`` = (odd multiplier, c, first, step), fixed per table). Without the shift the key 0
  (mix64(0) = 0) would take slot 0 whatever its group's multiplier;
* each group has a *pilot* p (int16, ``group_pilots``) chosen at build time so that its multiplier
  ``m = first + p * step`` (odd first, even step: m is odd) and
  ``slot = floor(top32(y * m) * S / 2^32)`` send the group's keys to free slots of one array of S
  slots (``slot_keys`` int32 or int64, rows in ``slot_rows`` and ``slot_rows_high``): every key has
  exactly one slot, so a lookup never probes.

Three slot layouts (:func:`slot_layout` picks, ``build(..., slot_layout=)``):

* *split*: ``slot_keys`` (int32 or int64) and the rows in ``slot_rows`` (low 16 bits) and
  ``slot_rows_high`` (the bits above, for 3- and 4-byte rows): a slot read is 2-3 random reads;
* *records*: one int64 ``slot_records`` per slot, ``key << row_bits | row`` with ``row_bits`` =
  ``num_rows.bit_length()`` (all ones: an empty slot), for keys relative to the smallest whose bits
  (:func:`key_bits`) and the row bits fit in 63: a slot read is one random read of 8 bytes, and the
  table costs 8 bytes per slot instead of 10-12 with int64 keys (e.g. ids in a 2^40 span into up to
  2^22 rows). Keys that fit int32 stay split (6-7 bytes per slot). Split and records place keys with
  the same functions (a one-multiply mix instead of mix64 saved ~5% compiled but left keys in
  arithmetic progressions, e.g. ``k * 7919 * 2^20``, without a table);
* *remainders*: for full 64-bit keys (sparse ids, bucket hashes), one int64 ``slot_remainders`` per
  slot: the mixed key y with its low t bits replaced by the row (t = ``num_rows.bit_length()``, all
  ones: an empty slot). The slot itself gives back those t bits, so a record holds the whole key in 8
  bytes where split slots take 10-12: PTHash's xor displacement (position = y xor h(pilot), reduced)
  with S = m * 2^t slots, ``slot = strip(x) * 2^t + (x mod 2^t)`` for ``x = y xor pilot * first``
  (the strip any function of x), and the group a function of y's top 32 bits only. A query whose
  record has its own y above bit t is then in the same group, has the same pilot, and its low t bits
  are the slot's xor the pilot's: it is the stored key. Chosen where its slots (S rounded up to a
  multiple of 2^t, at least :data:`MIN_STRIPS` strips) cost no more bytes than the split ones; a slot
  read is one random read.

Lookup, vectorized over the queries: group, gather its pilot, slot, gather the slot's key and row,
compare the key. No data-dependent control flow, a handful of int64 element-wise ops and three
gathers (four where rows take 3 or 4 bytes: their high bits are a second array); a key that is not
stored fails the comparison. Empty slots hold the smallest stored key with row -1: a query equal to
that key goes to its own slot, never to an empty one, so the comparison alone decides.

Layout: S = ceil(E / LOAD) slots (key of 4 or 8 bytes, row of 2, 3 or 4 bytes by the table's row
count: :func:`row_bytes`) and G ~ E / 3..6 groups of 2 bytes: about 6.6 bytes per entry with int32
keys and 2-byte rows, 7.7 with 3-byte rows (10.8 / 11.8 with int64 keys split, 8.3-10.4 in remainders,
whose slots round up to whole strips), against 8 (12) for sorted keys + searchsorted, whose lookup is a
binary search (~17 dependent gathers for 1e5 keys).

Build: groups are placed largest first (their keys need the most free slots at once), all groups of
one size in parallel rounds that try ``TRIES_PER_ROUND`` candidate pilots per group; a group takes
the first candidate whose slots are free and distinct, and two groups that want one slot in the same
round go to the lower group. Deterministic given the seed; when a group exhausts ``MAX_TRIES``
candidates (two keys that no multiplier separates), the table is rebuilt with the next ``group_hash``
(``MAX_ATTEMPTS`` in all). The table depends on the set of entries only, not on their order, and the
build keeps one int64 per key (the mixed keys, grouped by a chunked counting sort) plus the pilots, the
groups' sizes and starts and a flag per slot; a round's contention is settled among the slots it wants,
and every slot is computed again from its group's pilot at the end, as a lookup does (about 11 bytes per
key at the peak besides its inputs and the table, measured at 1e7 keys; 18 with an argsort of the groups
and an owner per slot).
"""

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from lhf_torchrec.mapping.hashing import bucket_key, mix64, unmix64

# Entries per slot. A higher load saves bytes but makes the last groups search longer.
LOAD = 0.96
# Keys per group, on average: 2 bytes of pilot per group. More keys per group save bytes but make the
# last groups search much longer at this load.
GROUP_KEYS = 4
TRIES_PER_ROUND = 16
FIRST_TRIES = 2
# Pilots are int16: a group's candidate multipliers are its first 2^15.
MAX_TRIES = 1 << 15
MAX_ATTEMPTS = 4
# Candidates tried at once per round are bounded: (groups x TRIES_PER_ROUND x group size) int64s.
_ROUND_ELEMENTS = 1 << 21
# Candidate slots computed at once inside a round (the round's outcome does not depend on it).
_FIT_ELEMENTS = 1 << 18
_LOW_32 = 0xFFFFFFFF
# Keys mixed, gathered or written at once by build: its int64 temporaries stay a few MB.
_CHUNK = 1 << 18
# Slot rows take 2 bytes (int16 ``slot_rows``) for tables of up to 2^15 rows, 3 (plus int8
# ``slot_rows_high``, the bits above the low 16) up to 2^23 rows, 4 (int16 high bits) beyond: at 3
# bytes a row the table costs less than sorted keys with int32 rows. -1 marks an empty slot.
ROW_LIMITS = (1 << 15, 1 << 23, 1 << 31)
TENSORS = ("slot_keys", "slot_rows", "slot_rows_high", "group_pilots", "group_hash")
RECORD_TENSORS = ("slot_records", "group_pilots", "group_hash")
REMAINDER_TENSORS = ("slot_remainders", "group_pilots", "group_hash")
# Strips of a remainders table at least (:func:`slot_layout`): two keys of a group whose mixed values share
# their low bits take the same slot within every strip, and only part when their strips differ.
MIN_STRIPS = 4
# Entries of a remainders table at least. A group's keys move together (one xor per pilot), so a nearly
# full table of a few strips of a few slots can leave the last groups no fit: first-attempt builds of
# 60 keys into 15 rows (4 strips of 16 slots) failed 8 times in 20, of 200-100,000 keys none in 104
# (stop 18, one-off). Small tables gain little from 8-byte slots anyway.
MIN_REMAINDER_ENTRIES = 1 << 10
# Compiled (torch.compile), a lookup whose slot arrays exceed this many bytes computes every slot first and
# reads the slots in a separate gather (:func:`gather_apart`): in one fused loop of hashing and dependent
# random reads few reads are in flight, which costs 2-3x once the slots outgrow the caches (1e6 entries,
# 8-11 MB), while tables of a few hundred KB (5e4 entries) run faster fused (docs/performance.md,
# "Apply throughput").
APART_BYTES = 1 << 21


def table_sizes(num_entries: int, low_bits: int = 0) -> Tuple[int, int]:
    """(slots, groups) of a table of ``num_entries`` (>= 1) keys: a pure function of the count; the slots
    a multiple of 2^``low_bits`` (the remainders layout: :func:`record_row_bits` of its rows)."""
    slots = max(1, math.ceil(num_entries / LOAD))
    groups = max(1, math.ceil(num_entries / GROUP_KEYS))
    return -(-slots >> low_bits) << low_bits, groups


def row_bytes(num_rows: int) -> int:
    """Bytes of a slot's row in a table into ``num_rows`` rows: 2, 3 or 4."""
    return 2 + next((i for i, limit in enumerate(ROW_LIMITS) if num_rows <= limit), len(ROW_LIMITS) - 1)


def rows_limit(num_rows: int) -> int:
    """The most rows a table can map into with the bytes of one into ``num_rows`` rows: the same row bytes
    and record row bits (which size a remainders table's strips)."""
    return min(ROW_LIMITS[row_bytes(num_rows) - 2], (1 << record_row_bits(num_rows)) - 1)


def record_row_bits(num_rows: int) -> int:
    """Bits of a record's row field into ``num_rows`` rows: rows < num_rows, all ones for an empty slot."""
    return int(num_rows).bit_length()


def key_bits(span: int) -> int:
    """Bits of the keys relative to the smallest of entries spread over ``span`` (>= 1) ids."""
    return int(span - 1).bit_length()


def packs(bits: int, num_rows: int) -> bool:
    """Whether keys of ``bits`` bits into ``num_rows`` rows are stored as one int64 record per slot: when
    they fit and do not fit int32 keys (split slots of int32 keys cost 6-7 bytes, a record 8)."""
    return 31 < bits and bits + record_row_bits(num_rows) <= 63


def slot_layout(num_entries: int, key_bytes: int, num_rows: int, bits: int = 64) -> str:
    """The slot layout of a table of ``num_entries`` keys of ``key_bytes`` (``bits`` relative to the
    smallest) into ``num_rows`` rows: ``records`` where they pack, else ``remainders`` for int64 keys
    where its slots cost no more than split ones, else ``split``."""
    if key_bytes != 8:
        return "split"
    if packs(bits, num_rows):
        return "records"
    if num_entries < MIN_REMAINDER_ENTRIES:
        return "split"
    low_bits = record_row_bits(num_rows)
    remainder_slots = table_sizes(num_entries, low_bits)[0]
    split_bytes = (8 + row_bytes(num_rows)) * table_sizes(num_entries)[0]
    return "remainders" if remainder_slots >> low_bits >= MIN_STRIPS and 8 * remainder_slots <= split_bytes else "split"


def slot_layout_of(tensors: Mapping[str, torch.Tensor]) -> str:
    """The slot layout of a table's ``tensors``: ``records``, ``remainders`` or ``split``."""
    return "records" if "slot_records" in tensors else "remainders" if "slot_remainders" in tensors else "split"


def table_bytes(num_entries: int, key_bytes: int, num_rows: int, bits: int = 64) -> int:
    """Bytes of a table of ``num_entries`` keys of ``key_bytes`` (``bits`` relative to the smallest) into
    ``num_rows`` rows in its :func:`slot_layout`: slots (records of 8 bytes, or key and row), int16 group pilots,
    the 4-word group hash."""
    kind = slot_layout(num_entries, key_bytes, num_rows, bits)
    slots, groups = table_sizes(num_entries, record_row_bits(num_rows) if kind == "remainders" else 0)
    slot_bytes = key_bytes + row_bytes(num_rows) if kind == "split" else 8
    return slot_bytes * slots + 2 * groups + 32


def encode_rows(rows: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``slot_rows``, ``slot_rows_high``) of int64 slot rows (-1: empty) into ``num_rows`` rows: the low
    16 bits (the whole row, up to 2^15 rows) and the bits above them (empty up to 2^15 rows)."""
    width = row_bytes(num_rows)
    if width == 2:
        return rows.to(torch.int16), torch.zeros(0, dtype=torch.int8)
    high = torch.bitwise_right_shift(rows, 16).to(torch.int8 if width == 3 else torch.int16)
    return rows.to(torch.int16), high  # int64 -> int16 keeps the low 16 bits


def decode_rows(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """int64 rows from (gathered) low and high parts (``high`` empty: ``low`` is the row)."""
    if not high.numel():
        return low.to(torch.int64)
    return torch.bitwise_left_shift(high.to(torch.int64), 16).bitwise_or_(low.to(torch.int64).bitwise_and_(0xFFFF))


def slot_row_values(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The int64 row of every slot (-1: empty)."""
    return decode_rows(tensors["slot_rows"], tensors["slot_rows_high"])


def slot_row_range(tensors: Mapping[str, torch.Tensor], num_rows: int) -> Tuple[int, int]:
    """(smallest, largest) row of the table's non-empty slots ((0, -1) when every slot is empty), read
    :data:`_CHUNK` slots at a time and without rebuilding any key: what a check of the rows needs, in a few MB
    at any size (rebuilding every slot's key takes ~8 int64 temporaries per slot, 640 MB at 1e7 entries)."""
    kind = slot_layout_of(tensors)
    slots = tensors[f"slot_{kind}"] if kind != "split" else tensors["slot_rows"]
    empty = (1 << record_row_bits(num_rows)) - 1
    low, high = None, None
    for start in range(0, slots.numel(), _CHUNK):
        if kind == "split":
            rows = decode_rows(slots[start:start + _CHUNK], tensors["slot_rows_high"][start:start + _CHUNK]
                               if tensors["slot_rows_high"].numel() else tensors["slot_rows_high"])
            rows = rows[rows != -1]
        else:
            rows = slots[start:start + _CHUNK] & empty
            rows = rows[rows != empty]
        if rows.numel():
            low = int(rows.min()) if low is None else min(low, int(rows.min()))
            high = int(rows.max()) if high is None else max(high, int(rows.max()))
    return (0, -1) if low is None else (low, high)


def _mixed(keys: torch.Tensor, group_hash) -> torch.Tensor:
    """y = mix64(x + c): a bijection, so that structured keys (runs of consecutive ids, strides) spread
    over the groups and slots like random ones (multiply-shift alone keeps their structure)."""
    return mix64(keys + group_hash[1])


def _shifted(index: torch.Tensor, start: Union[int, torch.Tensor]) -> torch.Tensor:
    """``index + start`` in place; no pass over the ids when ``start`` is the int 0 (one table)."""
    return index if isinstance(start, int) and start == 0 else index.add_(start)


def _group_of(keys: torch.Tensor, group_hash: Union[int, torch.Tensor], num_groups: Union[int, torch.Tensor],
              top_only: bool = False) -> torch.Tensor:
    """The group of mixed keys: multiply-shift, or (``top_only``, remainders) fastrange of their top 32 bits."""
    if top_only:
        return _slot_of(keys.clone(), num_groups)
    return _slot_of(keys * group_hash, num_groups)


def _slot_of(products: torch.Tensor, num_slots: Union[int, torch.Tensor]) -> torch.Tensor:
    """floor(top32(products) * S / 2^32): the top 32 bits of the product, scaled onto the slots."""
    return products.bitwise_right_shift_(32).bitwise_and_(_LOW_32).mul_(num_slots).bitwise_right_shift_(32)


def lookup(ids: torch.Tensor, slot_keys: torch.Tensor, slot_rows: torch.Tensor, slot_rows_high: torch.Tensor,
           group_pilots: torch.Tensor, group_hash: Sequence[Union[int, torch.Tensor]],
           num_groups: Union[int, torch.Tensor, None] = None, num_slots: Union[int, torch.Tensor, None] = None,
           group_start: Union[int, torch.Tensor] = 0, slot_start: Union[int, torch.Tensor] = 0,
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows int64, found bool) of flat int64 ``ids``; rows are meaningless where not found.

    One table by default. Several tables packed end to end (:mod:`~lhf_torchrec.mapping.fused`): the
    table's four ``group_hash`` words, its ``num_groups`` and ``num_slots`` and where its groups and slots
    start in the packed tensors (``group_start``, ``slot_start``) are then int64 tensors shaped like ``ids``
    (each id's own table), all of them broadcasting as ints do: ``ids`` of any shape, e.g. (tables, ids)
    with (tables, 1) parameters; packed tables share one row width (their ``slot_rows_high`` end to end
    like their slots).

    int32 ``slot_keys`` compare as int64: a key never equals an id outside the int32 range."""
    slot = _slots(ids, group_pilots, group_hash, slot_keys.numel() if num_slots is None else num_slots,
                  num_groups, group_start, slot_start)
    take = gather_apart if _apart(slot_keys, slot_rows, slot_rows_high) else gather
    found = take(slot_keys, slot) == ids
    high = take(slot_rows_high, slot) if slot_rows_high.numel() else slot_rows_high
    return decode_rows(take(slot_rows, slot), high), found


def lookup_remainders(ids: torch.Tensor, slot_remainders: torch.Tensor, low_bits: Union[int, torch.Tensor],
                      group_pilots: torch.Tensor, group_hash: Sequence[Union[int, torch.Tensor]],
                      num_groups: Union[int, torch.Tensor, None] = None,
                      num_slots: Union[int, torch.Tensor, None] = None, group_start: Union[int, torch.Tensor] = 0,
                      slot_start: Union[int, torch.Tensor] = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows int64, found bool) of int64 ``ids`` in a table of remainders (``build(..., slot_layout="remainders")``,
    ``low_bits`` = :func:`record_row_bits` of its rows): one gather per id after the slot; a record
    matches when its bits above ``low_bits`` are the mixed id's and its row is not the empty mark.
    Several tables packed end to end: ``low_bits``, the sizes and the starts as in :func:`lookup`."""
    slot, mixed = _remainder_slots(ids, group_pilots, group_hash, slot_remainders.numel() if num_slots is None
                                   else num_slots, low_bits, num_groups, group_start, slot_start)
    record = (gather_apart if _apart(slot_remainders) else gather)(slot_remainders, slot)
    empty = _low_mask(low_bits)
    rows = record & empty
    # Arithmetic shift: zero exactly where every bit above low_bits agrees.
    return rows, (torch.bitwise_right_shift(record ^ mixed, low_bits) == 0) & (rows != empty)


def _low_mask(low_bits: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """2^low_bits - 1, per id where ``low_bits`` is a tensor."""
    if isinstance(low_bits, torch.Tensor):
        return torch.bitwise_left_shift(torch.ones_like(low_bits), low_bits).sub_(1)
    return (1 << low_bits) - 1


def lookup_records(ids: torch.Tensor, slot_records: torch.Tensor, row_bits: int, group_pilots: torch.Tensor,
                   group_hash: Sequence[Union[int, torch.Tensor]], num_groups: Union[int, torch.Tensor, None] = None,
                   num_slots: Union[int, torch.Tensor, None] = None, group_start: Union[int, torch.Tensor] = 0,
                   slot_start: Union[int, torch.Tensor] = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows int64, found bool) of int64 ``ids`` (keys relative to the smallest, wrapped around) in a
    table of records, ``key << row_bits | row`` (``build(..., slot_layout="records")``, or the fused remap's records
    of int32 keys, ``row_bits`` 32): one gather per id after the slot. A record's key is in
    [0, 2^63 >> row_bits): an id whose relative key is outside never matches. Several tables packed end
    to end: the sizes and starts as in :func:`lookup`."""
    slot = _slots(ids, group_pilots, group_hash, slot_records.numel() if num_slots is None else num_slots,
                  num_groups, group_start, slot_start)
    record = (gather_apart if _apart(slot_records) else gather)(slot_records, slot)
    return record & ((1 << row_bits) - 1), torch.bitwise_right_shift(record, row_bits) == ids


def _slots(ids: torch.Tensor, group_pilots: torch.Tensor, group_hash: Sequence[Union[int, torch.Tensor]],
           num_slots: Union[int, torch.Tensor], num_groups: Union[int, torch.Tensor, None] = None,
           group_start: Union[int, torch.Tensor] = 0, slot_start: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """The slot of every key: group, its pilot's multiplier, multiply-shift."""
    num_groups = group_pilots.numel() if num_groups is None else num_groups
    mixed = _mixed(ids, group_hash)
    group = _shifted(_group_of(mixed, group_hash[0], num_groups), group_start)
    multiplier = gather(group_pilots, group).to(torch.int64).mul_(group_hash[3]).add_(group_hash[2])
    return _shifted(_slot_of(multiplier.mul_(mixed), num_slots), slot_start)


def _remainder_slots(ids: torch.Tensor, group_pilots: torch.Tensor, group_hash: Sequence[Union[int, torch.Tensor]],
                     num_slots: Union[int, torch.Tensor], low_bits: Union[int, torch.Tensor],
                     num_groups: Union[int, torch.Tensor, None] = None, group_start: Union[int, torch.Tensor] = 0,
                     slot_start: Union[int, torch.Tensor] = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slot, mixed key) of every key of a remainders table, as :func:`_slots` for the other layouts: the
    group from the mixed key's top 32 bits, its pilot, :func:`_remainder_slot`."""
    num_groups = group_pilots.numel() if num_groups is None else num_groups
    mixed = _mixed(ids, group_hash)
    pilot = gather(group_pilots, _shifted(_group_of(mixed, group_hash[0], num_groups, True), group_start))
    return _shifted(_remainder_slot(mixed, pilot, group_hash, num_slots, low_bits), slot_start), mixed


def _remainder_slot(mixed: torch.Tensor, pilots: torch.Tensor, group_hash: Sequence[Union[int, torch.Tensor]],
                    num_slots: Union[int, torch.Tensor], low_bits: Union[int, torch.Tensor]) -> torch.Tensor:
    """x = mixed xor pilot * first; slot = strip * 2^low_bits + x mod 2^low_bits, the strip (of S / 2^low_bits)
    a multiply-shift of all of x: keys of a group share their top bits, and two of them with the same
    low bits (frequent for small ``low_bits``) only part by strip. ``pilots`` broadcast against
    ``mixed`` (the build tries several per key); first is odd, so the pilots below 2^low_bits move a key
    to as many distinct low parts."""
    x = torch.bitwise_xor(pilots.to(torch.int64) * group_hash[2], mixed)
    low = x & _low_mask(low_bits)
    strips = num_slots >> low_bits
    return _slot_of(x.mul_(group_hash[0]), strips).bitwise_left_shift_(low_bits).bitwise_or_(low)


def _apart(*slot_arrays: torch.Tensor) -> bool:
    """Whether to read the slots apart from computing them (:data:`APART_BYTES`): compiled, large tables."""
    return torch.compiler.is_compiling() and sum(a.numel() * a.element_size() for a in slot_arrays) > APART_BYTES


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for an index of any shape, with a 1-D ``index_select`` (advanced indexing is
    several times slower on CPU)."""
    return values.index_select(0, index) if index.dim() == 1 else values.index_select(0, index.reshape(-1)).view(index.shape)


@torch.library.custom_op("lhf_torchrec::gather_apart", mutates_args=())
def _gather_op(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.index_select(0, index)


@_gather_op.register_fake
def _(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.new_empty(index.shape)


def gather_apart(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`gather` as an op torch.compile cannot fuse into its neighbours: the index is computed for every
    id first, and the gather runs as its own tight loop (eager ``index_select``, any device), whose
    independent random reads the memory system overlaps. Eager, the same as :func:`gather`."""
    if index.dim() != 1:
        return _gather_op(values, index.reshape(-1)).view(index.shape)
    return _gather_op(values, index)


def _candidates(group_hash, pilots: torch.Tensor) -> torch.Tensor:
    """The multiplier of each pilot: ``first + pilot * step`` (odd first, even step: always odd)."""
    return pilots.to(torch.int64) * group_hash[3] + group_hash[2]


def _candidate_slots(mixed: torch.Tensor, pilots: torch.Tensor, group_hash, num_slots: int, low_bits: int
                     ) -> torch.Tensor:
    """The slots of mixed keys under ``pilots`` (broadcast), as a lookup computes them in either placement."""
    if low_bits:
        return _remainder_slot(mixed, pilots, group_hash, num_slots, low_bits)
    return _slot_of(mixed * _candidates(group_hash, pilots), num_slots)


def build(keys: torch.Tensor, rows: torch.Tensor, seed: int, table: str = "table",
          key_dtype: torch.dtype = torch.int64, num_rows: int = 1 << 31, slot_layout: str = "split"
          ) -> Dict[str, torch.Tensor]:
    """The table of unique ``keys`` and their ``rows`` (>= 0, < ``num_rows``), deterministic given ``seed``,
    in ``slot_layout`` (:func:`slot_layout`): ``split``, its keys stored as ``key_dtype`` (int32 when every key fits)
    and its rows in :func:`row_bytes` bytes; ``records``, int64 records (:data:`RECORD_TENSORS`; keys >= 0
    whose bits :func:`packs` with the rows); ``remainders`` (:data:`REMAINDER_TENSORS`; any int64 keys).

    ``keys`` may come in any order: the table is a function of the set of (key, row) entries (a group's
    pilot depends on its keys as a set, contention goes to the lower group), so callers need not sort.
    Memory besides the inputs and the table: about 11 bytes per key at the peak (:func:`_place`)."""
    if slot_layout not in ("split", "records", "remainders"):
        raise ValueError(f"table '{table}': unknown perfect hash slot layout '{slot_layout}'")
    keys = keys.to(torch.int64).cpu().contiguous()
    rows = rows.cpu().contiguous()
    low_bits = record_row_bits(num_rows) if slot_layout == "remainders" else 0
    num_slots, num_groups = table_sizes(keys.numel(), low_bits)
    for attempt in range(MAX_ATTEMPTS):
        words = mix64(torch.tensor([-1, -2, -3, -4]) + bucket_key(seed * MAX_ATTEMPTS + attempt))
        # group multiplier and first candidate odd, candidate step even and nonzero.
        group_hash = [int(words[0]) | 1, int(words[1]), int(words[2]) | 1, (int(words[3]) | 2) & ~1]
        pilots = _place(keys, num_groups, num_slots, group_hash, low_bits)
        if pilots is not None:
            tail = {"group_pilots": pilots, "group_hash": torch.tensor(group_hash, dtype=torch.int64)}
            if slot_layout == "records":
                return {"slot_records": _records(keys, rows, pilots, group_hash, num_slots, num_rows), **tail}
            if slot_layout == "remainders":
                return {"slot_remainders": _remainders(keys, rows, pilots, group_hash, num_slots, low_bits), **tail}
            slot_keys = torch.full((num_slots,), int(keys.min()), dtype=key_dtype)
            # Empty slots: row -1, whose low and high parts (encode_rows) are -1 too.
            width = row_bytes(num_rows)
            low = torch.full((num_slots,), -1, dtype=torch.int16)
            high = torch.full((num_slots if width > 2 else 0,), -1, dtype=torch.int8 if width < 4 else torch.int16)
            # Each key's slot is recomputed from its group's pilot, as a lookup computes it.
            for start in range(0, keys.numel(), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                slot = _slots(chunk, pilots, group_hash, num_slots)
                slot_keys[slot] = chunk.to(key_dtype)
                chunk_low, chunk_high = encode_rows(rows[start:start + _CHUNK].to(torch.int64), num_rows)
                low[slot] = chunk_low
                if high.numel():
                    high[slot] = chunk_high
            return {"slot_keys": slot_keys, "slot_rows": low, "slot_rows_high": high, **tail}
    raise ValueError(f"table '{table}': no perfect hash table for its {keys.numel()} entries after {MAX_ATTEMPTS} "
                     "attempts (are the entry keys unique?)")


def _records(keys: torch.Tensor, rows: torch.Tensor, pilots: torch.Tensor, group_hash, num_slots: int,
             num_rows: int) -> torch.Tensor:
    """int64 ``key << row_bits | row`` per slot (each key in the slot its group's pilot gives it); empty
    slots hold the smallest key (it has its own slot, so no query reaches an empty one with it) and the
    all-ones row."""
    bits = record_row_bits(num_rows)
    if int(keys.min()) < 0 or int(keys.max()).bit_length() + bits > 63:
        raise ValueError(f"keys in [{int(keys.min())}, {int(keys.max())}] and {num_rows} rows do not pack into records")
    records = torch.full((num_slots,), (int(keys.min()) << bits) | ((1 << bits) - 1), dtype=torch.int64)
    for start in range(0, keys.numel(), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        records[_slots(chunk, pilots, group_hash, num_slots)] = torch.bitwise_left_shift(chunk, bits).bitwise_or_(
            rows[start:start + _CHUNK].to(torch.int64))
    return records


def _remainders(keys: torch.Tensor, rows: torch.Tensor, pilots: torch.Tensor, group_hash, num_slots: int,
                low_bits: int) -> torch.Tensor:
    """int64 per slot: the mixed key of the slot's entry above ``low_bits``, its row below; empty slots
    hold the all-ones row (which no lookup returns as found)."""
    empty = (1 << low_bits) - 1
    records = torch.full((num_slots,), empty, dtype=torch.int64)
    for start in range(0, keys.numel(), _CHUNK):
        slot, mixed = _remainder_slots(keys[start:start + _CHUNK], pilots, group_hash, num_slots, low_bits)
        records[slot] = mixed.bitwise_and_(~empty).bitwise_or_(rows[start:start + _CHUNK].to(torch.int64))
    return records


def remainder_values(records: torch.Tensor, pilots: torch.Tensor, group_hash: Sequence[int], num_rows: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keys, rows) of every slot of a remainders table; row -1 (and a meaningless key) for an empty slot.
    The key's low bits come back from its slot and pilot (:func:`_remainder_slot` inverted), the key from
    its mixed value (mix64 is a bijection)."""
    low_bits = record_row_bits(num_rows)
    empty = (1 << low_bits) - 1
    rows = records & empty
    high = records & ~empty
    pilot = gather(pilots, _group_of(high, group_hash[0], pilots.numel(), True)).to(torch.int64)
    slot = torch.arange(records.numel(), dtype=torch.int64, device=records.device)
    low = pilot.mul_(group_hash[2]).bitwise_xor_(slot).bitwise_and_(empty)
    keys = unmix64(high.bitwise_or_(low)).sub_(group_hash[1])
    return keys, torch.where(rows == empty, -1, rows)


def record_values(records: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(relative keys, rows) of every record; row -1 for an empty slot."""
    bits = record_row_bits(num_rows)
    rows = records & ((1 << bits) - 1)
    return torch.bitwise_right_shift(records, bits), torch.where(rows == (1 << bits) - 1, -1, rows)


def _place(keys: torch.Tensor, num_groups: int, num_slots: int, group_hash, low_bits: int = 0
           ) -> Optional[torch.Tensor]:
    """The int16 pilot of each group, or None when some group found no multiplier. A key's slot follows
    from its group's pilot (:func:`_slots`), so only the pilots are kept.

    Memory besides ``keys``: the mixed keys sorted by group (8 bytes per key, :func:`_by_group`), a bool
    per slot, the int16 pilots and int32 sizes and int64 starts of the groups (about 11 bytes per key
    in all); a round's contention is settled among the slots it wants (:func:`_winners`), not in an
    array over all slots."""
    sizes, starts, sorted_keys = _by_group(keys, num_groups, group_hash, low_bits)
    occupied = torch.zeros(num_slots, dtype=torch.bool)
    pilots = torch.zeros(num_groups, dtype=torch.int16)
    for size in torch.unique(sizes[sizes > 0]).flip(0).tolist():
        pending = torch.nonzero(sizes == size).squeeze(1)
        next_try = torch.zeros_like(pending)
        first_round = True
        while pending.numel():
            # Most groups take their first candidate while the table is empty: try few at first.
            width = FIRST_TRIES if first_round else TRIES_PER_ROUND
            first_round = False
            per_round = max(1, _ROUND_ELEMENTS // (size * width))
            groups, tries = pending[:per_round], next_try[:per_round]
            last = int(tries.max()) + width
            if last > MAX_TRIES:
                return None
            tried = tries.unsqueeze(1) + torch.arange(width)  # (P, width) pilots
            has, first, chosen = _first_fits(sorted_keys, starts.index_select(0, groups), size, tried, occupied,
                                             group_hash, num_slots, low_bits)
            # Among groups with a candidate, the lower group wins a slot both want in this round.
            won = has.clone()
            won[has] = _winners(chosen[has])
            occupied[chosen[won].view(-1)] = True
            pilots[groups[won]] = tried[won, first[won]].to(torch.int16)
            # No candidate: try the next ones. Lost a slot to a lower group: retry the same one.
            tries = torch.where(has, tries + first, tries + width)
            pending = torch.cat([groups[~won], pending[per_round:]])
            next_try = torch.cat([tries[~won], next_try[per_round:]])
    return pilots


def _winners(chosen: torch.Tensor) -> torch.Tensor:
    """For groups (rows of ``chosen``, lowest first) that each want distinct slots: whether each gets
    all of its slots, a slot that several want going to the lowest of them."""
    wanted = chosen.reshape(-1)  # row-major: the groups wanting a slot come in ascending order
    slots, order = torch.sort(wanted, stable=True)  # each slot's wanters stay lowest first
    first = torch.ones(slots.numel(), dtype=torch.bool)
    first[1:] = slots[1:] != slots[:-1]
    gets = torch.zeros(wanted.numel(), dtype=torch.bool)
    gets[order[first]] = True
    return gets.view(chosen.shape).all(1)


def _by_group(keys: torch.Tensor, num_groups: int, group_hash, low_bits: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int32 keys per group, int64 start of each group, the mixed keys in group order): a counting
    sort, :data:`_CHUNK` keys at a time, stable (keys of a group in their given order) like an argsort of
    the groups, without the keys' group, order or sort buffers (16-28 bytes a key)."""

    def mixed_and_groups(start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        mixed = _mixed(keys[start:start + _CHUNK], group_hash)
        return mixed, _group_of(mixed, group_hash[0], num_groups, low_bits > 0)

    sizes = torch.zeros(num_groups, dtype=torch.int32)
    for start in range(0, keys.numel(), _CHUNK):
        group = mixed_and_groups(start)[1]
        sizes.index_add_(0, group, torch.ones(1, dtype=torch.int32).expand(group.numel()))
    # Where each group's next key goes: its start, advanced by its keys placed so far.
    fill = torch.cumsum(sizes, 0, dtype=torch.int64) - sizes
    sorted_keys = torch.empty_like(keys)
    for start in range(0, keys.numel(), _CHUNK):
        mixed, group = mixed_and_groups(start)
        group, order = torch.sort(group, stable=True)
        new = torch.ones(group.numel(), dtype=torch.bool)  # the chunk's first key of its group
        new[1:] = group[1:] != group[:-1]
        index = torch.arange(group.numel())
        run_start = torch.cummax(torch.where(new, index, 0), 0).values
        sorted_keys[fill.index_select(0, group) + (index - run_start)] = mixed.index_select(0, order)
        fill.index_add_(0, group, torch.ones(1, dtype=torch.int64).expand(group.numel()))
    fill -= sizes  # every group's start again
    return sizes, fill, sorted_keys


def _first_fits(sorted_keys: torch.Tensor, starts: torch.Tensor, size: int, tried: torch.Tensor,
                occupied: torch.Tensor, group_hash, num_slots: int, low_bits: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups of ``size`` keys starting at ``starts`` in ``sorted_keys`` and their (P, width) ``tried``
    pilots: (whether a pilot sends the group's keys to free, distinct slots, the first such pilot's index,
    its (P, size) slots). Computed :data:`_FIT_ELEMENTS` candidate slots at a time: each group's answer
    depends on its own keys only, and the (P, width, size) temporaries stay a few MB."""
    width = tried.shape[1]
    members = torch.arange(size, dtype=torch.int64)
    step = max(1, _FIT_ELEMENTS // (width * size))
    has, first, chosen = [], [], []
    for lo in range(0, starts.numel(), step):
        positions = starts[lo:lo + step].unsqueeze(1) + members  # (p, size)
        member_keys = sorted_keys.index_select(0, positions.view(-1)).view(-1, 1, size)
        slots = _candidate_slots(member_keys, tried[lo:lo + step].unsqueeze(2), group_hash, num_slots, low_bits)
        ok = ~occupied.index_select(0, slots.view(-1)).view(slots.shape).any(2)
        for j in range(1, size):  # the group's keys must take distinct slots
            ok &= (slots[:, :, j:] != slots[:, :, :-j]).all(2)
        best = ok.to(torch.int8).argmax(1)
        has.append(ok.any(1))
        first.append(best)
        chosen.append(slots[torch.arange(best.numel()), best])
    return torch.cat(has), torch.cat(first), torch.cat(chosen)


def check(tensors: Mapping[str, torch.Tensor], num_rows: int, table: str = "table") -> None:
    """Raises ValueError naming the table unless ``tensors`` have the dtypes and shapes of a table into
    ``num_rows`` rows (split :data:`TENSORS`, :data:`RECORD_TENSORS` or :data:`REMAINDER_TENSORS`)."""
    kind = slot_layout_of(tensors)
    if kind != "split":
        dtypes = {f"slot_{kind}": (torch.int64,), "group_pilots": (torch.int16,), "group_hash": (torch.int64,)}
    else:
        dtypes = {"slot_keys": (torch.int64, torch.int32), "slot_rows": (torch.int16,),
                  "slot_rows_high": (torch.int8, torch.int16), "group_pilots": (torch.int16,), "group_hash": (torch.int64,)}
    for name, dtype in dtypes.items():
        if tensors[name].dtype not in dtype or tensors[name].dim() != 1:
            raise ValueError(f"table '{table}': perfect hash tensor '{name}' must be a 1-D {dtype} tensor, got "
                             f"{tensors[name].dtype} {tuple(tensors[name].shape)}")
    groups = tensors["group_pilots"].numel()
    if kind == "records":
        records = tensors["slot_records"]
        if not records.numel() or int(records.min()) < 0:
            raise ValueError(f"table '{table}': perfect hash slot_records must be at least one record, none negative")
        slots = records.numel()
    elif kind == "remainders":
        slots, low_bits = tensors["slot_remainders"].numel(), record_row_bits(num_rows)
        if slots < 1 or slots % (1 << low_bits):
            raise ValueError(f"table '{table}': perfect hash slot_remainders must be a positive multiple of "
                             f"2^{low_bits} slots for {num_rows} rows, got {slots}")
    else:
        slots = tensors["slot_keys"].numel()
        if slots < 1 or tensors["slot_rows"].numel() != slots:
            raise ValueError(f"table '{table}': perfect hash slot_keys and slot_rows must have the same length >= 1, "
                             f"got {slots} and {tensors['slot_rows'].numel()}")
    if "slot_rows_high" in tensors and tensors["slot_rows_high"].numel() not in (0, slots):
        raise ValueError(f"table '{table}': perfect hash slot_rows_high must be empty or have {slots} slots, got "
                         f"{tensors['slot_rows_high'].numel()}")
    if groups < 1 or tensors["group_hash"].numel() != 4:
        raise ValueError(f"table '{table}': perfect hash needs at least one group pilot and a "
                         f"group hash of 4 words, got {groups} and {tensors['group_hash'].numel()}")
