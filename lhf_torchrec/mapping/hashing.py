"""A seeded universal hash of int64 ids into ``[0, num_buckets)``, vectorized in torch.

Carter-Wegman hashing over the Mersenne prime p = 2^31 - 1: the 64-bit id is split into three
31-bit digits (x0, x1, x2) and hashed as ``(a0*x0 + a1*x1 + a2*x2 + b) mod p``, then scaled to the
bucket range. Every product stays below 2^62 and every reduction mod p is a shift-and-add
(no division), so the whole hash is a handful of int64 element-wise ops that run the same on CPU
and CUDA without overflow. FBGEMM's ``murmur_hash3`` only takes one element at a time, hence this.

The coefficients come from the seed through splitmix64, so ``hash_ids(ids, m, seed)`` is a fixed
function of (ids, m, seed) on every host and device.

A bucketed mapping also needs each id's *bucket* (:func:`bucket_of`): splitmix64's finalizer (a
bijection of 64-bit words) of the id, reduced to ``[0, IHS)`` with ``IHS = B * floor(2^62 / B)``, so
that bucket b is the value range ``[b * IHS / B, (b + 1) * IHS / B)``, as TorchRec's managed-collision
modules bucketize their input. Only the top bit and the reduction mod IHS lose information: four
64-bit ids share each value, so whoever keys entries by this value must check for collisions.
"""

from typing import Tuple, Union

import numpy as np
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


def hash_with_coefficients(ids: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The hash with explicit int64 ``coefficients[..., :] = (num_buckets, a0, a1, a2, b)``.

    ``coefficients`` broadcasts against ``ids``: shape (5,) hashes every id alike, shape (n, 5) gives
    each id its own table's hash (one call for many tables). TorchScript-compatible, hence the
    literal constants (2147483647 = p = 2^31 - 1; 2^31 = 1 mod p, so a fold keeps the value mod p).
    """
    x = ids.to(torch.int64)
    c = coefficients
    # In-place ops on few temporaries: each int64 pass over the ids costs about as much as a gather.
    # The products are out of place: ids and coefficients broadcast (e.g. (n, 1) ids, (k, 5) coefficients).
    t0 = (x & 2147483647) * c[..., 1]
    t1 = (x >> 31).bitwise_and_(2147483647) * c[..., 2]
    # One fold per 62-bit product keeps each below 2^32; the sum stays below 2^35.
    h = (t0 & 2147483647).add_(t0.bitwise_right_shift_(31))
    h.add_(t1 & 2147483647).add_(t1.bitwise_right_shift_(31))
    h.add_((x >> 62).bitwise_and_(3) * c[..., 3]).add_(c[..., 4])
    h = (h & 2147483647).add_(h.bitwise_right_shift_(31))  # below 2p now
    # h mod p: h + 1 reaches 2^31 exactly when h >= p; then (h + 1) & (2^31 - 1) = h - p.
    h = (h + 1).bitwise_right_shift_(31).add_(h).bitwise_and_(2147483647)
    # h is uniform on [0, p); multiply-shift maps it onto [0, num_buckets) without a division.
    return h.mul_(c[..., 0]).bitwise_right_shift_(31)


def hash_ids(ids: torch.Tensor, num_buckets: Union[int, torch.Tensor], seed: int) -> torch.Tensor:
    """Hashes int64 ids (any value, negative included) to int64 buckets in ``[0, num_buckets)``.

    ``num_buckets`` is one int for every id, or an int64 tensor shaped like ``ids`` that gives each
    id its own range (the hash regions of a bucketed mapping); the hash of an id is the same either way.
    """
    if isinstance(num_buckets, torch.Tensor):
        seeded = torch.tensor(hash_coefficients(seed), dtype=torch.int64, device=ids.device)
        coefficients = torch.cat([num_buckets.to(torch.int64).reshape(-1, 1),
                                  seeded.expand(num_buckets.numel(), 4)], dim=1)
        return hash_with_coefficients(ids.reshape(-1), coefficients).view(ids.shape)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if num_buckets > MERSENNE_31:
        raise ValueError(f"num_buckets must be < 2^31 - 1, got {num_buckets}")
    coefficients = torch.tensor([num_buckets, *hash_coefficients(seed)], dtype=torch.int64, device=ids.device)
    return hash_with_coefficients(ids, coefficients)


# ------------------------------------------------------------------ buckets of a bucketed mapping
# splitmix64's finalizer, a bijection on 64-bit words. int64 multiplication wraps around, so the
# unsigned constants are written as the signed int64 with the same bits.
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) shift right of int64 words."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(ids: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 ids: a bijection of the 64-bit words, vectorized."""
    z = ids.to(torch.int64)
    z = (z ^ _shift_right(z, 30)) * _MIX_1
    z = (z ^ _shift_right(z, 27)) * _MIX_2
    return z ^ _shift_right(z, 31)


def _signed64(word: int) -> int:
    """The int64 with the bits of an unsigned 64-bit word."""
    return word - (1 << 64) if word >= 1 << 63 else word


# The inverses mod 2^64 of mix64's multipliers.
_UNMIX_1 = _signed64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_UNMIX_2 = _signed64(pow(0x94D049BB133111EB, -1, 1 << 64))


def unmix64(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`mix64`: ``unmix64(mix64(x)) == x``. Each step of mix64 undone in reverse; a
    xorshift z ^ (z >> s) is undone by xoring the shifts by s, 2s, ... below 64 bits."""
    z = words.to(torch.int64)
    z = (z ^ _shift_right(z, 31) ^ _shift_right(z, 62)) * _UNMIX_2
    z = (z ^ _shift_right(z, 27) ^ _shift_right(z, 54)) * _UNMIX_1
    return z ^ _shift_right(z, 30) ^ _shift_right(z, 60)


def input_hash_size(num_buckets: int) -> int:
    """IHS = B * floor(2^62 / B): the hashed id space, B equal value ranges of IHS / B ids each."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
    return num_buckets * ((1 << 62) // num_buckets)


def bucket_key(seed: int) -> int:
    """The int64 word an id is XOR-ed with before mixing: a fixed function of ``seed``."""
    return _signed64(_splitmix64(seed & _MASK_64)[1])


def bucket_hash(ids: torch.Tensor, num_buckets: int, seed: int) -> torch.Tensor:
    """h = mix64(id ^ key(seed)) & (2^63 - 1) mod IHS, in ``[0, input_hash_size(num_buckets))``.

    The id's bucket is the value range h falls in (:func:`bucket_of`); TorchRec's managed-collision
    input distribution block-bucketizes this h (``input_size() = IHS``, ``buckets() = B``).
    """
    mixed = mix64(ids.to(torch.int64) ^ bucket_key(seed)) & ((1 << 63) - 1)
    return torch.remainder(mixed, input_hash_size(num_buckets))


# Ids hashed at once by :func:`bucket_hashes`: the mixing's int64 temporaries take 8 MiB each, whatever the input.
HASH_CHUNK = 1 << 20


def bucket_hashes(ids: np.ndarray, num_buckets: int, seed: int) -> np.ndarray:
    """:func:`bucket_hash` of a numpy array of ids, chunk by chunk into one int64 array: a fit's
    profiles hold up to billions of ids, and hashing them at once would hold about four temporaries
    as large as the ids (``mix64``'s steps)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(ids.shape[0], np.int64)
    for start in range(0, ids.shape[0], HASH_CHUNK):
        out[start:start + HASH_CHUNK] = bucket_hash(torch.from_numpy(ids[start:start + HASH_CHUNK]), num_buckets,
                                                    seed).numpy()
    return out


def bucket_of(ids: torch.Tensor, num_buckets: int, seed: int) -> torch.Tensor:
    """The bucket in ``[0, num_buckets)`` of every int64 id: ``bucket_hash // (IHS / B)``."""
    return torch.div(bucket_hash(ids, num_buckets, seed), input_hash_size(num_buckets) // num_buckets,
                     rounding_mode="floor")
