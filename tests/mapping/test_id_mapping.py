import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.mapping import IdMapping, fit_mapping, load_mappings, save_mappings
from lhf_torchrec.mapping.id_mapping import storage_cost

int64s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def _entries(ids, rows, num_rows=50, **kw):
    return IdMapping.from_entries(np.array(ids), np.array(rows), num_rows, hash_offset=10, hash_rows=num_rows - 10, **kw)


def test_entries_win_over_hash_and_the_rest_hashes_into_the_region():
    m = _entries([5, 9, 1 << 40], [0, 1, 2], table_name="C3")
    rows = m(torch.tensor([9, 5, 1 << 40, 77, -3, 10**15]))
    assert rows[:3].tolist() == [1, 0, 2]
    assert all(10 <= r < 50 for r in rows[3:].tolist())


@pytest.mark.parametrize("ids, storage", [([3, 4, 6, 8], "dense"), ([3, 1 << 20, 1 << 21], "sorted"), ([-5, 1 << 50], "sorted")])
def test_storage_is_the_cheaper_one_and_both_agree_with_a_reference(ids, storage):
    rows = list(range(len(ids)))
    m = _entries(ids, rows)
    assert m.storage == storage
    assert m.nbytes == storage_cost(len(ids), ids[-1] - ids[0] + 1, m.num_rows)[1]
    assert m.nbytes == sum(b.numel() * b.element_size() for b in m.buffers())
    query = torch.tensor(ids + [ids[0] - 1, ids[-1] + 1, 0, 2, 7])
    hashed = _entries([], [])  # same region and seed, no entries: the pure fallback
    expected = [dict(zip(ids, rows)).get(i, int(hashed(torch.tensor([i]))[0])) for i in query.tolist()]
    assert m(query).tolist() == expected


@pytest.mark.parametrize("num_rows, dtype", [(12, torch.int8), (128, torch.int8), (129, torch.int16),
                                             (1 << 15, torch.int16), ((1 << 15) + 1, torch.int32)])
@pytest.mark.parametrize("probes", [1, 2])
def test_a_dense_table_stores_its_rows_in_the_narrowest_integer_and_costs_that(num_rows, dtype, probes, tmp_path):
    """A small table's mapping is what its budget pays for: 125 ids into 10 rows take 125 bytes, not 500."""
    ids = np.arange(125) + 7
    rows = np.arange(125) % (num_rows // 2)  # rows up to num_rows / 2: the hash region above, -1 never a row
    m = IdMapping.from_entries(ids, rows, num_rows, hash_offset=num_rows // 2, probes=probes, table_name="t")
    assert m.storage == "dense" and m.table.dtype == dtype
    assert m.nbytes == storage_cost(125, 125, num_rows)[1] == dtype.itemsize * 125
    query = torch.tensor([*ids.tolist(), 0, 6, 132, 1 << 40, -1])
    sparse = m.with_storage("sorted")
    assert torch.equal(m(query), sparse(query))
    assert torch.equal(m.stored_entries()[1], sparse.stored_entries()[1])
    save_mappings(str(tmp_path / "m.safetensors"), {"t": m})
    loaded = load_mappings(str(tmp_path / "m.safetensors"))["t"]
    assert loaded.table.dtype == dtype and torch.equal(loaded(query), m(query))


def test_a_dense_table_of_another_dtype_is_refused():
    with pytest.raises(ValueError, match="table 't': a dense table's rows must be int8, int16 or int32, got torch.int64"):
        IdMapping(10, storage="dense", tensors={"table": torch.zeros(5, dtype=torch.int64)}, table_name="t")


@settings(max_examples=150, deadline=None)
@given(
    entry_ids=st.lists(int64s, min_size=0, max_size=30, unique=True),
    query=st.lists(int64s, min_size=1, max_size=60),
    num_rows=st.integers(2, 1000),
    probes=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_every_id_maps_into_range_deterministically(entry_ids, query, num_rows, probes, seed):
    rows = np.arange(len(entry_ids)) % num_rows
    m = IdMapping.from_entries(np.array(entry_ids, dtype=np.int64), rows, num_rows, probes=probes, seed=seed)
    q = torch.tensor(query, dtype=torch.int64)
    out = m(q)
    again = IdMapping.from_entries(np.array(entry_ids, dtype=np.int64), rows, num_rows, probes=probes, seed=seed)(q)
    assert torch.equal(out, again)
    first = out if probes == 1 else out[:, 0]
    assert int(first.min()) >= 0 and int(first.max()) < num_rows
    if probes == 2:
        second = out[:, 1]
        has_entry = torch.tensor([i in set(entry_ids) for i in query])
        assert torch.equal(second == -1, has_entry)
        assert bool(((second >= 0) & (second < num_rows) | has_entry).all())
        assert bool((second != first).all())  # two distinct rows per hashed id


def test_int32_ids_and_shapes():
    m = _entries([1, 2, 3], [0, 1, 2])
    ids = torch.tensor([[1, 2], [3, 99]], dtype=torch.int32)
    out = m(ids)
    assert out.shape == (2, 2) and out.dtype == torch.int64
    assert out[0].tolist() == [0, 1]


def test_double_hash_jagged_expands_hashed_ids_only():
    m = _entries([5], [0], probes=2, method="double_hash")
    values, lengths, weights = m.remap_jagged(
        torch.tensor([5, 6, 7]), torch.tensor([2, 0, 1]), torch.tensor([0.5, 2.0, 3.0])
    )
    assert lengths.tolist() == [3, 0, 2]
    assert values[0].item() == 0 and values.numel() == 5
    assert weights.tolist() == [0.5, 2.0, 2.0, 3.0, 3.0]


def test_save_load_round_trip(tmp_path, zipf_profile):
    maps = {
        "t_freq": fit_mapping(zipf_profile, method="frequency", num_rows=300, table="t_freq"),
        "t_hash": fit_mapping(None, method="hash", num_rows=77, seed=5, table="t_hash"),
    }
    path = tmp_path / "maps.safetensors"
    save_mappings(str(path), maps)
    loaded = load_mappings(str(path))
    assert set(loaded) == set(maps)
    q = torch.from_numpy(np.concatenate([zipf_profile.ids, np.array([-1, 0, 1 << 62])]))
    for name, m in maps.items():
        assert torch.equal(m(q), loaded[name](q))
        assert loaded[name].metadata() == m.metadata()
    single = tmp_path / "one.safetensors"
    maps["t_freq"].save(str(single))
    assert IdMapping.load(str(single)).fingerprint == maps["t_freq"].fingerprint
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_corrupted_and_foreign_files_raise_naming_the_file(tmp_path, zipf_profile):
    path = tmp_path / "maps.safetensors"
    fit_mapping(zipf_profile, method="frequency", num_rows=300, table="t").save(str(path))
    data = bytearray(path.read_bytes())
    data[-4] ^= 1  # the low bit of the last stored row
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.safetensors.*checksum mismatch.*'t'"):
        load_mappings(str(bad))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated.safetensors.*not a readable"):
        load_mappings(str(truncated))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not an lhf_torchrec mapping"):
        load_mappings(str(foreign))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_mappings(str(tmp_path / "missing.safetensors"))


def test_state_dict_with_another_mapping_is_rejected():
    m = _entries([5, 9], [0, 1], num_rows=50, table_name="C1")
    other = IdMapping.from_entries(np.array([5, 9]), np.array([0, 1]), 60, hash_offset=10, hash_rows=50)
    m.load_state_dict(_entries([5, 9], [0, 1], num_rows=50).state_dict())
    with pytest.raises(ValueError, match="table 'C1'.*not this module's mapping"):
        m.load_state_dict(other.state_dict())


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_num_rows_must_be_positive_integer(bad):
    with pytest.raises(ValueError, match=f"table 'C2': num_rows must be an integer >= 1, got {bad}"):
        IdMapping(bad, table_name="C2")


def test_float_ids_are_rejected():
    m = _entries([1], [0], table_name="C9")
    with pytest.raises(TypeError, match="table 'C9'.*torch.float32"):
        m(torch.tensor([1.0]))


def test_entry_rows_must_fit():
    with pytest.raises(ValueError, match="table 'C4': entry row 50 is outside"):
        IdMapping.from_entries(np.array([1]), np.array([50]), 50, table_name="C4")


@pytest.mark.parametrize("entries", [[(1 << 63) - 3, (1 << 63) - 1], [-(1 << 63), -(1 << 63) + 5], [-(1 << 63), (1 << 63) - 1]])
def test_extreme_ids_never_wrap_into_the_stored_range(entries):
    m = IdMapping.from_entries(np.array(entries), np.array([0, 1]), 50, hash_offset=2, hash_rows=48)
    probes = torch.tensor([-(1 << 63), -(1 << 63) + 1, -1, 0, 1, (1 << 63) - 2, (1 << 63) - 1])
    rows = m(probes).tolist()
    for i, r in zip(probes.tolist(), rows):
        assert r == entries.index(i) if i in entries else 2 <= r < 50
