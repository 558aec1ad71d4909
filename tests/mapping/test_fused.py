"""FusedIdMappings: the mappings of many tables applied together give each mapping's own rows."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load

from lhf_torchrec.mapping import IdMapping, load_mappings, save_mappings
from lhf_torchrec.mapping import fused as fused_module
from lhf_torchrec.mapping.fused import RUNTIME_DENSE_IDS, FusedIdMappings, fusable, runtime_bytes

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
EXTREMES = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) + 5, INT64_MAX - 1, INT64_MAX]
# Row counts with 2-, 3- and 4-byte perfect hash rows.
NUM_ROWS = [3, 40, 1 << 16, (1 << 23) + 9]


@st.composite
def table_mapping(draw, name: str) -> IdMapping:
    """A mapping of one of every storage: dense, perfect hash (int32 or int64 keys), sorted (small or
    wide span), none; some with double hashing."""
    storage = draw(st.sampled_from(["dense", "perfect_hash", "sorted", "sorted_wide", "none", "double"]))
    num_rows = draw(st.sampled_from(NUM_ROWS))
    hash_offset = draw(st.integers(0, num_rows - 2))
    seed = draw(st.sampled_from([0, 0, 7]))  # mostly one seed for all tables, sometimes another
    if storage == "none":
        return IdMapping(num_rows, hash_offset=hash_offset, seed=seed, table_name=name)
    wide = storage in ("sorted_wide", "double") or (storage == "perfect_hash" and draw(st.booleans()))
    base = draw(st.sampled_from([0, -300, 1 << 40, INT64_MAX - 5000, INT64_MIN]))
    spread = (1 << 45) if wide else 300
    offsets = draw(st.lists(st.integers(0, spread), min_size=1, max_size=40, unique=True))
    ids = np.array([max(INT64_MIN, min(INT64_MAX, base + o)) for o in offsets], dtype=np.int64)
    ids = np.unique(ids)
    rows = np.array(draw(st.lists(st.integers(0, num_rows - 1), min_size=ids.size, max_size=ids.size)))
    mapping = IdMapping.from_entries(ids, rows, num_rows, hash_offset=hash_offset, seed=seed, table_name=name,
                                     probes=2 if storage == "double" else 1)
    kind = {"sorted_wide": "sorted", "double": mapping.storage}.get(storage, storage)
    return mapping.with_storage(kind)


@st.composite
def tables_and_queries(draw):
    names = [f"t{i}" for i in range(draw(st.integers(1, 6)))]
    mappings = {n: draw(table_mapping(n)) for n in names}
    queries, tables = [], []
    for _ in range(draw(st.integers(0, 8))):
        table = draw(st.sampled_from(names))  # a table may take several features, or none
        m = mappings[table]
        known = m.stored_entries()[0].tolist()
        near = [k + d for k in known[:5] for d in (-1, 1) if INT64_MIN <= k + d <= INT64_MAX]
        ids = draw(st.lists(st.one_of(st.sampled_from(known or [0]), st.sampled_from(EXTREMES),
                                      st.sampled_from(near or [2]), st.integers(INT64_MIN, INT64_MAX)), max_size=30))
        queries.append(torch.tensor(ids, dtype=torch.int64))
        tables.append(table)
    return mappings, queries, tables


@settings(max_examples=60, deadline=None)
@given(tables_and_queries())
def test_fused_rows_equal_every_mappings_own_rows(case):
    mappings, queries, tables = case
    fused = FusedIdMappings(mappings)
    fingerprints = {n: m.fingerprint for n, m in mappings.items()}
    picked = [i for i, t in enumerate(tables) if t in fused.code]
    rows = fused([queries[i] for i in picked], [tables[i] for i in picked])
    for i, got in zip(picked, rows):
        assert got.dtype == torch.int64
        assert torch.equal(got, mappings[tables[i]](queries[i])), f"table {tables[i]} ({mappings[tables[i]].storage})"
    # Features of equal size: the (features, ids) matrix path (broadcast parameter columns, the dense
    # pass's span check), each query cycled to 12 ids.
    square = [queries[i].repeat(12)[:12] if queries[i].numel() else torch.zeros(12, dtype=torch.int64) for i in picked]
    for i, q, got in zip(picked, square, fused(square, [tables[i] for i in picked])):
        assert torch.equal(got, mappings[tables[i]](q)), f"table {tables[i]} ({mappings[tables[i]].storage}), equal sizes"
    # Packing shares the mappings' memory, it does not change them.
    assert {n: m.fingerprint for n, m in mappings.items()} == fingerprints
    assert set(fused.code) == {n for n, m in mappings.items() if fusable(m)}


def test_small_chunks_give_the_same_rows(monkeypatch):
    rng = np.random.default_rng(0)
    mappings = {f"t{i}": IdMapping.from_entries(rng.choice(1 << 20, 500, replace=False), rng.integers(0, 50, 500), 100,
                                                hash_offset=50, seed=i, table_name=f"t{i}") for i in range(3)}
    queries = [torch.from_numpy(rng.integers(0, 1 << 20, 3000)) for _ in mappings]
    expected = [m(q) for m, q in zip(mappings.values(), queries)]
    monkeypatch.setattr(fused_module, "CHUNK", 128)
    got = FusedIdMappings(mappings)(queries, list(mappings))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("width", [None, 700])
def test_every_perfect_hash_layout_and_dense_span_together(width):
    """Perfect hash tables of 2-, 3- and 4-byte rows with int32 and int64 keys (one pass per layout; int64
    keys of 40 and 300 rows in remainders of 6 and 9 low bits, one pass) next to dense tables whose ids all
    lie in their span (one min/max check) or not (clamped), with features of equal size (a (features, ids)
    matrix) and not."""
    rng = np.random.default_rng(3)
    mappings = {}
    # Keys span 2^20 (int32 keys) or 2^62 (int64 keys: too wide to pack with the rows into one record).
    cases = [(n, s, 400) for n in (40, 1 << 16, (1 << 23) + 9) for s in (1, 1 << 42)] + [(300, 1 << 42, 2000)]
    for i, (num_rows, stride, entries) in enumerate(cases):
        if num_rows == 40 and stride > 1:
            entries = 2000  # enough entries for remainders (MIN_REMAINDER_ENTRIES)
        ids = (1 << 40) + stride * rng.choice(1 << 20, entries, replace=False)
        mappings[f"p{i}"] = IdMapping.from_entries(ids, rng.integers(0, num_rows // 2, entries), num_rows,
                                                   hash_offset=num_rows // 2, seed=i % 2, table_name=f"p{i}"
                                                   ).with_storage("perfect_hash")
    remainders = [t for t, m in mappings.items() if "slot_remainders" in m._buffers]
    assert remainders == ["p1", "p6"]
    # Dense tables of 40, 1000 and 40,000 rows store int8, int16 and int32 rows: one dense pass each.
    for i, (num_rows, dtype) in enumerate([(40, torch.int8), (1000, torch.int16), (40_000, torch.int32)]):
        mappings[f"d{i}"] = IdMapping.from_entries(np.arange(100) + 50 * i, rng.integers(0, 20, 100), num_rows,
                                                   hash_offset=20, table_name=f"d{i}")
        assert mappings[f"d{i}"].storage == "dense" and mappings[f"d{i}"].table.dtype == dtype
    fused = FusedIdMappings(mappings)
    assert len(fused._hash_tables) == 6 and len(fused._dense) == 3 and set(fused.code) == set(mappings)
    assert len({fused._pass[t] for t in remainders}) == 1
    names, queries = [], []
    for i, (t, m) in enumerate(mappings.items()):
        size = width or int(rng.integers(1, 900))
        if t.startswith("d"):  # d0: every id in its span; d1, d2: some not
            q = rng.integers(50 * int(t[1]), 50 * int(t[1]) + 100 + 30 * int(t[1]), size)
        else:
            known = m.stored_entries()[0].numpy()
            q = np.where(rng.random(size) < 0.7, rng.choice(known, size), known.min() + rng.integers(0, 1 << 34, size))
        names.append(t)
        queries.append(torch.from_numpy(q.astype(np.int64)))
    for picked in (names, names[-3:-1], remainders):  # all; d0 and d1 alone (in span, then one not); remainders
        got = fused([queries[names.index(t)] for t in picked], picked)
        for t, rows in zip(picked, got):
            assert torch.equal(rows, mappings[t](queries[names.index(t)])), t


def test_which_mappings_fuse_and_what_they_add():
    ids = np.arange(10) * 7
    small_sorted = IdMapping.from_entries(ids, ids % 5, 20, hash_offset=5, table_name="s").with_storage("sorted")
    wide_sorted = IdMapping.from_entries(ids * (1 << 30), ids % 5, 20, hash_offset=5, table_name="w")
    double = IdMapping.from_entries(ids, ids % 5, 20, hash_offset=5, probes=2, table_name="d")
    bucketed = IdMapping(8, num_buckets=2, tensors={"bucket_hash_regions": torch.tensor([[1, 3], [0, 4]])},
                         table_name="b")
    dense = IdMapping.from_entries(np.arange(10), ids % 5, 20, hash_offset=5, table_name="x")
    assert dense.storage == "dense"
    assert wide_sorted.storage == "sorted" and int(wide_sorted.keys[-1]) > RUNTIME_DENSE_IDS
    assert [fusable(m) for m in (small_sorted, wide_sorted, double, bucketed, dense)] == [True, False, False, False, True]
    records = wide_sorted.with_storage("perfect_hash")  # 36-bit keys: perfect hash records, on their own
    assert "slot_records" in records._buffers and not fusable(records) and runtime_bytes(records) == 0
    # The dense copy of a small sorted table (ids [0, 1024) here, 4 bytes an id) and the per-table parameters.
    assert runtime_bytes(small_sorted) == 4 * RUNTIME_DENSE_IDS + 8 * 9
    shifted = IdMapping.from_entries(ids + 5000, ids % 5, 20, hash_offset=5, table_name="s").with_storage("sorted")
    assert runtime_bytes(shifted) == 4 * 64 + 8 * 9  # elsewhere: the span of its entries
    assert runtime_bytes(dense) == 8 * 9
    assert runtime_bytes(wide_sorted) == runtime_bytes(double) == 0


def test_packed_arrays_are_the_mappings_memory_and_files_do_not_change(tmp_path):
    rng = np.random.default_rng(1)
    mappings = {
        # 62-bit keys: split slots (40-bit keys would pack into records, which run on their own mapping)
        "p": IdMapping.from_entries(rng.choice(1 << 40, 300, replace=False) << 22, rng.integers(0, 900, 300), 1000,
                                    hash_offset=900, table_name="p"),
        "q": IdMapping.from_entries(rng.choice(1 << 40, 200, replace=False) << 22, rng.integers(0, 500, 200), 600,
                                    hash_offset=500, table_name="q"),
        "d": IdMapping.from_entries(np.arange(50), rng.integers(0, 10, 50), 20, hash_offset=10, table_name="d"),
        # int32 keys with 3- and 4-byte rows: packed as int64 records whose words and bytes are their buffers
        "r": IdMapping.from_entries(rng.choice(1 << 30, 300, replace=False), rng.integers(0, 1 << 16, 300), 1 << 17,
                                    hash_offset=1 << 16, table_name="r").with_storage("perfect_hash"),
        "s": IdMapping.from_entries(rng.choice(1 << 30, 300, replace=False), rng.integers(0, 1 << 24, 300),
                                    (1 << 24) + 9, hash_offset=1 << 24, table_name="s").with_storage("perfect_hash"),
    }
    assert {m.storage for m in mappings.values()} == {"perfect_hash", "dense"}
    assert [mappings[t].slot_rows_high.dtype for t in "rs"] == [torch.int8, torch.int16]
    before = tmp_path / "before.safetensors"
    save_mappings(str(before), mappings)
    nbytes = sum(m.nbytes for m in mappings.values())
    fused = FusedIdMappings(mappings)
    slot_keys = fused._hash_tables[0][0]["slot_keys"]
    assert mappings["p"].slot_keys.untyped_storage().data_ptr() == slot_keys.untyped_storage().data_ptr()
    assert mappings["d"].table.untyped_storage().data_ptr() == fused._dense[0][0].untyped_storage().data_ptr()
    packed = sum(table.nbytes for table, _ in fused._dense) + sum(
        tensors["records"].nbytes + tensors["group_pilots"].nbytes if "records" in tensors else
        sum(t.nbytes for t in tensors.values()) for tensors, _ in fused._hash_tables)
    records = [tensors["records"] for tensors, _ in fused._hash_tables if "records" in tensors]
    assert len(records) == 2
    for t, r in zip("rs", records):
        assert all(b.untyped_storage().data_ptr() == r.untyped_storage().data_ptr()
                   for b in (mappings[t].slot_keys, mappings[t].slot_rows, mappings[t].slot_rows_high))
    # Records with 3-byte rows leave a byte of each slot unused: what the fused remap adds to the mapping.
    unused = mappings["r"].slot_keys.numel()
    assert runtime_bytes(mappings["r"]) - runtime_bytes(mappings["s"]) == unused
    assert packed + sum(m.group_hash.nbytes for m in mappings.values() if m.storage == "perfect_hash") == nbytes + unused
    after = tmp_path / "after.safetensors"
    save_mappings(str(after), mappings)
    # (safetensors writes its header keys in any order: compare what the files hold, not their bytes)
    assert safetensors_load(after.read_bytes()).keys() == safetensors_load(before.read_bytes()).keys()
    assert all(torch.equal(a, safetensors_load(before.read_bytes())[k])
               for k, a in safetensors_load(after.read_bytes()).items())
    loaded = load_mappings(str(after))
    assert {n: m.fingerprint for n, m in loaded.items()} == {n: m.fingerprint for n, m in mappings.items()}
    # A state_dict round trip writes through the views: the packed arrays stay the mappings' values.
    state = {n: copy.deepcopy(m.state_dict()) for n, m in mappings.items()}
    for n, m in mappings.items():
        m.load_state_dict(state[n])
    assert fused.is_current(mappings)
    ids = torch.from_numpy(rng.integers(0, 1 << 40, 1000))
    assert torch.equal(fused([ids], ["p"])[0], loaded["p"](ids))
    for t in "rs":
        ids = torch.cat([mappings[t].stored_entries()[0], torch.from_numpy(rng.integers(0, 1 << 30, 500))])
        assert torch.equal(fused([ids], [t])[0], loaded[t](ids))
        assert torch.equal(mappings[t](ids), loaded[t](ids))  # the mapping's own lookup reads the strided views


def test_a_move_or_another_mapping_makes_it_stale():
    ids = np.arange(40)
    mappings = {"a": IdMapping.from_entries(ids, ids % 7, 10, hash_offset=7, table_name="a")}
    fused = FusedIdMappings(mappings)
    assert fused.is_current(mappings)
    assert not fused.is_current({"a": copy.deepcopy(mappings["a"])})
    assert not fused.is_current({**mappings, "b": IdMapping(5, table_name="b")})
    mappings["a"].to(torch.float64)  # no-op for integer buffers: still the views
    assert fused.is_current(mappings)
    mappings["a"]._apply(lambda t: t.clone())  # what a move to another device does to the buffers
    assert not fused.is_current(mappings)


def test_no_ids_and_empty_features():
    mappings = {"a": IdMapping.from_entries(np.arange(5), np.arange(5), 10, hash_offset=5, table_name="a"),
                "h": IdMapping(4, table_name="h")}
    fused = FusedIdMappings(mappings)
    assert fused([], []) == []
    empty = torch.zeros(0, dtype=torch.int64)
    rows = fused([empty, empty, torch.tensor([3, 99], dtype=torch.int32)], ["a", "h", "a"])
    assert [r.numel() for r in rows] == [0, 0, 2] and int(rows[2][0]) == 3
    assert torch.equal(rows[2], mappings["a"](torch.tensor([3, 99])))


@pytest.mark.parametrize("ids", [[INT64_MAX], [INT64_MAX - 3, INT64_MAX], [INT64_MIN, INT64_MIN + 4], [-7, 2]])
def test_small_sorted_tables_at_the_ends_of_the_id_space(ids):
    mapping = IdMapping.from_entries(np.array(ids), np.arange(len(ids)), 5, hash_offset=2, table_name="e")
    mapping = mapping.with_storage("sorted")
    queries = torch.tensor(EXTREMES + [i + d for i in ids for d in (-1, 0, 1) if INT64_MIN <= i + d <= INT64_MAX])
    assert torch.equal(FusedIdMappings({"e": mapping})([queries], ["e"])[0], mapping(queries))


@pytest.mark.parametrize("seeds", [(0, 0), (3, 11)])
def test_hash_only_tables_in_one_pass(seeds):
    mappings = {f"h{i}": IdMapping(50 + 1000 * i, hash_offset=i, seed=s, table_name=f"h{i}") for i, s in enumerate(seeds)}
    ids = [torch.arange(-100, 100), torch.tensor(EXTREMES)]
    got = FusedIdMappings(mappings)(ids, list(mappings))
    assert all(torch.equal(g, m(x)) for g, m, x in zip(got, mappings.values(), ids))
