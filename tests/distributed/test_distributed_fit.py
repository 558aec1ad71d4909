"""Distributed fitting (lhf_torchrec.distributed.fit) on 2 gloo ranks equals fit_bucketed on the
merged profile, fingerprint for fingerprint, for every method; so do the budgets planned from each
rank's share (RankBudgetStatistics) and a rank's co-sharded remap built from its MappingShard.

So do `lhf profile` and `lhf fit --num-buckets` run as torchrun runs them (mappings and printed output). One spawn does all the
checks (a spawn costs 10-30 s); the library checks pass on 4 ranks too (``_distributed_fit_checks``
with world_size=4 through ``run_on_rank``, ~70 s on 2 busy cores), left out of the suite for time.
Workers are module-level: the harness spawns.
"""

import contextlib
import io
import os
import shutil
import tempfile
import unittest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase

import torch.distributed as dist

from lh_dist_helpers import raised_by
from lhf_torchrec.cli import main
from lhf_torchrec.distributed.fit import (
    RankBudgetStatistics,
    _all_gather,
    _gather,
    _summed_by_id,
    bucket_owners,
    cosharded_remap,
    exchange_profiles,
    fit_bucketed_distributed,
    fit_owned_buckets,
    gather_keyed_fits,
    gather_profile,
    owned_buckets,
    share_profile,
)
from lhf_torchrec.mapping.budget import plan_budget
from lhf_torchrec.mapping.buckets import (
    TooFewRowsForBuckets,
    BucketFits,
    bucket_profiles,
    fit_bucket_range,
    fit_bucketed,
    keyed_fits,
)
from lhf_torchrec.mapping import load_mappings
from lhf_torchrec.mapping.embeddings import IdEmbeddings
from lhf_torchrec.mapping.profile import IdProfile
from lhf_torchrec.mapping.tables import table_budgets
from lhf_torchrec.modules.cosharded import CoShardedIdRemap
from lhf_torchrec.pipeline.artifacts import load_profile_shares, load_profiles, save_embeddings
from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.pipeline.steps import fit_mappings, learn_model, profile_tables, share_tables
from lhf_torchrec.pipeline.table_choice import collided_rows, fit_per_table
from lhf_torchrec.training.trainer import TrainConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

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


def bucket_profiles_owner(ids: np.ndarray) -> np.ndarray:
    """The rank (of 2) that owns each id's bucket, in the checks' buckets (NUM_BUCKETS, seed 5)."""
    from lhf_torchrec.distributed.fit import bucket_owners

    return bucket_owners(ids, NUM_BUCKETS, 2, 5)


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

    # The exchange's rounds cut the ranks' common id range: ids at both ends of int64 on rank 0, none on the others.
    extremes = np.array([-(1 << 63), -(1 << 62), -5, 7, 1 << 40, (1 << 63) - 1], np.int64)
    some = IdProfile(extremes, np.arange(1, 7), 21) if rank == 0 else IdProfile(np.zeros(0, np.int64),
                                                                               np.zeros(0, np.int64), 0)
    got = exchange_profiles(some, NUM_BUCKETS, seed=5)
    keep = bucket_owners(extremes, NUM_BUCKETS, world_size, 5) == rank
    assert got.ids.tolist() == extremes[keep].tolist() and got.counts.tolist() == np.arange(1, 7)[keep].tolist()

    # Gathers receive every rank's part in place, in rank order: unequal lengths, an empty part (the
    # last rank's), rows of several columns; the per-rank list splits the same buffer.
    part = np.arange(rank * 100, rank * 100 + 6 * (world_size - 1 - rank)).reshape(-1, 2)
    whole, lengths = _gather(part, None)
    parts = [np.arange(r * 100, r * 100 + 6 * (world_size - 1 - r)).reshape(-1, 2) for r in range(world_size)]
    assert lengths == [p.shape[0] for p in parts] and np.array_equal(whole, np.concatenate(parts))
    listed = _all_gather(part, None)
    assert whole.dtype == np.int64 and [g.shape for g in listed] == [p.shape for p in parts]
    assert np.array_equal(np.concatenate(listed), whole)
    # Gathers keep the dtype (int32 rows of keyed entries, bytes of an error message).
    small, small_lengths = _gather(np.arange(rank + 1, dtype=np.int32), None)
    assert small.dtype == np.int32 and small_lengths == list(range(1, world_size + 1))
    # The gathered keyed fits of the ranks' buckets are one process's fits of every bucket, keyed.
    own = fit_owned_buckets("combination", NUM_ROWS, NUM_BUCKETS, owned, own_embeddings, seed=5)
    fits = gather_keyed_fits(own, NUM_ROWS, NUM_BUCKETS, seed=5)
    one = keyed_fits(fit_bucket_range("combination", NUM_ROWS, NUM_BUCKETS, bucket_profiles(merged, NUM_BUCKETS, seed=5),
                                      embeddings, seed=5), NUM_ROWS, NUM_BUCKETS, seed=5)
    assert fits.first_bucket == 0 and fits.splits == one.splits and fits.rows.dtype == np.int32
    for name in ("keys", "rows", "entry_counts"):
        assert np.array_equal(getattr(fits, name), getattr(one, name)), name
    # A bad entry only one rank holds (its bucket's) fails on every rank, naming the id, none left waiting.
    ids, rows = own.entry_ids.copy(), own.entry_rows.copy()
    if rank == 0 and ids.size > 1:
        ids[1] = ids[0]
    bad = BucketFits(own.first_bucket, own.splits, ids, rows, own.entry_counts)
    error = raised_by(lambda: gather_keyed_fits(bad, NUM_ROWS, NUM_BUCKETS, seed=5, table="t_dup"))
    if rank == 0:
        assert str(error) == f"table 't_dup': id {own.entry_ids[0]} has more than one entry", error
    else:
        assert str(error).startswith("table 't_dup': id ") and str(error).endswith(
            "has more than one entry (raised on rank 0)"), error
    # So does an entry row outside its bucket, on the rank that holds it (the last rank holds buckets too).
    rows = own.entry_rows.copy()
    if rank == world_size - 1 and rows.size:
        rows[0] = (rows[0] + NUM_ROWS // NUM_BUCKETS) % NUM_ROWS
    bad = BucketFits(own.first_bucket, own.splits, own.entry_ids, rows, own.entry_counts)
    error = raised_by(lambda: gather_keyed_fits(bad, NUM_ROWS, NUM_BUCKETS, seed=5, table="t_row"))
    assert "table 't_row': entry row" in str(error) and "is outside its bucket" in str(error), error
    assert (rank == world_size - 1) != (f"(raised on rank {world_size - 1})" in str(error)), error

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

    # Budgets planned from each rank's share equal the plans of the merged profile (min_count raised
    # by a small mapping share, automatic fractions); too small a budget raises on every rank.
    share = share_profile(local, NUM_BUCKETS, seed=5, table="t")
    assert share.summary == merged.summary() and share.profile.num_ids < merged.num_ids
    whole = gather_profile(share)
    assert np.array_equal(whole.ids, merged.ids) and np.array_equal(whole.counts, merged.counts)
    well_observed = gather_profile(share, 10)
    assert np.array_equal(well_observed.ids, merged.ids[merged.counts >= 10]) and well_observed.total == merged.total
    raised = 0
    for method, settings in [(m, {}) for m in METHODS] + [("combination", {"mapping_share": 0.02}),
                                                          ("combination", {"hot_fraction": "auto",
                                                                           "hashed_fraction": "auto"}),
                                                          ("frequency", {"hot_fraction": "auto"})]:
        for budget in (6_000, 40_000):
            args = dict(embedding_dim=4, total_bytes=budget, method=method, table="t", num_buckets=NUM_BUCKETS, seed=5,
                        **settings)
            want = plan_budget(merged, **args)
            got = plan_budget(RankBudgetStatistics(share, table="t"), **args)
            assert got == want, (rank, method, settings, budget, got, want)
            raised += got.hyperparams.get("min_count", 10) > 10
    assert raised > 0  # the histogram decided a min_count above the floor
    too_small = raised_by(lambda: plan_budget(RankBudgetStatistics(share, table="t"), embedding_dim=4, total_bytes=200,
                                              method="frequency", table="t", num_buckets=NUM_BUCKETS, seed=5))
    assert isinstance(too_small, TooFewRowsForBuckets) and "table 't'" in str(too_small), too_small

    # A rank's co-sharded remap from its MappingShard: the module TorchRec's sharder cuts from the
    # gathered mapping's, buffer for buffer, and it maps its buckets' ids as the mapping does.
    shard = fit_bucketed_distributed("combination", NUM_ROWS, NUM_BUCKETS, local, own_embeddings, seed=5, table="t",
                                     gather=False)
    gathered = fit_bucketed("combination", NUM_ROWS, NUM_BUCKETS, merged, embeddings, seed=5, table="t")
    rows_per_rank = NUM_ROWS // world_size
    cut = CoShardedIdRemap.from_mapping(gathered).rebuild_with_output_id_range(
        (rank * rows_per_rank, (rank + 1) * rows_per_rank), [0, rows_per_rank, NUM_ROWS])
    built = cosharded_remap(shard)
    assert (built.first_bucket, built.end_bucket, built.slots_per_row) == (cut.first_bucket, cut.end_bucket,
                                                                          cut.slots_per_row)
    for name in ("_keys", "_slots", "_hash_regions"):
        assert torch.equal(getattr(built, name), getattr(cut, name)), name
    for key in ("table_name", "method", "params", "num_rows", "num_entries", "seed", "hash_offset", "hash_rows",
                "layout", "num_buckets"):
        assert built.description[key] == cut.description[key], key
    probe = torch.from_numpy(np.concatenate([merged.ids, np.arange(-500, 500) * 7919]))
    probe = probe[torch.from_numpy(np.isin(bucket_profiles_owner(probe.numpy()), [rank]))]
    rows = built.remap(built.preprocess({"f": JaggedTensor(values=probe, lengths=torch.tensor([probe.numel()]))}))
    assert probe.numel() > 100 and torch.equal(rows["f"].values(), gathered(probe))

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
CLI_FIT = ["--compression", "2", "--embedding-dim", "8", "--num-buckets", "4"]
CLI_METHODS = {"frequency": [], "combination": ["--embeddings", "e.safetensors"]}


def _fit_output(path: str, profiles: str, method: str, out: str) -> str:
    """What `lhf fit` prints (less the file name) for ``method``, after it returned 0."""
    printed = io.StringIO()
    extra = [os.path.join(path, a) if a.endswith(".safetensors") else a for a in CLI_METHODS[method]]
    with contextlib.redirect_stdout(printed):
        assert main(["fit", "--profiles", os.path.join(path, profiles), "--method", method, *extra, *CLI_FIT,
                     "--out", os.path.join(path, out)]) == 0
    return printed.getvalue().replace(os.path.join(path, out), out[:-len(".safetensors")])


def _worker(rank: int, world_size: int, path: str) -> None:
    """`lhf profile` and `lhf fit` as torchrun runs them (the launcher's variables; MASTER_* are set),
    then the library checks in the group they joined."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        assert main(["profile", *CLI_DATA, "--out", os.path.join(path, "p2.safetensors")]) == 0
        for method in CLI_METHODS:
            printed = _fit_output(path, "p2.safetensors", method, f"{method}2.safetensors")
            if rank == 0:
                with open(os.path.join(path, f"{method}2.txt"), "w") as f:
                    f.write(printed)
        # Each rank keeps a share of every profile, not the whole profile.
        shares, _ = load_profile_shares(os.path.join(path, "p2.safetensors"), 8, 4, 0)
        whole, _ = load_profiles(os.path.join(path, "p2.safetensors"), 8)
        for name, share in shares.items():
            assert share.summary == whole[name].summary(), name
        assert sum(s.profile.num_ids for s in shares.values()) < sum(p.num_ids for p in whole.values())
        # `lhf train --method M --num-buckets B`'s path: shares profiled from the data, fitted together.
        data = load_split(DatasetSpec("synthetic", [], rows=6000, scale=0.0005, seed=3), 8, progress=False)
        fitted = fit_mappings(data.tables, share_tables(data.train, data.tables, 4, 0), "frequency", compression=2,
                              optimizer="rowwise_adagrad", seed=0, num_buckets=4)
        written = load_mappings(os.path.join(path, "frequency2.safetensors"))
        assert {n: m.fingerprint for n, m in fitted.compression.mappings.items()} == {
            n: m.fingerprint for n, m in written.items()}
        # `--budget-split access` from the shares: the counts summed across the ranks split the bytes as one
        # process splits them from the whole profiles.
        split = fit_mappings(data.tables, share_tables(data.train, data.tables, 4, 0), "frequency", compression=2,
                             optimizer="rowwise_adagrad", seed=0, num_buckets=4, budget_split="access")
        want, vocabularies = table_budgets(data.tables, profile_tables(data.train, data.tables), compression=2,
                                           optimizer="rowwise_adagrad", budget_split="access")
        assert split.budgets == {n: b.budget_bytes for n, b in want.items()} != fitted.budgets
        assert set(vocabularies) <= set(split.compression.mappings)
        # `lhf train --per-table`'s path: every rank scores its slice of the validation split and all make one
        # choice per table (a rank with other mappings could not train with the others).
        profiles = profile_tables(data.train, data.tables)
        learned = learn_model(data.train, data.tables, profiles, dim=4, train_config=TrainConfig(batch_size=128,
                                                                                                 progress=False))
        fitted, chosen = fit_per_table(learned, data.validation, data.tables, profiles, compression=2,
                                       optimizer="rowwise_adagrad")
        every = [None] * world_size
        dist.all_gather_object(every, (chosen, {n: m.fingerprint for n, m in fitted.compression.mappings.items()}))
        assert chosen and all(e == every[0] for e in every), every
        # From each rank's shares of the profiles (`lhf train --per-table --num-buckets 4` on 2 ranks): the rows
        # summed across the ranks are the whole profile's, and the choice and the mappings are the same.
        shares = share_tables(data.train, data.tables, 4, 0)
        by_shares, chosen_by_shares = fit_per_table(learned, data.validation, data.tables, shares, compression=2,
                                                    optimizer="rowwise_adagrad", num_buckets=4)
        by_whole, chosen_by_whole = fit_per_table(learned, data.validation, data.tables, profiles, compression=2,
                                                  optimizer="rowwise_adagrad", num_buckets=4)
        assert chosen_by_shares == chosen_by_whole
        assert {n: m.fingerprint for n, m in by_shares.compression.mappings.items()} == {
            n: m.fingerprint for n, m in by_whole.compression.mappings.items()}
        name = sorted(chosen_by_whole)[0]
        mapping = by_whole.compression.mappings[name]
        assert torch.allclose(collided_rows(learned, name, shares[name], mapping),
                              collided_rows(learned, name, profiles[name], mapping), atol=1e-6)
        _distributed_fit_checks(rank, world_size)
    finally:
        dist.destroy_process_group()


@settings(max_examples=100, deadline=None)
@given(runs=st.lists(st.lists(st.tuples(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(1, 1 << 40)), max_size=30),
                     min_size=1, max_size=4))
def test_received_pairs_merge_into_one_profile(runs):
    """What a rank receives (each rank's sorted ids with counts, end to end) sums to each id once, exactly."""
    pairs = [p for run in runs for p in sorted(dict(run).items())]
    ids = np.array([i for i, _ in pairs], np.int64)
    counts = np.array([c for _, c in pairs], np.int64)
    merged = _summed_by_id(ids, counts)
    want = {}
    for i, c in pairs:
        want[i] = want.get(i, 0) + c
    assert merged.ids.tolist() == sorted(want) and merged.counts.tolist() == [want[i] for i in sorted(want)]
    assert merged.total == sum(want.values())


class DistributedFitTest(MultiProcessTestBase):
    def test_distributed_fit_and_cli_on_two_ranks_equal_one_process(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-distfit-")
        try:
            assert main(["profile", *CLI_DATA, "--out", os.path.join(path, "p1.safetensors")]) == 0
            one, _ = load_profiles(os.path.join(path, "p1.safetensors"), 8)
            rng = np.random.default_rng(0)  # stand-in learned embeddings of every profiled id
            save_embeddings(os.path.join(path, "e.safetensors"), {
                name: IdEmbeddings(p.ids, torch.from_numpy(rng.standard_normal((p.num_ids, 4)).astype(np.float32)))
                for name, p in one.items() if p.num_ids})
            self._run_multi_process_test(callable=_worker, world_size=2, path=path)
            two, _ = load_profiles(os.path.join(path, "p2.safetensors"), 8)
            assert one.keys() == two.keys()
            for name in one:
                assert np.array_equal(one[name].ids, two[name].ids), name
                assert np.array_equal(one[name].counts, two[name].counts) and one[name].total == two[name].total
            for method in CLI_METHODS:
                printed = _fit_output(path, "p1.safetensors", method, f"{method}1.safetensors")
                assert "x smaller" in printed, printed
                with open(os.path.join(path, f"{method}2.txt")) as f:
                    assert f.read().replace(f"{method}2", f"{method}1") == printed, method
                m1 = load_mappings(os.path.join(path, f"{method}1.safetensors"))
                m2 = load_mappings(os.path.join(path, f"{method}2.safetensors"))
                assert {n: m.fingerprint for n, m in m1.items()} == {n: m.fingerprint for n, m in m2.items()}, method
                assert any(m.num_buckets == 4 for m in m2.values()), method
        finally:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
