"""The sharded learned-hash EBC on 2 ranks (gloo) against the unsharded module.

Each test spawns one 2-process job (about 10 s of start-up) and runs several checks in it. Workers
are module-level functions: TorchRec's harness uses the spawn start method.
"""

import gc
import shutil
import tempfile
import unittest
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise, construct_module_sharding_plan, data_parallel, row_wise, table_row_wise, table_wise,
)
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase
from torchrec.distributed.types import ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lh_dist_helpers import (
    B_LOCAL, DIM, FEATURES, LR, TABLES, SparseOnly, copy_into_shards, global_batch, make_mappings, make_module,
    max_shard_diff, raised_by, rank_batch, run_on_rank, table_keys,
)
from lhf_torchrec import fit_mapping
from lhf_torchrec.distributed import LearnedHashEBCSharder, ShardedRemappedEBC

pytestmark = pytest.mark.distributed

SHARDING_CASES = [
    # (sharding type, weighted KJT)
    ("table_wise", False),
    ("column_wise", False),
    ("table_column_wise", False),
    ("row_wise", False),
    ("table_row_wise", False),
    ("data_parallel", False),
    ("row_wise", True),
    ("table_wise", True),
]


def _module_plan(sharding_type: str, module, sharder, world_size: int, shift: int = 0):
    """Every table planned ``sharding_type``; a table-wise table ``i`` on rank ``(i + shift) % world_size``."""
    per_table = {}
    for i, t in enumerate(TABLES):
        rank = (i + shift) % world_size
        per_table[t.name] = {
            "table_wise": lambda: table_wise(rank=rank, compute_kernel="fused"),
            "column_wise": lambda: column_wise(ranks=list(range(world_size)), compute_kernel="fused"),
            "table_column_wise": lambda: column_wise(ranks=[rank, rank], compute_kernel="fused"),
            "row_wise": lambda: row_wise(compute_kernel="fused"),
            "table_row_wise": lambda: table_row_wise(host_index=0),
            "data_parallel": data_parallel,
        }[sharding_type]()
    plan = construct_module_sharding_plan(
        module, per_param_sharding=per_table, sharder=sharder, local_size=world_size, world_size=world_size,
        device_type="cpu",
    )
    for ps in plan.values():
        if sharding_type == "table_column_wise":
            ps.sharding_type = "table_column_wise"  # column shards of a table kept on one rank
        if sharding_type == "table_row_wise":
            ps.compute_kernel = "fused"  # table_row_wise() takes no kernel
    kernel = "dense" if sharding_type == "data_parallel" else "fused"
    assert {(ps.sharding_type, ps.compute_kernel) for ps in plan.values()} == {(sharding_type, kernel)}, plan
    return plan


def _check_one_sharding(sharding_type: str, weighted: bool, rank: int, world_size: int) -> None:
    label = f"{sharding_type}{' weighted' if weighted else ''}"
    reference = SparseOnly(make_module("cpu", seed=0, is_weighted=weighted))
    start = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    sharder = LearnedHashEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    model = SparseOnly(make_module("meta", seed=1, is_weighted=weighted))
    unsharded_mappings = {t: weakref.ref(m) for t, m in model.sparse.mappings.items()}
    plan = ShardingPlan({"sparse": _module_plan(sharding_type, model.sparse, sharder, world_size)})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    assert isinstance(dmp.module.sparse, ShardedRemappedEBC), label
    keys = table_keys("sparse.")
    copy_into_shards(dmp.state_dict(), start, keys)

    # Bad input is refused before the all-to-all, naming the feature and its table, also for the
    # tables remapped on their owner.
    batch = rank_batch(rank, weighted=weighted)
    lacking = KeyedJaggedTensor.from_jt_dict({f: batch[f] for f in FEATURES if f != "f_d"})
    error = raised_by(lambda: dmp(lacking))
    assert isinstance(error, KeyError) and "lacks features f_d (table t_dbl)" in str(error), f"{label}: {error!r}"

    # Forward: this rank's batch against its slice of the reference's global batch.
    g = torch.Generator().manual_seed(7)
    loss_weights = [{f: torch.randn(B_LOCAL, DIM, generator=g) for f in FEATURES} for _ in range(world_size)]
    out = dmp(rank_batch(rank, weighted=weighted))
    out = (out.wait() if hasattr(out, "wait") else out).to_dict()
    expected = reference(global_batch(world_size, weighted=weighted)).to_dict()
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    assert sorted(out) == sorted(expected), label
    for f in FEATURES:
        diff = (out[f] - expected[f][mine]).abs().max().item()
        assert diff < 1e-5, f"{label}: forward of {f} differs from the unsharded module by {diff}"
        assert out[f].abs().sum() > 0, f"{label}: {f} pooled nothing"

    # Backward and one step. Every sharding type averages gradients over ranks, like DDP: the
    # reference takes the step on the mean of the ranks' losses.
    dense_opt = None
    if sharding_type == "data_parallel":
        dense_opt = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    sum((out[f] * loss_weights[rank][f]).sum() for f in FEATURES).backward()
    if dense_opt is not None:
        dense_opt.step()
    ref_loss = sum((expected[f][r * B_LOCAL:(r + 1) * B_LOCAL] * loss_weights[r][f]).sum()
                   for r in range(world_size) for f in FEATURES)
    (ref_loss / world_size).backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    updated = reference.state_dict()
    for key in keys:
        moved = (updated[key] - start[key]).abs().max().item()
        assert moved > 0, f"{label}: the reference step did not touch {key}"
    diff = max_shard_diff(dmp.state_dict(), updated, keys)
    assert diff < 1e-5, f"{label}: tables after one step differ from the unsharded module's by {diff}"

    # The mappings are untouched by the step and still the reference's: replicated, except that a
    # table planned table-wise keeps its mapping on its owner only (the other ranks dropped it).
    state = dmp.state_dict()
    held = dict(dmp.module.sparse.remapper.named_buffers(prefix="sparse.remapper"))
    owners = {t: ps.ranks[0] for t, ps in plan.plan["sparse"].items() if ps.sharding_type == "table_wise"}
    for name, buf in reference.named_buffers():
        table = name.split(".")[3]  # sparse.remapper.mappings.<table>.<buffer>
        if owners.get(table, rank) == rank:
            assert torch.equal(state[name], buf) and torch.equal(held[name], buf), f"{label}: mapping buffer {name}"
        else:
            assert name not in state and name not in held, f"{label}: rank {rank} keeps {name} of a table it does not own"
            assert f"sparse.remapper.mappings.{table}._extra_state" not in state, label
    mappings = make_mappings()
    kept = {t for t in mappings if owners.get(t, rank) == rank}
    gc.collect()
    freed = {t for t, ref in unsharded_mappings.items() if ref() is None}
    assert freed == set(mappings) - kept, f"{label}: rank {rank} freed the mappings of {sorted(freed)}"
    held_bytes = sum(b.numel() * b.element_size() for b in held.values())
    assert held_bytes == sum(m.nbytes for t, m in mappings.items() if t in kept), label
    if sharding_type == "table_wise":
        assert kept != set(mappings), f"{label}: rank {rank} owns every mapped table, the test shows nothing"


def _sharding_types_match_unsharded(rank: int, world_size: int, cases=SHARDING_CASES) -> None:
    for sharding_type, weighted in cases:
        _check_one_sharding(sharding_type, weighted, rank, world_size)
        dist.barrier()


def _mappings_differing_across_ranks_raise(rank: int, world_size: int) -> None:
    # Rank 1's t_hash mapping has another seed; its t_freq mapping was fitted on other data.
    mappings = make_mappings()
    if rank == 1:
        mappings["t_hash"] = fit_mapping(None, method="hash", num_rows=32, seed=99, table="t_hash")
        mappings["t_freq"] = fit_mapping(torch.arange(3000) % 97, method="frequency", num_rows=48, seed=1, table="t_freq")
    sharder = LearnedHashEBCSharder()
    model = SparseOnly(make_module("meta", mappings=mappings))
    plan = ShardingPlan({"sparse": _module_plan("row_wise", model.sparse, sharder, world_size)})
    error = raised_by(lambda: DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder]))
    message = str(error)
    assert isinstance(error, RuntimeError), repr(error)
    assert "'learned_hash' remaps differ across ranks" in message, message
    assert "rank 1: t_freq, t_hash" in message, message
    assert "t_dbl" not in message and "t_sparse" not in message, message


def _sharded(sharding_type: str, world_size: int, seed: int, shift: int = 0):
    sharder = LearnedHashEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    model = SparseOnly(make_module("meta", seed=seed))
    plan = ShardingPlan({"sparse": _module_plan(sharding_type, model.sparse, sharder, world_size, shift)})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    return dmp, plan


def _pooled(dmp, rank: int) -> torch.Tensor:
    """This rank's pooled output, features in a fixed order (sharding may reorder the KeyedTensor's keys)."""
    out = dmp(rank_batch(rank, seed=3))
    pooled = (out.wait() if hasattr(out, "wait") else out).to_dict()
    return torch.cat([pooled[f] for f in FEATURES], dim=1).detach()


def _table_wise_checkpoint_moves_between_owners(rank: int, world_size: int, path: str) -> None:
    reference = SparseOnly(make_module("cpu", seed=0))
    mapping_state = {k: v for k, v in reference.state_dict().items() if ".remapper." in k}
    saved, plan = _sharded("table_wise", world_size, seed=1)
    copy_into_shards(saved.state_dict(), reference.state_dict(), table_keys("sparse."))
    expected = _pooled(saved, rank)
    state = saved.state_dict()
    owned = {k for k in mapping_state if plan.plan["sparse"][k.split(".")[3]].ranks[0] == rank}
    assert owned and owned != set(mapping_state), owned
    assert set(mapping_state) & set(state) == owned
    dcp.save(state, checkpoint_id=path)

    # Every mapping tensor is in the checkpoint once, written by the one rank that held it.
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for key, value in mapping_state.items():
        assert key in metadata, f"{key} is missing from the checkpoint"
        assert len(metadata[key].chunks) == 1 and list(metadata[key].size) == list(value.shape), metadata[key]

    # Loaded with the owners swapped (each rank now holds the mappings the other one wrote), and
    # row-wise (every rank holds every mapping): the same outputs, the reference's mappings.
    for sharding_type, shift in (("table_wise", 1), ("row_wise", 0)):
        fresh, fresh_plan = _sharded(sharding_type, world_size, seed=5, shift=shift)
        assert not torch.allclose(_pooled(fresh, rank), expected), "a fresh model already gives the saved outputs"
        state = fresh.state_dict()
        dcp.load(state, checkpoint_id=path)
        fresh.load_state_dict(state)
        loaded = {k: v for k, v in fresh.state_dict().items() if ".remapper." in k}
        if sharding_type == "table_wise":
            assert set(loaded).isdisjoint(owned), f"rank {rank} still holds the mappings it owned before the move"
        else:
            assert set(loaded) == set(mapping_state), sorted(loaded)
        for key, value in loaded.items():
            assert torch.equal(value, mapping_state[key]), key
        torch.testing.assert_close(_pooled(fresh, rank), expected, atol=1e-6, rtol=0, msg=sharding_type)
        dist.barrier()


class ShardedLearnedHashEBCTest(MultiProcessTestBase):
    def test_every_sharding_type_matches_the_unsharded_module(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=_sharding_types_match_unsharded, world_size=2)

    def test_every_sharding_type_on_four_ranks(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=_sharding_types_match_unsharded, world_size=4)

    def test_table_wise_mappings_checkpoint_once_and_load_on_other_owners(self) -> None:
        path = tempfile.mkdtemp(prefix="lhf-dcp-tw-")
        try:
            self._run_multi_process_test(callable=run_on_rank, check=_table_wise_checkpoint_moves_between_owners,
                                         world_size=2, path=path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def test_mappings_that_differ_across_ranks_fail_at_shard_time(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=_mappings_differing_across_ranks_raise, world_size=2)


if __name__ == "__main__":
    unittest.main()
