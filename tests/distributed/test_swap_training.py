"""A stock TorchRec DLRM, swapped by apply_learned_hashing, trains on 2 ranks (gloo).

Planner + DMP + TrainPipelineSparseDist, on a tiny deterministic dataset whose label is carried by
the ids: the loss must fall over a few epochs.
"""

import unittest

import numpy as np
import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.test_utils.multi_process import MultiProcessTestBase
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lh_dist_helpers import run_on_rank
from lhf_torchrec import apply_learned_hashing, fit_mapping
from lhf_torchrec.distributed import LearnedHashEBCSharder, ShardedRemappedEBC

pytestmark = pytest.mark.distributed

ROWS = 384  # global dataset; each rank trains on its half
BATCH = 16
EPOCHS = 3
VOCAB = 500
DIM = 8
FEATURES = ["c0", "c1", "c2", "c3"]


def make_dataset():
    """(dense, ids per feature, labels): ids Zipf-like; the label is a hidden bit of the c0 id, noise-free."""
    rng = np.random.default_rng(0)
    ids = {f: (rng.zipf(1.3, ROWS) - 1) % VOCAB for f in FEATURES}
    hidden_bit = rng.integers(0, 2, VOCAB)
    labels = hidden_bit[ids["c0"]].astype(np.float32)
    dense = rng.normal(size=(ROWS, 3)).astype(np.float32)
    return dense, ids, labels


def batches_for(rank: int, world_size: int):
    dense, ids, labels = make_dataset()
    mine = np.arange(rank, ROWS, world_size)
    out = []
    for start in range(0, mine.size, BATCH):
        rows = mine[start:start + BATCH]
        values = torch.from_numpy(np.concatenate([ids[f][rows] for f in FEATURES]))
        out.append(Batch(
            dense_features=torch.from_numpy(dense[rows]),
            sparse_features=KeyedJaggedTensor.from_lengths_sync(
                keys=FEATURES, values=values, lengths=torch.ones(len(FEATURES) * rows.size, dtype=torch.int64)
            ),
            labels=torch.from_numpy(labels[rows]),
        ))
    return out


def _swapped_dlrm_trains(rank: int, world_size: int) -> None:
    _, ids, _ = make_dataset()
    tables = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=VOCAB, embedding_dim=DIM, feature_names=[f])
              for f in FEATURES]
    torch.manual_seed(0)
    dlrm = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")),
        dense_in_features=3, dense_arch_layer_sizes=[16, DIM], over_arch_layer_sizes=[16, 1],
    )
    # Fitted from the same data with the same seed on every rank; t_c3 stays full size.
    mappings = {
        "t_c0": fit_mapping(ids["c0"], method="frequency", num_rows=64, seed=1, table="t_c0"),
        "t_c1": fit_mapping(ids["c1"], method="frequency", num_rows=32, seed=2, table="t_c1"),
        "t_c2": fit_mapping(ids["c2"], method="double_hash", num_rows=32, seed=3, table="t_c2"),
    }
    apply_learned_hashing(dlrm, mappings)
    model = DLRMTrain(dlrm)

    sharders = [LearnedHashEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"), batch_size=BATCH)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    assert sorted(plan.plan["model.sparse_arch.embedding_bag_collection"]) == [f"t_{f}" for f in FEATURES], plan
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    sharded = dmp.module.model.sparse_arch.embedding_bag_collection
    assert isinstance(sharded, ShardedRemappedEBC), type(sharded)
    fused_params = set(dmp.fused_optimizer.params)
    assert {f"model.sparse_arch.embedding_bag_collection.ebc.embedding_bags.t_{f}.weight" for f in FEATURES} <= fused_params
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: torch.optim.Adagrad(params, lr=0.1))
    pipe = TrainPipelineSparseDist(dmp, CombinedOptimizer([dmp.fused_optimizer, dense_opt]), torch.device("cpu"))

    data = batches_for(rank, world_size)
    batch_iter = iter(data * EPOCHS)
    losses = [pipe.progress(batch_iter)[0].item() for _ in range(EPOCHS * len(data))]
    assert [type(m) for m in pipe._pipelined_modules] == [ShardedRemappedEBC]

    # Compare whole epochs (the same rows, so the same difficulty), averaged over both ranks.
    per_epoch = torch.tensor(losses).view(EPOCHS, len(data)).mean(dim=1)
    dist.all_reduce(per_epoch)
    per_epoch /= world_size
    assert per_epoch[-1] < 0.8 * per_epoch[0], per_epoch.tolist()
    assert (per_epoch[1:] < per_epoch[:-1]).all(), per_epoch.tolist()


class SwappedDLRMTrainingTest(MultiProcessTestBase):
    def test_swapped_dlrm_trains_with_planner_dmp_and_pipeline(self) -> None:
        self._run_multi_process_test(callable=run_on_rank, check=_swapped_dlrm_trains, world_size=2)


if __name__ == "__main__":
    unittest.main()
