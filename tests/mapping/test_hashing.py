import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.mapping.hashing import MERSENNE_31, hash_coefficients, hash_ids, mix64, unmix64

int64s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(int64s, min_size=1, max_size=50), buckets=st.integers(1, (1 << 31) - 2), seed=st.integers(0, 2**64 - 1))
def test_any_int64_lands_in_range(ids, buckets, seed):
    rows = hash_ids(torch.tensor(ids, dtype=torch.int64), buckets, seed)
    assert rows.dtype == torch.int64
    assert int(rows.min()) >= 0 and int(rows.max()) < buckets


def test_deterministic_and_seed_dependent():
    ids = torch.arange(-1000, 100_000, dtype=torch.int64) * 7919
    a = hash_ids(ids, 1000, seed=3)
    assert torch.equal(a, hash_ids(ids.clone(), 1000, seed=3))
    assert (a != hash_ids(ids, 1000, seed=4)).float().mean() > 0.9


def test_roughly_uniform():
    ids = torch.arange(200_000, dtype=torch.int64)
    counts = torch.bincount(hash_ids(ids, 100, seed=0), minlength=100).numpy()
    expected = ids.numel() / 100
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 200, chi2  # 99 degrees of freedom: p ~ 1e-8 above 200


def test_high_bits_matter():
    # Ids that differ only above bit 31 (64-bit Criteo-style hashes) must not all collide.
    ids = torch.arange(1000, dtype=torch.int64) << 40
    assert torch.unique(hash_ids(ids, 1 << 20, seed=0)).numel() > 990


def test_coefficients_are_valid():
    for seed in range(50):
        a0, a1, a2, b = hash_coefficients(seed)
        p = (1 << 31) - 1
        assert 1 <= a0 < p and 1 <= a1 < p and 1 <= a2 < p and 0 <= b < p


def test_per_id_coefficients_hash_each_id_with_its_own_table():
    from lhf_torchrec.mapping.hashing import hash_with_coefficients

    rng = np.random.default_rng(5)
    ids = torch.from_numpy(rng.integers(-(1 << 63), (1 << 63) - 1, 3000, dtype=np.int64))
    tables = [(1, 0), (30, 2), ((1 << 31) - 2, 123)]
    coefficients = torch.tensor([[m, *hash_coefficients(s)] for m, s in tables]).repeat_interleave(1000, dim=0)
    got = hash_with_coefficients(ids, coefficients)
    for i, (m, s) in enumerate(tables):
        part = slice(1000 * i, 1000 * (i + 1))
        assert torch.equal(got[part], hash_ids(ids[part], m, s))


def _reference_hash(x: int, num_buckets: int, seed: int) -> int:
    """Carter-Wegman over p = 2^31 - 1 on the three 31-bit digits of x's 64 bits, in python integers."""
    a0, a1, a2, b = hash_coefficients(seed)
    u = x & ((1 << 64) - 1)
    digits = (u & MERSENNE_31, (u >> 31) & MERSENNE_31, u >> 62)
    h = (a0 * digits[0] + a1 * digits[1] + a2 * digits[2] + b) % MERSENNE_31
    return (h * num_buckets) >> 31


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=50),
       buckets=st.integers(1, MERSENNE_31 - 1), seed=st.integers(0, 1 << 62))
def test_the_vectorized_hash_is_the_carter_wegman_formula_bit_for_bit(ids, buckets, seed):
    extremes = [-(1 << 63), (1 << 63) - 1, -1, 0, MERSENNE_31 - 1, MERSENNE_31, 1 << 31, 1 << 62]
    query = ids + extremes
    expected = [_reference_hash(x, buckets, seed) for x in query]
    assert hash_ids(torch.tensor(query, dtype=torch.int64), buckets, seed).tolist() == expected


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=50))
def test_unmix64_inverts_mix64(ids):
    x = torch.tensor(ids + [-(1 << 63), -1, 0, 1, (1 << 63) - 1], dtype=torch.int64)
    assert torch.equal(unmix64(mix64(x)), x) and torch.equal(mix64(unmix64(x)), x)
