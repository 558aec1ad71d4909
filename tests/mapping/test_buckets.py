"""Bucketed mappings: the bucket function, every id inside its bucket's rows, bytes, files, small tables."""

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig

from lhf_torchrec.mapping import (
    IdEmbeddings,
    IdMapping,
    IdProfile,
    fit_mapping,
    load_mappings,
    plan_budget,
    save_mappings,
)
from lhf_torchrec.mapping.buckets import (TooFewRowsForBuckets, bucket_profiles, cosharded_bytes, cosharded_slots,
                                          fit_bucketed)
from lhf_torchrec.mapping.hashing import (bucket_hash, bucket_hashes, bucket_key, bucket_of, hash_ids, input_hash_size,
                                          mix64)
from lhf_torchrec.mapping.methods import METHODS
from lhf_torchrec.pipeline.steps import fit_mappings

int64s = st.integers(-(1 << 63), (1 << 63) - 1)
EXTREMES = [-(1 << 63), (1 << 63) - 1, 0, -1, 1, -7, 1 << 40]
M64 = 1 << 64


def _mix64_reference(value: int) -> int:
    z = value % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return z ^ (z >> 31)


def _bucket_reference(value: int, num_buckets: int, seed: int):
    """(h, bucket) in pure Python: h = mix64(id ^ key) & (2^63 - 1) mod IHS, bucket = h // (IHS / B)."""
    ihs = num_buckets * ((1 << 62) // num_buckets)
    h = (_mix64_reference((value % M64) ^ (bucket_key(seed) % M64)) & ((1 << 63) - 1)) % ihs
    return h, h // (ihs // num_buckets)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(int64s, min_size=0, max_size=40), num_buckets=st.integers(1, 5000), seed=st.integers(0, 2**64 - 1))
def test_bucket_function_equals_the_pure_python_reference(ids, num_buckets, seed):
    values = ids + EXTREMES
    tensor = torch.tensor(values, dtype=torch.int64)
    expected = [_bucket_reference(v, num_buckets, seed) for v in values]
    assert bucket_hash(tensor, num_buckets, seed).tolist() == [h for h, _ in expected]
    assert bucket_of(tensor, num_buckets, seed).tolist() == [b for _, b in expected]
    assert input_hash_size(num_buckets) % num_buckets == 0 and input_hash_size(num_buckets) <= 1 << 62


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(int64s, min_size=0, max_size=40), num_buckets=st.integers(1, 5000), seed=st.integers(0, 2**64 - 1),
       chunk=st.integers(1, 8))
def test_bucket_hashes_of_an_array_are_the_hashes_chunk_by_chunk(ids, num_buckets, seed, chunk):
    values = np.array(ids + EXTREMES, dtype=np.int64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lhf_torchrec.mapping.hashing.HASH_CHUNK", chunk)
        hashed = bucket_hashes(values, num_buckets, seed)
    assert hashed.dtype == np.int64 and hashed.tolist() == [_bucket_reference(int(v), num_buckets, seed)[0] for v in values]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(int64s, min_size=0, max_size=60, unique=True), data=st.data(), num_buckets=st.integers(1, 9),
       seed=st.integers(0, 2**32))
def test_bucket_profiles_split_a_profile_by_bucket_keeping_id_order(ids, data, num_buckets, seed):
    ids = sorted(ids)
    counts = data.draw(st.lists(st.integers(1, 1000), min_size=len(ids), max_size=len(ids)))
    profile = IdProfile(np.array(ids, np.int64), np.array(counts, np.int64), sum(counts))
    buckets = bucket_profiles(profile, num_buckets, seed)
    assert len(buckets) == num_buckets
    for b, part in enumerate(buckets):
        want = [(i, c) for i, c in zip(ids, counts) if _bucket_reference(i, num_buckets, seed)[1] == b]
        assert list(zip(part.ids.tolist(), part.counts.tolist())) == want and part.total == sum(c for _, c in want)


def test_mix64_is_splitmix64_and_a_bijection_on_a_sample():
    values = torch.tensor(EXTREMES + list(range(-1000, 1000)), dtype=torch.int64)
    mixed = mix64(values)
    assert [v % M64 for v in mixed.tolist()] == [_mix64_reference(v) for v in values.tolist()]
    assert mixed.unique().numel() == values.unique().numel()


def test_buckets_depend_on_the_seed_and_are_balanced():
    ids = torch.arange(100_000, dtype=torch.int64)
    counts = torch.bincount(bucket_of(ids, 64, seed=0), minlength=64)
    assert counts.min() > 0.9 * 100_000 / 64 and counts.max() < 1.1 * 100_000 / 64
    assert not torch.equal(bucket_of(ids, 64, seed=0), bucket_of(ids, 64, seed=1))


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(int64s, min_size=1, max_size=50), rows=st.lists(st.integers(1, 1000), min_size=1, max_size=50),
       seed=st.integers(0, 2**32))
def test_hash_ids_with_a_range_per_id_equals_the_scalar_hash(ids, rows, seed):
    n = min(len(ids), len(rows))
    tensor, ranges = torch.tensor(ids[:n]), torch.tensor(rows[:n])
    per_id = hash_ids(tensor, ranges, seed)
    assert per_id.tolist() == [int(hash_ids(tensor[i:i + 1], rows[i], seed)) for i in range(n)]


# ---------------------------------------------------------------------------------------- fitting
@pytest.fixture(scope="module")
def data():
    """A Zipf-like profile over ids spread across 64 bits, with embeddings for every id."""
    rng = np.random.default_rng(5)
    ids = np.unique(rng.integers(-(1 << 62), 1 << 62, 3000))
    counts = np.maximum(1, (20_000 / np.arange(1, ids.size + 1) ** 1.1).astype(np.int64))
    rng.shuffle(counts)
    profile = IdProfile(ids, counts, int(counts.sum()))
    embeddings = IdEmbeddings(ids, torch.randn(ids.size, 4, generator=torch.Generator().manual_seed(0)))
    return profile, embeddings


FITTED = {}


def _fitted(data, method: str, num_buckets: int, seed: int) -> IdMapping:
    key = (method, num_buckets, seed)
    if key not in FITTED:
        profile, embeddings = data
        FITTED[key] = fit_mapping(profile, method=method, num_rows=num_buckets * 12, embeddings=embeddings,
                                  seed=seed, table="t", num_buckets=num_buckets)
    return FITTED[key]


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=25, deadline=None)
@given(ids=st.lists(int64s, min_size=1, max_size=60), pick=st.lists(st.integers(0, 2999), max_size=60),
       num_buckets=st.sampled_from([1, 3, 8]), seed=st.integers(0, 2))
def test_every_id_lands_in_its_buckets_rows(data, method, ids, pick, num_buckets, seed):
    profile, _ = data
    mapping = _fitted(data, method, num_buckets, seed)
    query = torch.tensor(ids + profile.ids[pick].tolist() + EXTREMES, dtype=torch.int64)
    rows = mapping(query)
    bucket = bucket_of(query, num_buckets, seed)
    per_bucket = mapping.rows_per_bucket
    first = bucket * per_bucket
    probes = rows.view(query.numel(), -1)  # double hashing: both probes must stay in the bucket
    valid = probes >= 0  # the second probe of an id with an entry is -1
    assert bool(valid[:, 0].all())
    assert bool(((probes >= first[:, None]) & (probes < first[:, None] + per_bucket) | ~valid).all())


@pytest.mark.parametrize("method", ["frequency", "combination"])
def test_inside_a_bucket_the_method_is_unchanged(data, method):
    """Each bucket's entries are what the method fits on the bucket's own ids with M / B rows, and
    its other ids go to the same hash region. (They are hashed by bucket hash, not by raw id as the
    unbucketed fit hashes them, so their rows inside the region differ.)"""
    profile, embeddings = data
    mapping = _fitted(data, method, 8, 0)
    assert mapping.num_entries > 0 and mapping.layout["hot"] > 0
    buckets = bucket_of(torch.from_numpy(profile.ids), 8, 0).numpy()
    for b in (0, 5):
        mine = buckets == b
        sub = IdProfile(profile.ids[mine], profile.counts[mine], int(profile.counts[mine].sum()))
        alone = fit_mapping(sub, method=method, num_rows=12, embeddings=embeddings, seed=0, table="t")
        probe = torch.from_numpy(sub.ids)
        entry = alone.has_entry(probe)
        assert torch.equal(mapping.has_entry(probe), entry) and bool(entry.any()) and not bool(entry.all())
        rows = mapping(probe) - b * 12
        assert torch.equal(rows[entry], alone(probe)[entry])
        offset, hash_rows = mapping.bucket_hash_regions[b].tolist()
        assert (offset, hash_rows) == (alone.hash_offset, alone.hash_rows)
        assert bool(((rows[~entry] >= offset) & (rows[~entry] < offset + hash_rows)).all())


def _unmix64(z: int) -> int:
    """The inverse of splitmix64's finalizer (pure Python, 64-bit words)."""
    def unxorshift(y: int, bits: int) -> int:
        x = y
        for _ in range(64 // bits):
            x = y ^ (x >> bits)
        return x
    z = unxorshift(z % M64, 31)
    z = unxorshift(z * pow(0x94D049BB133111EB, -1, M64) % M64, 27)
    return unxorshift(z * pow(0xBF58476D1CE4E5B9, -1, M64) % M64, 30)


def _signed(value: int) -> int:
    return value - M64 if value >= 1 << 63 else value


def _same_bucket_hash(value: int, seed: int, flip: int) -> int:
    """Another int64 id with the bucket hash of ``value`` for B = 8 (IHS = 2^62: h keeps the low 62
    bits of mix64(id ^ key)): flip bit 62 and/or 63 of the mixed word (``flip`` in 1..3) and invert."""
    key = bucket_key(seed) % M64
    mixed = _mix64_reference((value % M64) ^ key) ^ (flip << 62)
    return _signed(_unmix64(mixed) ^ key)


def test_unmix64_inverts_mix64():
    for v in EXTREMES:
        assert _signed(_unmix64(_mix64_reference(v))) == v


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bucketed_mapping_is_a_function_of_the_bucket_hash(data, method):
    """Ids with the same bucket hash h get the same rows: the co-sharded module only ever sees h."""
    profile, _ = data
    mapping = _fitted(data, method, 8, 0)
    originals = profile.ids[:60].tolist() + EXTREMES
    for flip in (1, 2, 3):
        twins = [_same_bucket_hash(v, 0, flip) for v in originals]
        query, twin_query = torch.tensor(originals), torch.tensor(twins)
        assert torch.equal(bucket_hash(query, 8, 0), bucket_hash(twin_query, 8, 0)) and twins != originals
        assert torch.equal(mapping(query), mapping(twin_query))
        assert torch.equal(mapping.has_entry(query), mapping.has_entry(twin_query))
    assert bool(mapping.has_entry(torch.tensor(originals)).any()) or method in ("hash", "double_hash")


def test_entries_for_two_ids_of_one_bucket_hash_are_refused_and_fitting_keeps_the_more_accessed():
    a = 12345
    b = _same_bucket_hash(a, 0, 2)
    regions = torch.tensor([[1, 3]] * 8, dtype=torch.int32)
    row = int(bucket_of(torch.tensor([a]), 8, 0)) * 4
    with pytest.raises(ValueError, match=f"table .tb.: ids {a} and {b} have the same bucket hash"):
        IdMapping.from_entries(np.array([a, b]), np.array([row, row]), 32, hash_rows=32, num_buckets=8,
                               bucket_hash_regions=regions, table_name="tb")
    # Fitting: b is accessed more, so b owns the hot row and a (same h) takes it too.
    others = np.arange(1000, 1040, dtype=np.int64)
    ids = np.concatenate([[a, b], others])
    counts = np.concatenate([[5, 50], np.ones(others.size, np.int64)])
    order = np.argsort(ids)
    profile = IdProfile(ids[order], counts[order], int(counts.sum()))
    mapping = fit_mapping(profile, method="frequency", num_rows=32, table="tb", num_buckets=8, hot_fraction=0.25)
    assert mapping.num_entries == 8  # one hot row per bucket; a and b count as one id
    keys, _ = mapping.stored_entries()
    assert keys.dtype == torch.int64 and bool((keys[1:] > keys[:-1]).all())
    both = torch.tensor([a, b])
    assert bool(mapping.has_entry(both).all()) and mapping(both)[0] == mapping(both)[1]


GOLDEN = {  # fingerprints of unbucketed mappings before buckets existed: unchanged, bit for bit
    "hash": ("8bcee390096a526912e014b4e7b771bf22f2e44a1f5d0ab51ec1d24a13246c44", 375),
    "frequency": ("23abed19903610258cb4dc685966be6ac4f755ac7ec302c79651aa1862f41a0e", 300),
    "double_hash": ("c37dd514cf27c6f9cd445e0da903935a2209c6301cf534be2dd3fa3620d53eda", 300),
}
# The storage rule takes the cheapest storage: for these tables (under 2^15 rows) a perfect hash
# table of int32 keys and 2-byte rows, ~7 bytes per entry against sorted keys' 8 (154 entries: 1,076
# bytes instead of 1,232), so the same 6,000-byte budget keeps 307 rows (154 entries) instead of 300.
# Stored as before (sorted), the same number of rows still gives the golden function bit for bit.
AT_BUDGET = {
    "hash": ("8bcee390096a526912e014b4e7b771bf22f2e44a1f5d0ab51ec1d24a13246c44", 375),
    "frequency": ("f259a18bc2093f6d8ad8be95596177e437c358e43f0067d6c73dc3cfd84321c1", 307),
    "double_hash": ("62f731bfd3891a541b72a20ec18ea0d3fac89c3ed5eaaa1726e52c7c373107cf", 307),
}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_without_buckets_mappings_are_unchanged(method):
    ids = np.arange(1, 401, dtype=np.int64) * 7919 - 1_000_000
    counts = (4000 // np.arange(1, 401)).astype(np.int64)
    profile = IdProfile(ids, counts, int(counts.sum()))
    golden, rows = GOLDEN[method]
    same_rows = fit_mapping(profile, method=method, num_rows=rows, table="t")
    kept = same_rows if same_rows.storage == "none" else same_rows.with_storage("sorted")
    assert kept.fingerprint == golden
    mapping = fit_mapping(profile, method=method, total_bytes=6000, embedding_dim=4, table="t")
    assert (mapping.fingerprint, mapping.num_rows) == AT_BUDGET[method]
    assert mapping.num_buckets is None and "num_buckets" not in mapping.metadata()


# ------------------------------------------------------------------------------------ budget, bytes
@pytest.mark.parametrize("method", ["frequency", "combination", "hash"])
def test_budget_rounds_rows_down_to_whole_buckets_and_counts_every_byte(data, method):
    profile, embeddings = data
    budget = 40_000
    plan = plan_budget(profile, embedding_dim=4, total_bytes=budget, method=method, num_buckets=16, seed=3)
    unbucketed = plan_budget(profile, embedding_dim=4, total_bytes=budget, method=method)
    assert plan.num_rows % 16 == 0 and plan.total_bytes <= budget
    assert unbucketed.num_rows - 16 * 5 <= plan.num_rows <= unbucketed.num_rows
    mapping = fit_mapping(profile, method=method, total_bytes=budget, embedding_dim=4, embeddings=embeddings,
                          seed=3, table="t", num_buckets=16)
    assert mapping.num_rows == plan.num_rows and mapping.num_buckets == 16
    assert mapping.nbytes == plan.mapping_bytes  # the regions (8 bytes per bucket) are counted too
    assert mapping.bucket_hash_regions.numel() * 4 == 16 * 8


# ------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_keeps_the_buckets(data, tmp_path):
    mapping = _fitted(data, "combination", 8, 1)
    path = str(tmp_path / "m.safetensors")
    save_mappings(path, {"t": mapping})
    loaded = load_mappings(path)["t"]
    assert loaded.num_buckets == 8 and loaded.fingerprint == mapping.fingerprint
    query = torch.cat([torch.from_numpy(data[0].ids), torch.tensor(EXTREMES)])
    assert torch.equal(loaded(query), mapping(query))


def test_a_checkpoint_of_other_buckets_is_refused(data):
    """Same buffers, other bucket function (seed): loading the state must fail, never remap silently."""
    mine, other = _fitted(data, "hash", 8, 0), _fitted(data, "hash", 8, 1)
    assert mine.bucket_hash_regions.shape == other.bucket_hash_regions.shape
    with pytest.raises(ValueError, match="table 't': the mapping in the checkpoint"):
        mine.load_state_dict(other.state_dict())


def test_bucket_count_is_part_of_the_fingerprint(data):
    one = _fitted(data, "hash", 1, 0)
    plain = fit_mapping(None, method="hash", num_rows=12, table="t")
    assert one.num_buckets == 1 and plain.num_buckets is None and one.fingerprint != plain.fingerprint


def test_an_entry_outside_its_bucket_is_refused():
    ids = torch.arange(20)
    buckets = bucket_of(ids, 4, 0)
    wrong = ((buckets + 1) % 4 * 5).numpy()
    with pytest.raises(ValueError, match="table 'tb': entry row .* outside its bucket"):
        IdMapping.from_entries(ids.numpy(), wrong, 20, hash_rows=20, seed=0, num_buckets=4, table_name="tb",
                               bucket_hash_regions=torch.tensor([[1, 4]] * 4))


# ------------------------------------------------------------------------------------ small tables
def test_too_few_rows_name_the_table_and_what_works(data):
    profile, _ = data
    too_few = r"table 'small': 10 rows cannot hold 8 buckets.*at most 5 buckets.*at least 16 rows"
    with pytest.raises(TooFewRowsForBuckets, match=too_few):
        fit_mapping(profile, method="frequency", num_rows=10, table="small", num_buckets=8)
    with pytest.raises(ValueError, match=r"table 'odd': 100 rows do not split into 8 equal buckets; use 96 rows"):
        fit_mapping(profile, method="frequency", num_rows=100, table="odd", num_buckets=8)
    too_small_budget = r"table 'tiny': a budget of 48 bytes cannot hold 64 buckets of at least 2 rows.*512 of them mapping"
    with pytest.raises(TooFewRowsForBuckets, match=too_small_budget + ".*use fewer buckets"):
        fit_mapping(profile, method="hash", total_bytes=3 * 16, embedding_dim=4, table="tiny", num_buckets=64)
    with pytest.raises(ValueError, match="num_buckets must be an integer >= 1"):
        fit_bucketed("hash", 12, 0, None, table="t")


def test_pipeline_keeps_small_tables_unbucketed_and_says_so(data, caplog):
    profile, _ = data
    small = IdProfile(np.arange(150), np.full(150, 3), 450)
    tables = [EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=p.num_ids, feature_names=[n])
              for n, p in (("big", profile), ("small", small))]
    with caplog.at_level(logging.INFO, logger="lhf_torchrec.pipeline.steps"):
        fitted = fit_mappings(tables, {"big": profile, "small": small}, "frequency", compression=4, num_buckets=32)
    mappings = fitted.compression.mappings
    assert mappings["big"].num_buckets == 32 and mappings["small"].num_buckets is None
    assert "table 'small'" in caplog.text and "fitted without buckets" in caplog.text


def test_bucket_entry_counts_and_cosharded_bytes_follow_the_fullest_bucket():
    # Entries placed in their ids' buckets are counted back per bucket.
    ids = torch.arange(-500, 500, dtype=torch.int64)
    buckets = bucket_of(ids, 4, 0)
    entry_ids = ids[:40].numpy()
    rows_per_bucket = 8
    entry_rows = buckets[:40].numpy() * rows_per_bucket
    regions = torch.tensor([[1, 7]] * 4, dtype=torch.int32)
    mapping = IdMapping.from_entries(entry_ids, entry_rows, 32, num_buckets=4, bucket_hash_regions=regions,
                                     hash_offset=0, hash_rows=32)
    expected = torch.bincount(buckets[:40], minlength=4)
    assert torch.equal(mapping.bucket_entry_counts(), expected)
    fullest = int(expected.max())
    assert cosharded_slots(32, 4, fullest) == -(-fullest // rows_per_bucket)
    assert cosharded_bytes(32, 4, fullest) == 32 * (12 * cosharded_slots(32, 4, fullest) + 4)
    assert cosharded_slots(32, 4, 0) == 1
    with pytest.raises(ValueError, match="not bucketed"):
        IdMapping(10).bucket_entry_counts()


# ------------------------------------------------------------------------ assembly in the entries' order


def _bucket_entries(ids: np.ndarray, num_buckets: int, rows_per_bucket: int, seed: int):
    """(ids, rows) in bucket order (as a bucketed fit and a distributed gather give them), one id per bucket
    hash, each row inside its id's bucket."""
    ids = np.unique(ids)
    _, first = np.unique(bucket_hash(torch.from_numpy(ids), num_buckets, seed).numpy(), return_index=True)
    ids = ids[np.sort(first)]
    buckets = bucket_of(torch.from_numpy(ids), num_buckets, seed).numpy()
    order = np.argsort(buckets, kind="stable")
    ids, buckets = ids[order], buckets[order]
    return ids, buckets * rows_per_bucket + (ids % (rows_per_bucket - 1)) + 1


def _bucketed_from(ids, rows, num_buckets, rows_per_bucket, seed):
    regions = torch.tensor([[0, 1]] * num_buckets, dtype=torch.int32)
    return IdMapping.from_entries(ids, rows, num_buckets * rows_per_bucket, hash_rows=num_buckets * rows_per_bucket,
                                  seed=seed, num_buckets=num_buckets, bucket_hash_regions=regions, table_name="tb")


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(int64s, min_size=1, max_size=300), num_buckets=st.sampled_from([1, 4, 16]),
       seed=st.integers(0, 1000), shuffle=st.integers(0, 1 << 30))
def test_bucketed_entries_give_one_mapping_in_any_order(ids, num_buckets, seed, shuffle):
    """The perfect hash table is built from the entries in the order given (no sort): any order of the same
    entries, in bucket order or not, gives the same mapping, bit for bit."""
    ids, rows = _bucket_entries(np.array(ids, np.int64), num_buckets, 8, seed)
    ordered = _bucketed_from(ids, rows, num_buckets, 8, seed)
    perm = np.random.default_rng(shuffle).permutation(ids.size)
    shuffled = _bucketed_from(ids[perm], rows[perm], num_buckets, 8, seed)
    assert ordered.fingerprint == shuffled.fingerprint
    query = torch.from_numpy(ids)
    assert torch.equal(ordered(query), torch.from_numpy(rows)) and torch.equal(shuffled(query), ordered(query))


@pytest.mark.parametrize("bucket_order", [True, False])
def test_duplicate_entries_are_refused_in_bucket_order_and_in_any_other(bucket_order):
    """The duplicate check sorts one bucket at a time only when the keys are in bucket order, and all of them
    otherwise: a repeated id, or two ids of one bucket hash, are refused either way."""
    ids, rows = _bucket_entries(np.arange(0, 4000, 3, dtype=np.int64), 8, 16, 0)
    if not bucket_order:
        perm = np.random.default_rng(1).permutation(ids.size)
        ids, rows = ids[perm], rows[perm]
    # A repeated id inside one bucket's run (not next to itself) and at the far end of the entries.
    for where in (5, ids.size - 1):
        dup_ids, dup_rows = np.insert(ids, where + 1, ids[where - 3]), np.insert(rows, where + 1, rows[where - 3])
        with pytest.raises(ValueError, match=f"table 'tb': id {ids[where - 3]} has more than one entry"):
            _bucketed_from(dup_ids, dup_rows, 8, 16, 0)
    twin = _same_bucket_hash(int(ids[10]), 0, 1)
    with pytest.raises(ValueError, match=f"ids {ids[10]} and {twin} have the same bucket hash"):
        _bucketed_from(np.append(ids, twin), np.append(rows, rows[10]), 8, 16, 0)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(0, 200), max_size=80), width=st.sampled_from([1, 7, 50, 1000]),
       sort_buckets=st.booleans())
def test_duplicate_key_finds_the_smallest_repeated_key(keys, width, sort_buckets):
    from lhf_torchrec.mapping.id_mapping import _duplicate_key

    keys = np.array(keys, np.int64)
    if sort_buckets:  # bucket order, keys unsorted inside each bucket
        keys = keys[np.argsort(keys // width, kind="stable")]
    values, counts = np.unique(keys, return_counts=True)
    repeated = values[counts > 1]
    assert _duplicate_key(keys, width) == (int(repeated[0]) if repeated.size else None)


def test_bucketed_entries_in_any_order_are_sorted_for_sorted_keys():
    """Past 2^23 rows sorted keys are cheaper than the perfect hash table: the assembly then sorts the keys."""
    ids, rows = _bucket_entries(np.arange(0, 3000, 7, dtype=np.int64), 4, 1 << 22, 0)
    perm = np.random.default_rng(2).permutation(ids.size)
    mapping = _bucketed_from(ids[perm], rows[perm], 4, 1 << 22, 0)
    assert mapping.storage == "sorted" and bool((mapping.keys[1:] > mapping.keys[:-1]).all())
    assert mapping.fingerprint == _bucketed_from(ids, rows, 4, 1 << 22, 0).fingerprint
    assert torch.equal(mapping(torch.from_numpy(ids)), torch.from_numpy(rows))


# ------------------------------------------------------------------ entries keyed by bucket hash


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(int64s, min_size=0, max_size=300), num_buckets=st.sampled_from([1, 4, 16]),
       rows_per_bucket=st.sampled_from([8, 1 << 20]), seed=st.integers(0, 1000), shuffle=st.integers(0, 1 << 30))
def test_entries_keyed_by_bucket_hash_give_the_mapping_of_their_ids(ids, num_buckets, rows_per_bucket, seed, shuffle):
    """A distributed fit gathers (bucket hash, int32 row) instead of (id, int64 row): the mapping built from
    the keys (from_bucket_keys) is the one from the ids, fingerprint included, in any order and storage."""
    from lhf_torchrec.mapping.id_mapping import bucket_entry_keys

    ids, rows = _bucket_entries(np.array(ids + [5], np.int64), num_buckets, rows_per_bucket, seed)
    perm = np.random.default_rng(shuffle).permutation(ids.size)
    ids, rows = ids[perm], rows[perm]
    want = _bucketed_from(ids, rows, num_buckets, rows_per_bucket, seed)
    num_rows = num_buckets * rows_per_bucket
    keys = bucket_entry_keys(ids, rows, num_rows, num_buckets, seed, "tb")
    assert np.array_equal(keys, bucket_hash(torch.from_numpy(ids), num_buckets, seed).numpy())
    got = IdMapping.from_bucket_keys(keys, rows.astype(np.int32), num_rows, hash_rows=num_rows, seed=seed,
                                     num_buckets=num_buckets, table_name="tb",
                                     bucket_hash_regions=torch.tensor([[0, 1]] * num_buckets, dtype=torch.int32))
    assert got.fingerprint == want.fingerprint and got.storage == want.storage
    assert torch.equal(got(torch.from_numpy(ids)), torch.from_numpy(rows))


@pytest.mark.parametrize("method", ["frequency", "combination", "hash"])
def test_keyed_fits_assemble_the_mapping_of_the_fits(data, method):
    from lhf_torchrec.mapping.buckets import assemble_bucketed, assemble_keyed, bucket_profiles, fit_bucket_range, keyed_fits

    profile, embeddings = data
    fits = fit_bucket_range(method, 512, 8, bucket_profiles(profile, 8, 3), embeddings, seed=3)
    keyed = keyed_fits(fits, 512, 8, seed=3)
    assert keyed.rows.dtype == np.int32 and keyed.splits == fits.splits and keyed.keys.size == fits.entry_ids.size
    want = assemble_bucketed(method, 512, 8, fits, seed=3, table="t")
    assert assemble_keyed(method, 512, 8, keyed, seed=3, table="t").fingerprint == want.fingerprint
    # Keyed fits of some buckets only are refused at the assembly, as fits are.
    part = type(keyed)(2, keyed.splits[2:], keyed.keys[:0], keyed.rows[:0], keyed.entry_counts[2:])
    with pytest.raises(ValueError, match=r"table 't': a mapping needs the fits of all 8 buckets, got buckets \[2, 8\)"):
        assemble_keyed(method, 512, 8, part, seed=3, table="t")


def test_bad_keyed_entries_are_refused_naming_the_key():
    ids, rows = _bucket_entries(np.arange(0, 3000, 7, dtype=np.int64), 4, 16, 0)
    keys = bucket_hash(torch.from_numpy(ids), 4, 0).numpy()
    regions = torch.tensor([[0, 1]] * 4, dtype=torch.int32)

    def build(k, r, **settings):
        settings = {"num_buckets": 4, "table_name": "tk", **settings}
        return IdMapping.from_bucket_keys(k, r, 64, hash_rows=64, bucket_hash_regions=regions, **settings)

    with pytest.raises(ValueError, match=f"table 'tk': bucket hash {keys[3]} has more than one entry"):
        build(np.append(keys, keys[3]), np.append(rows, rows[3]))
    wrong = rows.copy()
    wrong[2] = (wrong[2] + 16) % 64
    with pytest.raises(ValueError, match=f"table 'tk': entry row {wrong[2]} of bucket hash {keys[2]} is outside its "
                                         f"bucket {keys[2] // (input_hash_size(4) // 4)}"):
        build(keys, wrong)
    with pytest.raises(ValueError, match=r"table 'tk': entry row 64 is outside \[0, 64\)"):
        build(keys, np.append(rows[:-1], 64))
    with pytest.raises(ValueError, match=f"table 'tk': bucket hash -1 is outside \\[0, {input_hash_size(4)}\\)"):
        build(np.append(keys, -1), np.append(rows, 0))
    with pytest.raises(ValueError, match="table 'tk': bucket keys must be 1-D int64 with one integer row each"):
        build(keys.astype(np.float64), rows)
    with pytest.raises(ValueError, match="table 'tk': bucket keys must be 1-D int64 with one integer row each"):
        build(keys, rows[:-1])
    with pytest.raises(ValueError, match="table 'tk': entries keyed by bucket hash make a bucketed mapping"):
        build(keys, rows, num_buckets=None)
    # Keying the fits checks by id: the id named, not its key.
    from lhf_torchrec.mapping.id_mapping import bucket_entry_keys

    with pytest.raises(ValueError, match=f"table 'tk': id {ids[4]} has more than one entry"):
        bucket_entry_keys(np.append(ids, ids[4]), np.append(rows, rows[4]), 64, 4, 0, "tk")
    with pytest.raises(ValueError, match=f"table 'tk': entry row {wrong[2]} of id {ids[2]} is outside its bucket"):
        bucket_entry_keys(ids, wrong, 64, 4, 0, "tk")
