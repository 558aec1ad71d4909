"""A seeded universal hash of int64 ids into ``[0, num_buckets)``, vectorized in torch.

Carter-Wegman hashing over the Mersenne prime p = 2^31 - 1: the 64-bit id is split into three
31-bit digits (x0, x1, x2) and hashed as ``(a0*x0 + a1*x1 + a2*x2 + b) mod p``, then scaled to the
bucket range. Every product stays below 2^62 and every reduction mod p is a shift-and-add
(no division), so the whole hash is a handful of int64 element-wise ops that run the same on CPU
and CUDA without overflow. FBGEMM's ``murmur_hash3`` only takes one element at a time, hence this.

The coefficients come from the seed through splitmix64, so ``hash_ids(ids, m, seed)`` is a fixed
function of (ids, m, seed) on every host and device.
"""

from typing import Tuple

import torch

MERSENNE_31 = (1 << 31) - 1
_MASK_64 = (1 << 64) - 1


def _splitmix64(state: int) -> Tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK_64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return state, z ^ (z >> 31)


def hash_coefficients(seed: int) -> Tuple[int, int, int, int]:
    """(a0, a1, a2, b) with a_i in [1, p) and b in [0, p), derived deterministically from ``seed``."""
    state = seed & _MASK_64
    out = []
    for lowest in (1, 1, 1, 0):
        state, z = _splitmix64(state)
        out.append(lowest + z % (MERSENNE_31 - lowest))
    return out[0], out[1], out[2], out[3]


def _fold(x: torch.Tensor) -> torch.Tensor:
    return (x & MERSENNE_31) + (x >> 31)


def _mod_mersenne(x: torch.Tensor) -> torch.Tensor:
    # x < 2^63, x >= 0: two folds bring it below 2p, one conditional subtraction below p.
    x = _fold(_fold(x))
    return torch.where(x >= MERSENNE_31, x - MERSENNE_31, x)


def hash_ids(ids: torch.Tensor, num_buckets: int, seed: int) -> torch.Tensor:
    """Hashes int64 ids (any value, negative included) to int64 buckets in ``[0, num_buckets)``."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if num_buckets > MERSENNE_31:
        raise ValueError(f"num_buckets must be < 2^31 - 1, got {num_buckets}")
    a0, a1, a2, b = hash_coefficients(seed)
    x = ids.to(torch.int64)
    # Digits of the two's-complement bit pattern, so negative ids hash like any other value.
    d0 = x & MERSENNE_31
    d1 = (x >> 31) & MERSENNE_31
    d2 = (x >> 62) & 3
    # One fold per product keeps it below 2^32 (and equal mod p); the sum stays below 2^34.
    h = _fold(d0 * a0) + _fold(d1 * a1) + _fold(d2 * a2) + b
    h = _mod_mersenne(h)
    # h is uniform on [0, p); multiply-shift maps it onto [0, num_buckets) without a division.
    return (h * num_buckets) >> 31
