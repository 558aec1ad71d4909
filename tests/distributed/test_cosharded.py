"""Co-sharded mappings (TorchRec's managed-collision engine, row-wise) on 2 and 4 gloo ranks, against
the unsharded module: forward, backward and a fused step; per-rank state; DCP resharding 2 -> 1,
1 -> 2 and 4 -> 2; serving from the co-sharded checkpoint; world sizes that cut a bucket are refused.

One spawn per world size does all its checks (a spawn costs ~10 s). Workers are module-level: the
harness spawns.
"""

import os
import shutil
import tempfile
import unittest
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from lh_dist_helpers import SparseOnly, copy_into_shards, local_pieces, max_shard_diff, raised_by, run_on_rank
from lhf_torchrec import fit_mapping
from lhf_torchrec.distributed import CoShardedEBCSharder, LearnedHashEBCSharder
from lhf_torchrec.modules import CoShardedLearnedHashEBC, quantize_learned_hash_ebc

pytestmark = pytest.mark.distributed

LR = 0.5
B_LOCAL = 4
BUCKETS = 4
TABLES = [
    # Two features share t_two; t_one is hashed only; t_dbl (double hashing) keeps a replicated remap.
    EmbeddingBagConfig(name="t_two", num_embeddings=5000, embedding_dim=8, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t_one", num_embeddings=3000, embedding_dim=4, feature_names=["c"]),
    EmbeddingBagConfig(name="t_dbl", num_embeddings=900, embedding_dim=8, feature_names=["d"]),
]
FEATURES = ["a", "b", "c", "d"]
COSHARDED = ["t_two", "t_one"]


def _mappings(num_buckets: int = BUCKETS):
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.zipf(1.3, 6000) % 5000, rng.integers(-(1 << 62), 1 << 62, 300)])
    return {
        "t_two": fit_mapping(ids, method="frequency", num_rows=16 * num_buckets, num_buckets=num_buckets, table="t_two"),
        "t_one": fit_mapping(None, method="hash", num_rows=12 * num_buckets, num_buckets=num_buckets, seed=3,
                             table="t_one"),
        "t_dbl": fit_mapping(rng.zipf(1.3, 3000) % 900, method="double_hash", num_rows=8 * num_buckets,
                             num_buckets=num_buckets, table="t_dbl"),
    }


def _module(device: str, seed: int, mappings=None) -> SparseOnly:
    torch.manual_seed(seed)
    return SparseOnly(CoShardedLearnedHashEBC(TABLES, mappings or _mappings(), device=torch.device(device)))


def _batch(rank: int, seed: int = 0) -> KeyedJaggedTensor:
    """Hot ids, ids of the whole 64-bit range, empty bags."""
    g = torch.Generator().manual_seed(100 * seed + rank)
    lengths = torch.randint(0, 5, (len(FEATURES) * B_LOCAL,), generator=g)
    lengths[rank] = 0
    lengths[B_LOCAL - 1::B_LOCAL] = 2  # every feature pools something on every rank
    n = int(lengths.sum())
    values = torch.where(torch.rand(n, generator=g) < 0.7, torch.randint(0, 60, (n,), generator=g),
                         torch.randint(-(1 << 63), (1 << 63) - 1, (n,), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def _global_batch(world_size: int, seed: int = 0) -> KeyedJaggedTensor:
    per_rank = [_batch(r, seed) for r in range(world_size)]
    jts = [[kjt[f] for kjt in per_rank] for f in FEATURES]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat([jt.values() for f in jts for jt in f]),
        lengths=torch.cat([jt.lengths() for f in jts for jt in f]))


def _sharders():
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    return CoShardedEBCSharder(fused_params=fused), LearnedHashEBCSharder(fused_params=fused)


def _shard(model: SparseOnly, world_size: int, env=None) -> DistributedModelParallel:
    cosharder, replicated = _sharders()
    plan = {"sparse.cosharded": construct_module_sharding_plan(
        model.sparse.cosharded, per_param_sharding={t: row_wise(compute_kernel="fused") for t in COSHARDED},
        sharder=cosharder, local_size=world_size, world_size=world_size, device_type="cpu")}
    plan["sparse.replicated"] = construct_module_sharding_plan(
        model.sparse.replicated, per_param_sharding={"t_dbl": table_wise(rank=world_size - 1, compute_kernel="fused")},
        sharder=replicated, local_size=world_size, world_size=world_size, device_type="cpu")
    return DistributedModelParallel(model, env=env, device=torch.device("cpu"), plan=ShardingPlan(plan),
                                    sharders=[cosharder, replicated])


def _weight_keys() -> List[str]:
    return [f"sparse.cosharded._embedding_module.embedding_bags.{t}.weight" for t in COSHARDED] + [
        "sparse.replicated.ebc.embedding_bags.t_dbl.weight"]


def _remaps(model) -> Dict:
    sparse = model.module.sparse if isinstance(model, DistributedModelParallel) else model.sparse
    return dict(sparse.cosharded._managed_collision_collection._managed_collision_modules.items())


def _forget_remaps(model) -> None:
    """Empties every co-sharded remap this rank holds: only a load can bring the mapping back."""
    for remap in _remaps(model).values():
        remap._slots.fill_(-1)
        remap._hash_regions.zero_()


def _pooled(out) -> Dict[str, torch.Tensor]:
    return (out.wait() if hasattr(out, "wait") else out).to_dict()


def _check_training_step(rank: int, world_size: int) -> Tuple[Dict[str, torch.Tensor], DistributedModelParallel]:
    """Sharded forward, backward and one fused SGD step equal the unsharded module's; returns the
    reference's updated state and the sharded model."""
    reference = _module("cpu", seed=0)
    start = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    dmp = _shard(_module("meta", seed=1), world_size)
    copy_into_shards(dmp.state_dict(), start, _weight_keys())

    out = _pooled(dmp(_batch(rank)))
    expected = reference(_global_batch(world_size)).to_dict()
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    assert sorted(out) == FEATURES, out.keys()
    for f in FEATURES:
        assert torch.allclose(out[f], expected[f][mine], atol=1e-6), f"{f}: {(out[f] - expected[f][mine]).abs().max()}"
        assert out[f].abs().sum() > 0, f"{f}: pooled nothing"

    g = torch.Generator().manual_seed(7)
    loss_weights = [{f: torch.randn(B_LOCAL, expected[f].shape[1], generator=g) for f in FEATURES}
                    for _ in range(world_size)]
    sum((out[f] * loss_weights[rank][f]).sum() for f in FEATURES).backward()
    reference_loss = sum((expected[f][r * B_LOCAL:(r + 1) * B_LOCAL] * loss_weights[r][f]).sum()
                         for r in range(world_size) for f in FEATURES)
    (reference_loss / world_size).backward()  # the sharded step averages gradients over ranks
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    updated = reference.state_dict()
    for key in _weight_keys():
        assert (updated[key] - start[key]).abs().max() > 0, f"the step did not touch {key}"
    diff = max_shard_diff(dmp.state_dict(), updated, _weight_keys())
    assert diff < 1e-5, f"tables after one step differ from the unsharded module's by {diff}"
    after = _pooled(dmp(_batch(rank, seed=1)))
    again = reference(_global_batch(world_size, seed=1)).to_dict()
    assert all(torch.allclose(after[f], again[f][mine], atol=1e-5) for f in FEATURES), "forward after the step"
    return {k: v.detach().clone() for k, v in updated.items()}, dmp


def _check_rank_state(dmp: DistributedModelParallel, rank: int, world_size: int) -> None:
    """Each rank holds the rows and entries of its buckets only."""
    mappings = _mappings()
    per_rank = BUCKETS // world_size
    for table, remap in _remaps(dmp).items():
        mapping = mappings[table]
        rows = mapping.num_rows // world_size
        assert (remap.first_bucket, remap.end_bucket) == (rank * per_rank, (rank + 1) * per_rank), table
        assert remap._keys.shape == (rows, remap.slots_per_row) and remap._hash_regions.shape == (rows,), table
        keys, slots = remap._keys.view(-1), remap._slots.view(-1)
        held = int(keys[slots >= 0].unique().numel())
        assert held == int(mapping.bucket_entry_counts()[rank * per_rank:(rank + 1) * per_rank].sum()), table
        assert held < mapping.num_entries or mapping.num_entries == 0, table
        state = dmp.state_dict()[f"sparse.cosharded._managed_collision_collection._managed_collision_modules.{table}._keys"]
        assert tuple(state.size()) == (mapping.num_rows, remap.slots_per_row)
        assert [offsets[0] for offsets, _ in local_pieces(state)] == [rank * rows]


def _check_four_to_two(rank: int, saved: str, expected: SparseOnly) -> None:
    """DCP 4 -> 2: a 2-rank model on a subgroup (its remaps emptied) loads the 4-rank checkpoint."""
    pair = dist.new_group([0, 1])
    if rank < 2:
        half = _shard(_module("meta", seed=7), 2, env=ShardingEnv.from_process_group(pair))
        _forget_remaps(half)
        state = half.state_dict()
        dcp.load(state, checkpoint_id=saved, process_group=pair)
        half.load_state_dict(state)
        out = _pooled(half(_batch(rank, seed=9)))
        reference = expected(_global_batch(2, seed=9)).to_dict()
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        worst = max((out[f] - reference[f][mine]).abs().max().item() for f in FEATURES)
        assert worst < 1e-6, f"4 -> 2 outputs differ by {worst}"
        assert _remaps(half)["t_two"]._keys.shape[0] == _mappings()["t_two"].num_rows // 2
    dist.barrier()


def _check_one_rank_round_trip(rank: int, world_size: int, saved: str, path: str, expected: SparseOnly) -> None:
    """DCP W -> 1 into the unsharded module (its remaps emptied first), serving from it, and its
    checkpoint 1 -> W into a freshly sharded model."""
    probe = _global_batch(world_size, seed=9)
    expected_out = expected(probe).to_dict()
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    if rank == 0:
        single = _module("cpu", seed=5)
        _forget_remaps(single)
        state = single.state_dict()
        dcp.load(state, checkpoint_id=saved, no_dist=True)
        single.load_state_dict(state)
        out = single(probe).to_dict()
        assert all(torch.equal(out[f], expected_out[f]) for f in FEATURES), f"{world_size} -> 1 outputs differ"

        # Serving from the co-sharded checkpoint: the quantized module. Bucketed mappings have a hash
        # region per bucket, which the kernel's folded array cannot express: they stay in front.
        served = single.sparse.to_learned_hash_ebc()
        for fold in ("none", "all"):
            quantized = quantize_learned_hash_ebc(served, dtype=torch.float16, fold_remap=fold)
            assert quantized.folded_tables == [] and sorted(quantized.remapper.mappings) == sorted(_mappings())
            got = quantized(probe).to_dict()
            for f in FEATURES:
                assert torch.allclose(got[f], expected_out[f], atol=2e-2, rtol=1e-2), f"served ({fold}) {f}"
        dcp.save(single.state_dict(), checkpoint_id=os.path.join(path, "one_rank"), no_dist=True)
    dist.barrier()

    # A freshly sharded model (other weights, remaps emptied) loads the 1-rank checkpoint.
    fresh = _shard(_module("meta", seed=6), world_size)
    _forget_remaps(fresh)
    before = _pooled(fresh(_batch(rank, seed=9)))
    assert not all(torch.allclose(before[f], expected_out[f][mine]) for f in FEATURES)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(path, "one_rank"))
    fresh.load_state_dict(state)
    after = _pooled(fresh(_batch(rank, seed=9)))
    worst = max((after[f] - expected_out[f][mine]).abs().max().item() for f in FEATURES)
    assert worst < 1e-6, f"1 -> {world_size} outputs differ by {worst}"  # sharded kernels sum in another order


def _cosharded_checks(rank: int, world_size: int, path: str) -> None:
    trained, dmp = _check_training_step(rank, world_size)
    copy_into_shards(dmp.state_dict(), trained, _weight_keys())  # exactly the reference's weights
    _check_rank_state(dmp, rank, world_size)
    expected = _module("cpu", seed=0)
    expected.load_state_dict(trained)

    saved = os.path.join(path, "all_ranks")
    dcp.save(dmp.state_dict(), checkpoint_id=saved)
    dist.barrier()
    if world_size == 4:
        _check_four_to_two(rank, saved, expected)
    else:
        _check_one_rank_round_trip(rank, world_size, saved, path, expected)

    # A world size that does not divide the bucket count is refused, naming B and what works.
    three = _mappings(num_buckets=3)
    error = raised_by(lambda: _shard(_module("meta", seed=0, mappings=three), world_size))
    assert isinstance(error, ValueError), repr(error)
    assert f"table 't_two': its mapping has 3 buckets, which {world_size} ranks cannot share whole" in str(error), error
    assert "co-sharded world sizes for it: [1, 3]" in str(error), error


class CoShardedTest(MultiProcessTestBase):
    def test_cosharded_training_checkpoints_and_serving_on_two_ranks(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-cosharded-")
        try:
            self._run_multi_process_test(callable=run_on_rank, check=_cosharded_checks, world_size=2, path=path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def test_cosharded_training_and_resharding_on_four_ranks(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-cosharded-")
        try:
            self._run_multi_process_test(callable=run_on_rank, check=_cosharded_checks, world_size=4, path=path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
