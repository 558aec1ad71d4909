import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lhf_torchrec.mapping import IdMapping, load_mappings, save_mappings
from lhf_torchrec.mapping import perfect_hash
from lhf_torchrec.mapping.hashing import bucket_hash, bucket_of
from lhf_torchrec.mapping.id_mapping import COMPILE_SETTINGS, bucketed_storage_cost, storage_cost

int64s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
EXTREMES = [-(1 << 63), (1 << 63) - 1, 0, -1, 1, (1 << 31) - 1, 1 << 31, -(1 << 31)]


def _bucketed(entry_ids, num_buckets, seed, probes=1):
    """A bucketed mapping of 4 rows per bucket whose entries (one per bucket hash) take row 0 of their bucket."""
    ids = torch.tensor(entry_ids, dtype=torch.int64)
    _, first = np.unique(bucket_hash(ids, num_buckets, seed).numpy(), return_index=True)  # one id per h
    ids = ids[torch.from_numpy(np.sort(first))]
    rows = bucket_of(ids, num_buckets, seed) * 4
    regions = torch.tensor([[1, 3]] * num_buckets, dtype=torch.int32)
    return IdMapping.from_entries(ids.numpy(), rows.numpy(), 4 * num_buckets, num_buckets=num_buckets, seed=seed,
                                  probes=probes, bucket_hash_regions=regions, table_name="tb")


def _same(a: IdMapping, b: IdMapping, query: torch.Tensor) -> None:
    assert torch.equal(a(query), b(query))
    if a._native_layout is not None:  # the CPU kernel applied a; the torch ops (CUDA, other CPUs) must agree
        assert torch.equal(a._fill_hashed(*a._lookup(query), query), b(query))
    assert torch.equal(a.has_entry(query), b.has_entry(query))
    for x, y in zip(a.stored_entries(), b.stored_entries()):
        assert torch.equal(x, y)


@settings(max_examples=60, deadline=None)
@given(
    entry_ids=st.lists(st.one_of(int64s, st.integers(-50, 50), st.sampled_from(EXTREMES)), max_size=60, unique=True),
    extra=st.lists(int64s, max_size=20),
    num_rows=st.one_of(st.integers(2, 500), st.sampled_from([(1 << 15) + 1, 1 << 23, (1 << 23) + 1, 1 << 30])),
    probes=st.sampled_from([1, 2]),
    seed=st.integers(0, 1 << 40),
    bucketed=st.booleans(),
)
@example(entry_ids=[0, 1], extra=[], num_rows=2, probes=1, seed=0, bucketed=False)  # entry 1's row is its hash row
def test_perfect_hash_gives_what_sorted_keys_give(entry_ids, extra, num_rows, probes, seed, bucketed):
    if bucketed:
        mapping = _bucketed(entry_ids, 4, seed % 100, probes)
    else:
        rows = (np.arange(len(entry_ids)) * 62_710_007) % num_rows  # rows with high bits where there are any
        mapping = IdMapping.from_entries(np.array(entry_ids, dtype=np.int64), rows, num_rows, probes=probes, seed=seed,
                                         hash_offset=num_rows // 3, table_name="t")
    if not mapping.stored_entries()[0].numel():
        return  # nothing to store (a dense entry whose row is its hash row is no entry)
    table, keys = mapping.with_storage("perfect_hash"), mapping.with_storage("sorted")
    assert table.storage == "perfect_hash" and keys.storage == "sorted"
    # Entries (twice: duplicates in a query), their neighbours (unseen), extremes, random ids.
    near = [i + d for i in entry_ids for d in (-1, 1) if -(1 << 63) <= i + d < (1 << 63)]
    query = torch.tensor(entry_ids + entry_ids[:5] + near + EXTREMES + extra, dtype=torch.int64)
    _same(table, keys, query)
    _same(table, keys, torch.zeros(0, dtype=torch.int64))
    # Every stored entry is found (an entry id of a dense mapping whose row is its hash row is stored as no entry).
    assert bool(table.has_entry(mapping.stored_entries()[0]).all()) or bucketed
    assert torch.equal(table.with_storage("sorted")(query), keys(query))


def test_a_large_table_matches_sorted_keys_and_its_bytes_match_the_cost():
    rng = np.random.default_rng(0)
    for ids in (np.unique(rng.integers(-(1 << 62), 1 << 62, 20_000)), np.unique(rng.integers(0, 1 << 30, 20_000))):
        rows = rng.integers(0, 1000, ids.size)
        mapping = IdMapping.from_entries(ids, rows, 2000, hash_offset=1000, seed=5)
        assert mapping.storage == "perfect_hash"
        assert mapping.nbytes == storage_cost(ids.size, int(ids[-1] - ids[0]) + 1, 2000)[1]
        if ids[-1] - ids[0] < 1 << 31:  # int32 keys, 2-byte rows
            assert mapping.slot_keys.dtype == torch.int32
            assert mapping.slot_rows.dtype == torch.int16 and not mapping.slot_rows_high.numel()
        else:  # int64 keys: remainders, 8 bytes a slot (11 strips of 2^11 slots) instead of 10
            assert set(mapping._buffers) == set(perfect_hash.REMAINDER_TENSORS)
            assert mapping.slot_remainders.numel() == 11 * 2048
        query = torch.from_numpy(np.concatenate([ids, rng.integers(-(1 << 63), 1 << 63, 5000), ids[:100] + 1]))
        sorted_keys = mapping.with_storage("sorted")
        assert torch.equal(mapping(query), sorted_keys(query))
        assert torch.equal(mapping(torch.from_numpy(ids)), torch.from_numpy(rows))


def test_bucketed_mappings_key_the_table_by_bucket_hash():
    mapping = _bucketed(list(range(-3000, 3000, 3)), 8, seed=2)
    assert mapping.storage == "perfect_hash" and "slot_remainders" in mapping._buffers  # int64 bucket hashes
    assert mapping.nbytes == bucketed_storage_cost(mapping.num_entries, mapping.num_rows)[1] + 8 * 8
    query = torch.arange(-4000, 4000)
    _same(mapping, mapping.with_storage("sorted"), query)
    assert int(mapping.bucket_entry_counts().sum()) == mapping.num_entries


def test_the_table_is_deterministic_given_the_seed():
    ids, rows = np.arange(0, 50_000, 7), np.arange(0, 50_000, 7) % 100
    a, b = (IdMapping.from_entries(ids, rows, 200, hash_offset=100, seed=1) for _ in range(2))
    c = IdMapping.from_entries(ids, rows, 200, hash_offset=100, seed=2)
    assert a.fingerprint == b.fingerprint and a.storage == "perfect_hash"
    assert not torch.equal(a.group_hash, c.group_hash)
    assert torch.equal(a(torch.from_numpy(ids)), c(torch.from_numpy(ids)))  # other table, same entries


def test_save_load_round_trip_and_checksum(tmp_path):
    mapping = IdMapping.from_entries(np.arange(1, 1 << 40, (1 << 40) // 300)[:300], np.arange(300) % 50, 64,
                                     hash_offset=50, table_name="t_sparse")
    assert mapping.storage == "perfect_hash" and "slot_records" in mapping._buffers
    path = str(tmp_path / "m.safetensors")
    save_mappings(path, {"t_sparse": mapping})
    loaded = load_mappings(path)["t_sparse"]
    query = torch.cat([torch.arange(0, 1 << 40, (1 << 40) // 1000), torch.tensor(EXTREMES)])
    assert loaded.fingerprint == mapping.fingerprint and torch.equal(loaded(query), mapping(query))
    # One changed slot key: the file no longer matches its checksum.
    data = bytearray(open(path, "rb").read())
    raw = mapping.slot_records.numpy().tobytes()
    at = bytes(data).index(raw)
    data[at] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for table 't_sparse'"):
        load_mappings(path)


def test_malformed_tables_are_refused_with_the_table_name():
    tensors = perfect_hash.build(torch.arange(100), torch.arange(100), seed=0)
    bad = dict(tensors, group_pilots=tensors["group_pilots"][:0])
    with pytest.raises(ValueError, match="table 'tx': perfect hash needs at least one group pilot"):
        IdMapping(10, storage="perfect_hash", tensors=bad, num_entries=100, table_name="tx")
    bad = dict(tensors, slot_rows=tensors["slot_rows"].to(torch.int64))
    with pytest.raises(ValueError, match="table 'tx': perfect hash tensor 'slot_rows'"):
        IdMapping(10, storage="perfect_hash", tensors=bad, num_entries=100, table_name="tx")
    with pytest.raises(ValueError, match="table 'tx': stored rows exceed"):
        IdMapping(10, storage="perfect_hash", tensors=tensors, num_entries=100, table_name="tx")


@pytest.mark.parametrize("num_rows, row_bytes", [(1 << 15, 2), ((1 << 15) + 1, 3), (1 << 23, 3), ((1 << 23) + 1, 4)])
def test_rows_take_2_3_or_4_bytes_by_the_row_count(num_rows, row_bytes):
    rng = np.random.default_rng(1)
    ids = np.unique(rng.integers(-(1 << 62), 1 << 62, 3000))
    rows = np.concatenate([[num_rows - 1, 0, (1 << 15) - 1, (1 << 15) % num_rows],
                           rng.integers(0, num_rows, ids.size - 4)])
    mapping = IdMapping.from_entries(ids, rows, num_rows, seed=3)
    # With 4-byte rows sorted keys are cheaper: the table is only built on request.
    assert mapping.storage == ("sorted" if row_bytes == 4 else "perfect_hash")
    mapping = mapping.with_storage("perfect_hash")
    assert perfect_hash.row_bytes(num_rows) == row_bytes
    high = mapping.slot_rows_high
    assert high.numel() * high.element_size() == (row_bytes - 2) * mapping.slot_rows.numel()
    assert mapping.nbytes == perfect_hash.table_bytes(ids.size, 8, num_rows)
    assert torch.equal(mapping(torch.from_numpy(ids)), torch.from_numpy(rows))
    assert torch.equal(mapping.stored_entries()[1], mapping.with_storage("sorted").stored_entries()[1])


def test_storage_rule_takes_the_cheapest_storage_and_the_faster_on_a_tie():
    small, large = 1 << 15, (1 << 23) + 1  # 2-byte rows up to 2^15 rows, 4-byte beyond 2^23
    assert storage_cost(1000, 1600, small) == ("dense", 3_200)  # 2-byte rows: cheaper than the table's 6,730 bytes
    assert storage_cost(1000, 1600, 128) == ("dense", 1_600)  # 1-byte rows up to 128 rows
    assert storage_cost(1000, 1600, large) == ("dense", 6_400)  # 4-byte rows
    assert storage_cost(1000, 1 << 20, small) == ("perfect_hash", perfect_hash.table_bytes(1000, 4, small))
    # Keys of 40 bits and 16-bit row fields pack into int64 records: 8 bytes a slot instead of 10.
    assert storage_cost(1000, 1 << 40, small) == ("perfect_hash", perfect_hash.table_bytes(1000, 8, small, 40))
    assert perfect_hash.table_bytes(1000, 8, small, 40) == 8 * 1042 + 2 * 250 + 32
    assert storage_cost(1000, 1 << 63, small) == ("perfect_hash", perfect_hash.table_bytes(1000, 8, small))
    assert storage_cost(3, 1 << 40, small) == ("sorted", 36)  # rounding slots and groups up costs more
    for entries in (20, 100, 10_000, 1_000_000):
        for key_bytes, span in ((4, 1 << 31), (8, 1 << 40)):
            sorted_bytes = entries * (4 + key_bytes)
            # Never more bytes than sorted keys: lookup speed takes no rows from the table.
            assert storage_cost(entries, span, large) == ("sorted", sorted_bytes)
            for num_rows in (small, (1 << 23)):
                storage, nbytes = storage_cost(entries, span, num_rows)
                assert nbytes == min(sorted_bytes, perfect_hash.table_bytes(entries, key_bytes, num_rows,
                                                                            perfect_hash.key_bits(span)))
                if entries >= 10_000:  # fewer: the 32-byte group hash and rounding up can tip it
                    assert storage == "perfect_hash" and nbytes < sorted_bytes


def test_key_zero_is_placed_like_any_other():
    """Relative keys always include 0, and 0 times any multiplier is 0: keys are shifted before hashing."""
    keys = torch.arange(0, 70_000, 2)
    tensors = perfect_hash.build(keys, torch.arange(keys.numel()) % 1000, seed=0)
    rows, found = perfect_hash.lookup(keys, tensors["slot_keys"], tensors["slot_rows"], tensors["slot_rows_high"],
                                      tensors["group_pilots"],
                                      tuple(tensors["group_hash"].tolist()))
    assert bool(found.all()) and torch.equal(rows, torch.arange(keys.numel()) % 1000)


# Entry ids in a span of up to 2^44 anywhere in int64 (the bottom and the top included): relative keys too wide
# for int32, packed into records with the rows where they fit.
_spans = st.tuples(st.sampled_from([-(1 << 63), (1 << 63) - (1 << 44), -(1 << 20), 1 << 50]), st.integers(32, 44))


@settings(max_examples=60, deadline=None)
@given(
    start_bits=_spans,
    offsets=st.lists(st.integers(0, (1 << 44) - 1), min_size=1, max_size=60, unique=True),
    extra=st.lists(int64s, max_size=20),
    num_rows=st.one_of(st.integers(2, 500), st.sampled_from([1 << 15, (1 << 19) - 1, 1 << 19, 1 << 30])),
    seed=st.integers(0, 1 << 40),
)
def test_records_give_what_sorted_keys_give(start_bits, offsets, extra, num_rows, seed):
    start, bits = start_bits
    # The span's ends are entries: its width sets the key bits.
    entry_ids = sorted({start, start + (1 << bits) - 1, *(start + o % (1 << bits) for o in offsets)})
    rows = (np.arange(len(entry_ids)) * 62_710_007) % num_rows
    mapping = IdMapping.from_entries(np.array(entry_ids, dtype=np.int64), rows, num_rows, seed=seed,
                                     hash_offset=num_rows // 3, table_name="t").with_storage("perfect_hash")
    packed = bits + num_rows.bit_length() <= 63
    assert ("slot_records" in mapping._buffers) == packed and mapping.storage == "perfect_hash"
    span = entry_ids[-1] - entry_ids[0] + 1
    expected_bytes = perfect_hash.table_bytes(len(entry_ids), 8, num_rows, perfect_hash.key_bits(span))
    assert mapping.nbytes == expected_bytes
    if len(entry_ids) >= 30:  # the cost the fit counts; fewer entries may go to sorted keys
        assert storage_cost(len(entry_ids), span, num_rows) == ("perfect_hash", expected_bytes)
    keys = mapping.with_storage("sorted")
    near = [i + d for i in entry_ids for d in (-1, 1, 1 << bits, -(1 << bits)) if -(1 << 63) <= i + d < (1 << 63)]
    query = torch.tensor(entry_ids + entry_ids[:5] + near + EXTREMES + extra, dtype=torch.int64)
    _same(mapping, keys, query)
    _same(mapping, keys, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(mapping(torch.tensor(entry_ids)), torch.from_numpy(rows))


def test_records_cost_less_than_int64_keys_and_split_files_still_load(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.unique(rng.integers(0, 1 << 40, 30_000))
    rows = rng.integers(0, 1 << 16, ids.size)
    mapping = IdMapping.from_entries(ids, rows, 1 << 17, seed=3, table_name="t")
    assert mapping.slot_records.dtype == torch.int64 and set(mapping._buffers) == set(perfect_hash.RECORD_TENSORS)
    assert mapping.nbytes == storage_cost(ids.size, int(ids[-1] - ids[0]) + 1, 1 << 17)[1]
    assert mapping.nbytes < perfect_hash.table_bytes(ids.size, 8, 1 << 17) * 0.75  # 8 bytes a slot, not 11
    # A file written before records existed: the same entries in split slots (int64 keys, offset 0).
    split = IdMapping(1 << 17, seed=3, storage="perfect_hash", offset=0, num_entries=ids.size, table_name="t",
                      tensors=perfect_hash.build(torch.from_numpy(ids), torch.from_numpy(rows), 3, "t", torch.int64,
                                                 1 << 17))
    path = str(tmp_path / "old.safetensors")
    save_mappings(path, {"t": split})
    loaded = load_mappings(path)["t"]
    assert set(loaded._buffers) == set(perfect_hash.TENSORS)
    query = torch.from_numpy(np.concatenate([ids, ids + 1, rng.integers(-(1 << 63), 1 << 63, 5000), EXTREMES]))
    assert torch.equal(loaded(query), mapping(query)) and torch.equal(loaded.has_entry(query), mapping.has_entry(query))
    # A record whose row field is beyond the rows, or a negative record: a clear error naming the table.
    bad = dict(mapping._buffers, slot_records=mapping.slot_records.clone())
    bad["slot_records"][0] = (1 << 18) - 2  # row field 2^18 - 2 >= 2^17 rows (all ones: empty)
    with pytest.raises(ValueError, match="table 't': stored rows exceed"):
        IdMapping(1 << 17, storage="perfect_hash", offset=mapping.offset, tensors=bad, table_name="t")
    bad["slot_records"][0] = -1
    with pytest.raises(ValueError, match="table 't': perfect hash slot_records must be"):
        IdMapping(1 << 17, storage="perfect_hash", offset=mapping.offset, tensors=bad, table_name="t")


def test_compiled_lookups_of_large_tables_read_the_slots_apart(torch_ops_only, compiled_ops):
    """Above APART_BYTES of slots the compiled lookup gathers the slots in their own op, with the eager rows
    (the torch ops: CUDA, CPUs without the kernel)."""
    rng = np.random.default_rng(2)
    ids = np.unique(rng.integers(0, 1 << 40, 300_000))  # 2.5 MB of records
    mapping = IdMapping.from_entries(ids, rng.integers(0, 1000, ids.size), 2000, hash_offset=1000, seed=1)
    wide = IdMapping.from_entries(np.unique(rng.integers(-(1 << 63), 1 << 63, 300, dtype=np.int64)),
                                  np.arange(300) % 1000, 2000, hash_offset=1000, seed=1)  # small, split, fused
    assert "slot_records" in mapping._buffers and "slot_keys" in wide._buffers
    query = torch.from_numpy(np.concatenate([ids[::7], rng.integers(-(1 << 63), 1 << 63, 3000)]))
    for m, apart in ((mapping, True), (wide, False)):
        assert (torch.ops.lhf_torchrec.gather_apart.default in compiled_ops(m, query)) == apart
    # Through inductor (the op stays an extern call between two kernels): the eager rows.
    torch._dynamo.reset()
    assert torch.equal(torch.compile(mapping, **COMPILE_SETTINGS)(query), mapping(query))


def test_records_without_key_zero_find_only_their_keys():
    """Empty record slots hold the smallest key, so a query of key 0 (not stored here) finds nothing."""
    keys = torch.arange(5, 70_000, 2) + (1 << 40)
    tensors = perfect_hash.build(keys, torch.arange(keys.numel()) % 1000, seed=0, num_rows=1000, slot_layout="records")
    query = torch.cat([keys, keys + 1, torch.tensor([0, 1 << 40, -1, (1 << 63) - 1])])
    rows, found = perfect_hash.lookup_records(query, tensors["slot_records"], perfect_hash.record_row_bits(1000),
                                              tensors["group_pilots"], tuple(tensors["group_hash"].tolist()))
    assert torch.equal(found, torch.arange(query.numel()) < keys.numel())
    assert torch.equal(rows[:keys.numel()], torch.arange(keys.numel()) % 1000)
    with pytest.raises(ValueError, match="do not pack into records"):
        perfect_hash.build(keys << 20, torch.zeros_like(keys), seed=0, num_rows=1000, slot_layout="records")


def test_records_of_keys_in_arithmetic_progression_build():
    """Keys k * 7919 * 2^20 (all low bits equal): a weaker mix than mix64 found no table for them."""
    keys = torch.arange(5000) * (7919 << 20)
    tensors = perfect_hash.build(keys, torch.arange(5000), seed=0, num_rows=5001, slot_layout="records")
    rows, found = perfect_hash.lookup_records(keys, tensors["slot_records"], perfect_hash.record_row_bits(5001),
                                              tensors["group_pilots"], tuple(tensors["group_hash"].tolist()))
    assert bool(found.all()) and torch.equal(rows, torch.arange(5000))


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.integers(0, (1 << 40) - 1), min_size=1, max_size=400, unique=True),
       num_rows=st.sampled_from([100, 1 << 16, 1 << 24]), layout=st.sampled_from(["split", "records", "remainders"]),
       shuffle=st.integers(0, 1 << 30))
def test_the_table_does_not_depend_on_the_keys_order(keys, num_rows, layout, shuffle):
    """build takes the keys in any order (bucketed mappings are assembled without sorting them)."""
    assume(layout != "records" or max(keys).bit_length() + perfect_hash.record_row_bits(num_rows) <= 63)  # records fit
    keys = torch.tensor(keys, dtype=torch.int64)
    rows = keys % num_rows
    perm = torch.from_numpy(np.random.default_rng(shuffle).permutation(keys.numel()))
    a = perfect_hash.build(keys, rows, seed=3, num_rows=num_rows, slot_layout=layout)
    b = perfect_hash.build(keys[perm], rows[perm], seed=3, num_rows=num_rows, slot_layout=layout)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["split", "records", "remainders"])
def test_chunked_build_gives_the_same_table(monkeypatch, layout):
    """The build mixes, writes and tries candidates by chunks to bound its memory; the chunk sizes do not
    change the table (a round's outcome is computed group by group)."""
    keys = torch.from_numpy(np.random.default_rng(0).choice(1 << 40, 30_000, replace=False))
    rows = keys % 5000
    whole = perfect_hash.build(keys, rows, seed=1, num_rows=5000, slot_layout=layout)
    monkeypatch.setattr(perfect_hash, "_CHUNK", 999)
    monkeypatch.setattr(perfect_hash, "_FIT_ELEMENTS", 100)
    chunked = perfect_hash.build(keys, rows, seed=1, num_rows=5000, slot_layout=layout)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    group_hash = chunked["group_hash"].tolist()
    if layout == "split":
        found_rows, found = perfect_hash.lookup(keys, chunked["slot_keys"], chunked["slot_rows"],
                                                chunked["slot_rows_high"], chunked["group_pilots"], group_hash)
    else:
        lookup = perfect_hash.lookup_records if layout == "records" else perfect_hash.lookup_remainders
        found_rows, found = lookup(keys, chunked[f"slot_{layout}"], perfect_hash.record_row_bits(5000),
                                   chunked["group_pilots"], group_hash)
    assert bool(found.all()) and torch.equal(found_rows, rows)


def test_the_table_is_the_one_the_argsort_build_made():
    """Golden tables, computed by the build before its counting sort and per-round contention (commit
    112ce46: an argsort of the groups, an int32 owner per slot): the memory-saving build makes the same
    tables bit for bit, so every fitted mapping keeps its fingerprint."""
    import hashlib

    keys = torch.from_numpy(np.random.default_rng(0).choice(1 << 40, 30_000, replace=False))
    for layout, want in (("split", "d04d6baea53ca330"), ("records", "e38f20d074e0a645")):
        table = perfect_hash.build(keys, keys % 5000, seed=1, num_rows=5000, slot_layout=layout)
        got = hashlib.sha256(b"".join(table[k].numpy().tobytes() for k in sorted(table))).hexdigest()[:16]
        assert got == want, layout


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(int64s, max_size=300), num_groups=st.integers(1, 40), chunk=st.sampled_from([1, 7, 64, 1 << 18]),
       seed=st.integers(0, 3))
def test_counting_sort_by_group_equals_a_stable_argsort(keys, num_groups, chunk, seed):
    """The build groups its keys with a chunked counting sort: the same sizes, starts and key order (keys
    of a group in their given order) as a stable argsort of the groups, over any chunk size."""
    from unittest import mock

    keys = torch.tensor(keys, dtype=torch.int64)
    group_hash = [0x9E3779B97F4A7C15 - (1 << 64) | 1, seed * 7919, 3, 2]
    mixed = perfect_hash._mixed(keys, group_hash)
    group = perfect_hash._group_of(mixed.clone(), group_hash[0], num_groups)
    order = torch.argsort(group, stable=True)
    want_sizes = torch.bincount(group, minlength=num_groups)
    with mock.patch.object(perfect_hash, "_CHUNK", chunk):
        sizes, starts, sorted_keys = perfect_hash._by_group(keys, num_groups, group_hash, 0)
    assert torch.equal(sizes.long(), want_sizes) and torch.equal(starts, torch.cumsum(want_sizes, 0) - want_sizes)
    assert torch.equal(sorted_keys, mixed[order])


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 30), min_size=3, max_size=3, unique=True), max_size=40))
def test_contention_goes_to_the_lowest_group_as_an_owner_per_slot_gives_it(rows):
    """A round's contention is settled among the slots it wants: each group gets all its slots iff no lower
    group wants one of them, as the per-slot owner array (scatter_reduce amin) it replaces decided."""
    chosen = torch.tensor(rows, dtype=torch.int64).view(-1, 3)
    rank = torch.arange(chosen.shape[0], dtype=torch.int32).unsqueeze(1).expand(-1, 3)
    owner = torch.full((31,), 1 << 30, dtype=torch.int32)
    owner.scatter_reduce_(0, chosen.reshape(-1), rank.reshape(-1), "amin")
    want = (owner.index_select(0, chosen.reshape(-1)).view(chosen.shape) == rank).all(1)
    assert torch.equal(perfect_hash._winners(chosen), want)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(["uniform", "progression", "run", "high"]),
    size=st.integers(perfect_hash.MIN_REMAINDER_ENTRIES, 3000),
    draw_seed=st.integers(0, 1 << 30),
    extra=st.lists(int64s, max_size=20),
    rows_per_entry=st.sampled_from([4, 9, 50, 200]),
    seed=st.integers(0, 1 << 40),
)
def test_remainders_give_what_sorted_keys_give(shape, size, draw_seed, extra, rows_per_entry, seed):
    """int64 keys in remainders (the mixed key above the row bits, its low bits given back by the slot):
    the rows, entries found and stored entries of sorted keys, for keys anywhere in int64 (the extremes
    included) and unseen ids next to them; applied alone and fused with another table."""
    rng = np.random.default_rng(draw_seed)
    base = {"uniform": rng.integers(-(1 << 63), (1 << 63) - 1, size, dtype=np.int64),
            "progression": np.arange(size, dtype=np.int64) * (7919 << 20),  # low bits all equal
            "run": np.arange(size, dtype=np.int64) - size // 2 + (1 << 62),
            "high": rng.integers(-(1 << 20), 1 << 20, size).astype(np.int64) << 43}[shape]
    entry_ids = sorted(set(base.tolist()) | set(EXTREMES))
    num_rows = max(2, len(entry_ids) // rows_per_entry)
    rows = (np.arange(len(entry_ids)) * 62_710_007) % num_rows
    mapping = IdMapping.from_entries(np.array(entry_ids, dtype=np.int64), rows, num_rows, seed=seed,
                                     hash_offset=num_rows // 3, table_name="t").with_storage("perfect_hash")
    stored = mapping.stored_entries()[0]
    span = int(stored[-1]) - int(stored[0]) + 1
    kind = perfect_hash.slot_layout(stored.numel(), 8 if span > 1 << 31 else 4, num_rows, perfect_hash.key_bits(span))
    assert perfect_hash.slot_layout_of(mapping._buffers) == kind
    assume(kind == "remainders")
    assert mapping.nbytes == perfect_hash.table_bytes(stored.numel(), 8, num_rows, perfect_hash.key_bits(span))
    near = [i + d for i in entry_ids[::5] for d in (-1, 1, 1 << 17, -(1 << 43)) if -(1 << 63) <= i + d < (1 << 63)]
    query = torch.tensor(entry_ids + entry_ids[:5] + near + EXTREMES + extra, dtype=torch.int64)
    keys = mapping.with_storage("sorted")
    _same(mapping, keys, query)
    _same(mapping, keys, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(keys.with_storage("perfect_hash").slot_remainders, mapping.slot_remainders)
    from lhf_torchrec.mapping.fused import FusedIdMappings

    other = IdMapping.from_entries(np.arange(10), np.arange(10) % 3, 3, hash_offset=1, table_name="d")
    fused = FusedIdMappings({"t": mapping, "d": other})
    assert "t" in fused.tables
    assert torch.equal(fused([query, query], ["t", "d"])[0], keys(query))


def test_remainders_are_8_bytes_a_slot_and_save_load_with_a_checksum(tmp_path):
    rng = np.random.default_rng(4)
    ids = np.unique(rng.integers(-(1 << 63), (1 << 63) - 1, 40_000, dtype=np.int64))
    rows = rng.integers(0, 4000, ids.size)
    mapping = IdMapping.from_entries(ids, rows, 4000, hash_offset=3000, seed=2, table_name="t")
    assert set(mapping._buffers) == set(perfect_hash.REMAINDER_TENSORS) and mapping.offset == 0
    # 4000 rows: 12 row bits, slots a multiple of 2^12 (11 strips), 8 bytes each against 10 split.
    assert mapping.slot_remainders.numel() == 11 * 4096
    assert mapping.nbytes == 8 * 11 * 4096 + 2 * 10_000 + 32 < 10 * perfect_hash.table_sizes(ids.size)[0]
    path = str(tmp_path / "m.safetensors")
    save_mappings(path, {"t": mapping})
    loaded = load_mappings(path)["t"]
    query = torch.from_numpy(np.concatenate([ids, ids + 1, rng.integers(-(1 << 63), 1 << 63, 5000), EXTREMES]))
    assert loaded.fingerprint == mapping.fingerprint and torch.equal(loaded(query), mapping(query))
    data = bytearray(open(path, "rb").read())
    at = bytes(data).index(mapping.slot_remainders.numpy().tobytes())
    data[at] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for table 't'"):
        load_mappings(path)
    # A row field beyond the rows, or slots that are not strips of 2^12: clear errors naming the table.
    bad = dict(mapping._buffers, slot_remainders=mapping.slot_remainders.clone())
    bad["slot_remainders"][0] = (bad["slot_remainders"][0] & ~4095) | 4001
    with pytest.raises(ValueError, match="table 't': stored rows exceed"):
        IdMapping(4000, storage="perfect_hash", tensors=bad, table_name="t")
    bad["slot_remainders"] = mapping.slot_remainders[:-1]
    with pytest.raises(ValueError, match=r"slot_remainders must be a positive multiple of 2\^12 slots"):
        IdMapping(4000, storage="perfect_hash", tensors=bad, table_name="t")


def test_remainders_of_structured_keys_build_and_find_only_their_keys():
    """Keys in arithmetic progressions (low bits all equal before mixing) and runs of consecutive ids; queries
    next to them are not found, including ids whose mixed value shares the stored keys' high bits."""
    for keys in (torch.arange(20_000) * (7919 << 20), torch.arange(20_000) + (1 << 62), torch.arange(20_000) << 44):
        rows = torch.arange(keys.numel()) % 1000
        tensors = perfect_hash.build(keys, rows, seed=0, num_rows=1000, slot_layout="remainders")
        group_hash = tensors["group_hash"].tolist()
        query = torch.cat([keys, keys + 1, keys - 1, keys + keys.numel()])
        found_rows, found = perfect_hash.lookup_remainders(query, tensors["slot_remainders"], 10,
                                                           tensors["group_pilots"], group_hash)
        assert torch.equal(found, torch.isin(query, keys)) and bool(found[:keys.numel()].all())
        assert torch.equal(found_rows[:keys.numel()], rows)
    # The mixed value of a stored key with other low bits: same high bits, another key; never found.
    mixed = perfect_hash._mixed(keys, group_hash)
    from lhf_torchrec.mapping.hashing import unmix64

    twins = unmix64(mixed ^ torch.randint(1, 1 << 10, mixed.shape)) - group_hash[1]
    assert not perfect_hash.lookup_remainders(twins, tensors["slot_remainders"], 10, tensors["group_pilots"],
                                              group_hash)[1].any()


def test_compiled_remainders_read_the_slots_apart_with_the_eager_rows(torch_ops_only):
    rng = np.random.default_rng(5)
    ids = np.unique(rng.integers(-(1 << 63), (1 << 63) - 1, 300_000, dtype=np.int64))  # 2.4 MB of slots
    mapping = IdMapping.from_entries(ids, rng.integers(0, 30_000, ids.size), 40_000, hash_offset=30_000, seed=1)
    assert "slot_remainders" in mapping._buffers
    query = torch.from_numpy(np.concatenate([ids[::7], ids[::7] + 1, rng.integers(-(1 << 63), 1 << 63, 3000)]))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(mapping, **COMPILE_SETTINGS)(query), mapping(query))


@pytest.mark.parametrize("layout,key_dtype", [("split", torch.int32), ("split", torch.int64), ("records", torch.int64),
                                              ("remainders", torch.int64)])
def test_the_row_range_read_by_chunks_is_the_range_of_every_slots_row(layout, key_dtype):
    # More slots than one chunk of the check (perfect_hash._CHUNK), rows of 3 bytes in the split layout.
    rng = np.random.default_rng(5)
    num_entries, num_rows = 300_000, 100_000
    keys = torch.from_numpy(rng.choice(1 << 30, num_entries, replace=False).astype(np.int64))
    rows = torch.from_numpy(rng.integers(3, num_rows - 7, num_entries))
    tensors = perfect_hash.build(keys, rows, seed=1, key_dtype=key_dtype, num_rows=num_rows, slot_layout=layout)
    assert max(t.numel() for t in tensors.values()) > perfect_hash._CHUNK
    every = (perfect_hash.slot_row_values(tensors) if layout == "split" else
             perfect_hash.record_values(tensors["slot_records"], num_rows)[1] if layout == "records" else
             perfect_hash.remainder_values(tensors["slot_remainders"], tensors["group_pilots"],
                                           tensors["group_hash"].tolist(), num_rows)[1])
    stored = every[every != -1]
    assert stored.numel() == num_entries
    assert perfect_hash.slot_row_range(tensors, num_rows) == (int(stored.min()), int(stored.max())) == (
        int(rows.min()), int(rows.max()))
