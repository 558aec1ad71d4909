"""The planner's per-rank memory against the tensors a 2-rank gloo job really allocates.

Rank 0 plans (``collective_plan``) and broadcasts its per-rank estimate; every rank shards the model
with that plan and measures its own tensors. Compared like with like:

* tables: the planner's weight term vs the local shards of the table weights (``state_dict``);
* optimizer: the planner's optimizer term vs the fused optimizer's state tensors on the rank;
* mappings: the reservation vs the mapping buffers each rank holds, by distinct storage once the
  fused remap packed them (its records take a byte per slot more for 3-byte rows). A table-wise table's mapping
  lives on its owner only (the sharder remaps it there), but the reservation still counts it on
  every rank: the check adds it back on the other ranks, so the planner's over-estimate is exactly
  that (until the planner counts it with the owner's shard).

Left out on purpose: the planner's ``io`` term (input/output buffers it expects per batch, not
allocated at shard time) and the base reservation (KJT/dense estimates).
"""

import datetime
import os
import unittest
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase

# (name, raw ids, dim, optimizer, sharding type, rows after compression or None for no mapping).
# FBGEMM's CPU kernels support SGD and (row-wise) Adagrad, not Adam.
TABLES = [
    ("t_rw", 400_000, 16, "rowwise_adagrad", "row_wise", 40_000),
    ("t_tw", 200_000, 32, "adagrad", "table_wise", 20_000),
    ("t_cw", 60_000, 64, "rowwise_adagrad", "column_wise", 6_000),
    ("t_twrw", 10_000, 16, "adagrad", "table_row_wise", 1_000),
    ("t_plain", 5_000, 8, "sgd", "table_wise", None),
]
TOLERANCE = 0.05


def _nbytes(tensor: torch.Tensor) -> int:
    if isinstance(tensor, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
    return tensor.numel() * tensor.element_size()


def _build_model():
    from torchrec import EmbeddingBagConfig
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from lhf_torchrec import fit_mapping
    from lhf_torchrec.mapping.budget import OPTIMIZERS
    from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection

    rng = np.random.default_rng(0)
    configs = [
        EmbeddingBagConfig(name=name, num_embeddings=ids, embedding_dim=dim, feature_names=[f"f_{name}"])
        for name, ids, dim, *_ in TABLES
    ]
    mappings = {
        name: fit_mapping(rng.zipf(1.2, 30_000) % ids, method="frequency", num_rows=rows, table=name)
        for name, ids, _, _, _, rows in TABLES
        if rows is not None
    }
    model = LearnedHashEmbeddingBagCollection(configs, mappings, device=torch.device("meta"))
    for name, _, _, optimizer, _, _ in TABLES:
        apply_optimizer_in_backward(OPTIMIZERS[optimizer].cls, [model.ebc.embedding_bags[name].weight], {"lr": 0.05})
    return model


def _estimate_matches_allocation(rank: int, world_size: int) -> None:
    import logging

    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.planner.stats import NoopEmbeddingStats
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

    from lhf_torchrec.distributed.planner import LearnedHashPlanner
    from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        model = _build_model()
        topology = TopologyFactory.create_topology(
            TrainerConfig(world_size=world_size, local_world_size=world_size),
            HardwareConfig(ddr_cap_bytes=256 * 1024**2),
            KernelConfig(compute_device="cpu"),
        )
        constraints = {
            name: ParameterConstraints(sharding_types=[kind], compute_kernels=["fused"])
            for name, _, _, _, kind, _ in TABLES
        }
        planner = LearnedHashPlanner(
            topology, 32, base_reservation=FixedPercentageStorageReservation(0.0), constraints=constraints,
            stats=[NoopEmbeddingStats()], debug=False,
        )
        sharders = [LearnedHashEBCSharder()]
        plan = planner.collective_plan(model, sharders, dist.group.WORLD)
        estimate: List = [planner.rank_memory() if rank == 0 else None]
        dist.broadcast_object_list(estimate, src=0)
        expected = estimate[0][rank]
        chosen = plan.plan[""]
        assert {name: chosen[name].sharding_type for name, *_ in TABLES} == {n: k for n, _, _, _, k, _ in TABLES}

        dmp = DistributedModelParallel(model, env=None, device=torch.device("cpu"), plan=plan, sharders=sharders)
        # The remap as it runs: the fused remap packs the mappings' buffers (int64 records of 3-byte rows
        # take a byte per slot more than their elements), so the mappings count by distinct storage.
        for module in dmp.modules():
            if hasattr(module, "fused_mappings"):
                module.fused_mappings()
        remap_storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                          for name, b in dmp.named_buffers() if ".remapper." in f".{name}"}
        state = dmp.state_dict()
        actual: Dict[str, int] = {
            "tables": sum(_nbytes(state[f"ebc.embedding_bags.{name}.weight"]) for name, *_ in TABLES),
            "optimizer": sum(
                _nbytes(t)
                for per_param in dmp.fused_optimizer.state_dict()["state"].values()
                for t in per_param.values()
                if isinstance(t, torch.Tensor)
            ),
            "mappings": sum(remap_storages.values()),
        }
        planned = {"tables": expected.tables, "optimizer": expected.optimizer, "mappings": expected.mappings}
        not_owned = [name for name, ps in chosen.items() if ps.sharding_type == "table_wise" and ps.ranks != [rank]]
        held_elsewhere = sum(m.nbytes for name, m in _build_model().mappings.items() if name in not_owned)
        assert (held_elsewhere > 0) == (rank != chosen["t_tw"].ranks[0]), (rank, not_owned)
        actual["mappings"] += held_elsewhere
        report = f"rank {rank}: planner {planned} vs allocated {actual}"
        assert actual["tables"] > 0 and actual["optimizer"] > 0 and actual["mappings"] > 0, report
        for term in planned:
            assert abs(planned[term] - actual[term]) <= TOLERANCE * actual[term], report
        assert abs(sum(planned.values()) - sum(actual.values())) <= TOLERANCE * sum(actual.values()), report
        # Different sharding types put different amounts on each rank: the check is per rank.
        totals = [None] * world_size
        dist.all_gather_object(totals, actual["tables"])
        assert totals[0] != totals[1], totals
    finally:
        dist.destroy_process_group()


class PlannerEstimateTest(MultiProcessTestBase):
    def test_per_rank_estimate_matches_allocated_tensors(self) -> None:
        self._run_multi_process_test(callable=_estimate_matches_allocation, world_size=2)


if __name__ == "__main__":
    unittest.main()
