"""The learned-hash EBC in a planned, pipelined and checkpointed model on 2 ranks (gloo).

Each test spawns one 2-process job; workers are module-level functions (spawn start method).
"""

import os
import shutil
import tempfile
import unittest

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.datasets.utils import Batch
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lh_dist_helpers import (
    B_LOCAL, TABLES, Ranker, copy_into_shards, global_batch, local_pieces, make_batches, make_mappings, make_module,
    raised_by, run_on_rank, table_keys,
)
from lhf_torchrec import fit_mapping
from lhf_torchrec.distributed import LearnedHashEBCSharder, ShardedRemappedEBC

pytestmark = pytest.mark.distributed

STEPS = 6
LR = 0.1


# row_wise and table_row_wise are what the sharder adds on CPU: the planner must accept them.
# t_sparse's mapping lives on the rank that owns the table (table-wise), remapped after the all-to-all.
KINDS = {"t_freq": "row_wise", "t_dbl": "table_row_wise", "t_hash": "column_wise", "t_sparse": "table_wise"}
OTHER_KINDS = {"t_freq": "column_wise", "t_dbl": "table_wise", "t_hash": "row_wise", "t_sparse": "row_wise"}


def _planned_model(world_size: int, seed: int, mappings=None, kinds=KINDS):
    """A Ranker whose learned-hash EBC is placed by the planner, with the sharding types ``kinds`` forced."""
    sharder = LearnedHashEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    constraints = {table: ParameterConstraints(sharding_types=[kind]) for table, kind in kinds.items()}
    model = Ranker(make_module("meta", seed=seed, mappings=mappings), seed=seed)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device="cpu"), batch_size=B_LOCAL, constraints=constraints
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=LR))
    return dmp, plan, CombinedOptimizer([dmp.fused_optimizer, dense])


def _load_reference_weights(dmp, reference) -> None:
    copy_into_shards(dmp.state_dict(), reference.state_dict(), table_keys("sparse.") + ["over.weight", "over.bias"])


def _train(dmp, opt, batches):
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss, _ = dmp(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _planner_and_pipeline(rank: int, world_size: int) -> None:
    reference = Ranker(make_module("cpu", seed=0), seed=0)
    dmp, plan, opt = _planned_model(world_size, seed=1)
    tables = plan.plan["sparse"]
    assert sorted(tables) == sorted(t.name for t in TABLES), plan
    kinds = {name: ps.sharding_type for name, ps in tables.items()}
    assert {t: kinds[t] for t in KINDS} == KINDS, kinds
    assert isinstance(dmp.module.sparse, ShardedRemappedEBC)
    _load_reference_weights(dmp, reference)

    # The planned model computes what the unsharded one computes on the global batch.
    batches = make_batches(rank, STEPS)
    _, (_, logits) = dmp(batches[0])
    gathered = [torch.zeros(B_LOCAL) for _ in range(world_size)]
    dist.all_gather(gathered, logits)
    firsts = [make_batches(r, 1)[0] for r in range(world_size)]
    _, (_, expected) = reference(Batch(
        dense_features=torch.cat([b.dense_features for b in firsts]),
        sparse_features=global_batch(world_size, seed=0),
        labels=torch.cat([b.labels for b in firsts]),
    ))
    diff = (torch.cat(gathered) - expected).abs().max().item()
    assert diff < 1e-5, f"the planned model differs from the unsharded one by {diff}"

    # TrainPipelineSparseDist on a twin gives the plain loop's losses, and it pipelines the wrapper.
    twin, _, twin_opt = _planned_model(world_size, seed=2)
    _load_reference_weights(twin, reference)
    plain_losses = _train(dmp, opt, batches)
    pipe = TrainPipelineSparseDist(twin, twin_opt, device=torch.device("cpu"))
    batch_iter = iter(make_batches(rank, STEPS))
    pipe_losses = [pipe.progress(batch_iter)[0].item() for _ in range(STEPS)]
    assert isinstance(raised_by(lambda: pipe.progress(batch_iter)), StopIteration)
    pipelined = [type(m).__name__ for m in pipe._pipelined_modules]
    assert pipelined == ["ShardedRemappedEBC"], pipelined
    assert len({round(x, 6) for x in plain_losses}) == STEPS, plain_losses  # it trains: losses move
    assert plain_losses == pytest.approx(pipe_losses, abs=1e-6), (plain_losses, pipe_losses)
    twin_state = twin.state_dict()
    for key, value in dmp.state_dict().items():
        for (_, a), (_, b) in zip(local_pieces(value), local_pieces(twin_state[key])):
            assert torch.allclose(a, b, atol=1e-6), key


def _load(dmp, checkpoint: str) -> None:
    """The documented way to restore: DCP loads in place, then load_state_dict checks the mappings."""
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    dmp.load_state_dict(state)


def _checkpoint_round_trip(rank: int, world_size: int, path: str) -> None:
    dmp, _, opt = _planned_model(world_size, seed=0)
    _load_reference_weights(dmp, Ranker(make_module("cpu", seed=0), seed=0))
    _train(dmp, opt, make_batches(rank, 2))
    probe = make_batches(rank, 1, seed=50)[0]
    _, (_, expected) = dmp(probe)
    saved = os.path.join(path, "checkpoint")
    state = dmp.state_dict()
    assert "sparse.remapper.mappings.t_freq.table" in state and "sparse.remapper.mappings.t_hash._extra_state" in state
    dcp.save(state, checkpoint_id=saved)

    # A freshly built sharded model (other initial weights, another plan) gives identical outputs once loaded.
    fresh, plan, _ = _planned_model(world_size, seed=5, kinds=OTHER_KINDS)
    assert {t: ps.sharding_type for t, ps in plan.plan["sparse"].items() if t in OTHER_KINDS} == OTHER_KINDS
    _, (_, before) = fresh(probe)
    assert not torch.allclose(before, expected), "a fresh model already gives the trained outputs"
    _load(fresh, saved)
    _, (_, after) = fresh(probe)
    assert torch.equal(after, expected), (after - expected).abs().max()

    # A module whose mapping has other rows than the checkpoint's: DCP refuses, naming the table.
    other_rows = make_mappings(hash_rows=24)
    mismatched, _, _ = _planned_model(world_size, seed=0, mappings=other_rows)
    error = raised_by(lambda: _load(mismatched, saved))
    assert "Size mismatch between saved torch.Size([32, 8]) and current: torch.Size([24, 8])" in str(error), error
    assert "sparse.ebc.embedding_bags.t_hash.weight" in str(error), error

    # Same shapes, another function (seed): only the mapping fingerprint can tell, and it does.
    other_seed = make_mappings()
    other_seed["t_hash"] = fit_mapping(None, method="hash", num_rows=32, seed=77, table="t_hash")
    mismatched, _, _ = _planned_model(world_size, seed=0, mappings=other_seed)
    error = raised_by(lambda: _load(mismatched, saved))
    assert isinstance(error, ValueError), repr(error)
    assert "table 't_hash': the mapping in the checkpoint" in str(error) and "num_rows=32" in str(error), error


class LearnedHashTrainingTest(MultiProcessTestBase):
    def test_planner_plan_and_train_pipeline(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=_planner_and_pipeline, world_size=2)

    def test_checkpoint_round_trip_and_mismatch(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-dcp-")
        try:
            self._run_multi_process_test(callable=run_on_rank, check=_checkpoint_round_trip, world_size=2, path=path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
