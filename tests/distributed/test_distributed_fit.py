"""Distributed fitting (lhf_torchrec.distributed.fit) on 2 gloo ranks equals fit_bucketed on the
merged profile, fingerprint for fingerprint, for every method.

So do `lhf profile` and `lhf fit --num-buckets` run as torchrun runs them. One spawn does all the
checks (a spawn costs 10-30 s); the library checks pass on 4 ranks too (``_distributed_fit_checks``
with world_size=4 through ``run_on_rank``, ~70 s on 2 busy cores), left out of the suite for time.
Workers are module-level: the harness spawns.
"""

import os
import shutil
import tempfile
import unittest

import numpy as np
import pytest
import torch
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase

import torch.distributed as dist

from lh_dist_helpers import raised_by
from lhf_torchrec.cli import main
from lhf_torchrec.distributed.fit import (
    exchange_profiles,
    fit_bucketed_distributed,
    owned_buckets,
)
from lhf_torchrec.mapping.buckets import bucket_profiles, fit_bucketed
from lhf_torchrec.mapping import load_mappings
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.pipeline.artifacts import load_profiles

pytestmark = pytest.mark.distributed

METHODS = ("hash", "frequency", "double_hash", "learned", "combination")
NUM_BUCKETS = 8
NUM_ROWS = 8 * 64


def _accesses(seed: int = 0) -> np.ndarray:
    """Zipf accesses of sparse 64-bit ids (a few hundred with >= 10 accesses: the learned methods cluster)."""
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.2, 30_000) % 3000) * 0x9E3779B97F4A7 + (1 << 40)


def _rank_part(accesses: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rows split over every rank but the last, which sees no data."""
    parts = np.array_split(accesses, world_size - 1)
    return parts[rank] if rank < world_size - 1 else accesses[:0]


def _embeddings(profile: IdProfile, seed: int = 0) -> IdEmbeddings:
    rng = np.random.default_rng(seed)
    return IdEmbeddings(profile.ids, torch.from_numpy(rng.standard_normal((profile.num_ids, 4)).astype(np.float32)))


def _distributed_fit_checks(rank: int, world_size: int) -> None:
    accesses = _accesses()
    merged = IdProfile.from_ids(accesses)
    local = IdProfile.from_ids(_rank_part(accesses, rank, world_size))
    embeddings = _embeddings(merged)

    # The exchange gives each rank exactly the merged counts of its buckets' ids.
    owned = exchange_profiles(local, NUM_BUCKETS, seed=5)
    mine = owned_buckets(rank, world_size, NUM_BUCKETS)
    expected_buckets = bucket_profiles(merged, NUM_BUCKETS, seed=5)[mine.start:mine.stop]
    got_buckets = bucket_profiles(owned, NUM_BUCKETS, seed=5)
    for b, want in zip(mine, expected_buckets):
        assert np.array_equal(got_buckets[b].ids, want.ids) and np.array_equal(got_buckets[b].counts, want.counts), b
    assert sum(b.num_ids for b in got_buckets) == owned.num_ids > 0
    # This rank's embeddings cover only its buckets' ids: enough for the learned methods.
    has_own = np.isin(merged.ids, owned.ids)
    own_embeddings = IdEmbeddings(merged.ids[has_own], embeddings.vectors[torch.from_numpy(has_own)])

    for method in METHODS:
        want = fit_bucketed(method, NUM_ROWS, NUM_BUCKETS, merged, embeddings, seed=5, table="t")
        got = fit_bucketed_distributed(method, NUM_ROWS, NUM_BUCKETS, local, own_embeddings, seed=5, table="t")
        assert got.fingerprint == want.fingerprint, (rank, method)
        if method == "combination":  # shards: this rank's entries, every bucket's regions and counts
            shard = fit_bucketed_distributed(method, NUM_ROWS, NUM_BUCKETS, local, own_embeddings, seed=5, table="t",
                                             gather=False)
            assert shard.buckets == mine
            assert torch.equal(want(torch.from_numpy(shard.fits.entry_ids)), torch.from_numpy(shard.fits.entry_rows))
            assert shard.fits.entry_ids.size == int(want.bucket_entry_counts()[mine.start:mine.stop].sum()) > 0
            assert np.array_equal(shard.entry_counts, want.bucket_entry_counts().numpy())
            assert torch.equal(shard.bucket_hash_regions, want.bucket_hash_regions)
            assert shard.layout == want.layout

    # Empty buckets (3 distinct ids in 32 buckets; one rank may have none of them) and hyper-parameters.
    few = np.array([11, 11, 12, 1 << 50] * 50)
    few_local = IdProfile.from_ids(_rank_part(few, rank, world_size))
    want = fit_bucketed("frequency", 32 * 4, 32, IdProfile.from_ids(few), seed=1, hot_fraction=0.5)
    got = fit_bucketed_distributed("frequency", 32 * 4, 32, few_local, seed=1, hot_fraction=0.5)
    assert got.fingerprint == want.fingerprint

    # Refusals, raised on every rank before any collective.
    capped = IdProfile.from_ids(accesses[:100], capacity=8)
    error = raised_by(lambda: exchange_profiles(capped, NUM_BUCKETS, table="t_C1"))
    assert "table 't_C1': distributed fitting needs exact profiles" in str(error), error
    odd = world_size + 1
    error = raised_by(lambda: fit_bucketed_distributed("frequency", odd * 4, odd, local, table="t_C2"))
    assert f"table 't_C2': a world size of {world_size} ranks does not divide {odd} buckets" in str(error), error


CLI_DATA = ["--rows", "6000", "--scale", "0.0005", "--data-seed", "3"]
CLI_FIT = ["--method", "frequency", "--compression", "2", "--embedding-dim", "8", "--num-buckets", "4"]


def _worker(rank: int, world_size: int, path: str) -> None:
    """`lhf profile` and `lhf fit` as torchrun runs them (the launcher's variables; MASTER_* are set),
    then the library checks in the group they joined."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        assert main(["profile", *CLI_DATA, "--out", os.path.join(path, "p2.safetensors")]) == 0
        assert main(["fit", "--profiles", os.path.join(path, "p2.safetensors"), *CLI_FIT, "--out",
                     os.path.join(path, "m2.safetensors")]) == 0
        _distributed_fit_checks(rank, world_size)
    finally:
        dist.destroy_process_group()


class DistributedFitTest(MultiProcessTestBase):
    def test_distributed_fit_and_cli_on_two_ranks_equal_one_process(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-distfit-")
        try:
            self._run_multi_process_test(callable=_worker, world_size=2, path=path)
            assert main(["profile", *CLI_DATA, "--out", os.path.join(path, "p1.safetensors")]) == 0
            assert main(["fit", "--profiles", os.path.join(path, "p1.safetensors"), *CLI_FIT, "--out",
                         os.path.join(path, "m1.safetensors")]) == 0
            one, _ = load_profiles(os.path.join(path, "p1.safetensors"), 8)
            two, _ = load_profiles(os.path.join(path, "p2.safetensors"), 8)
            assert one.keys() == two.keys()
            for name in one:
                assert np.array_equal(one[name].ids, two[name].ids), name
                assert np.array_equal(one[name].counts, two[name].counts) and one[name].total == two[name].total
            m1 = load_mappings(os.path.join(path, "m1.safetensors"))
            m2 = load_mappings(os.path.join(path, "m2.safetensors"))
            assert {n: m.fingerprint for n, m in m1.items()} == {n: m.fingerprint for n, m in m2.items()}
            assert any(m.num_buckets == 4 for m in m2.values())
        finally:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
