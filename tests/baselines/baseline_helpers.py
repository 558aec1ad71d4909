"""Shared pieces of the baseline tests: the model, a short training, and the 2-rank check (spawned
workers import this module by name: no side effects at import)."""

import datetime
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lhf_torchrec.baselines import (
    CCERemap,
    FrozenMCH,
    MCHRemap,
    QRRemap,
    qr_split,
)
from lhf_torchrec.baselines.cce import CCEPointers
from lhf_torchrec.distributed.sharder import RemappedEBCSharder
from lhf_torchrec.modules.remapped_ebc import RemappedEmbeddingBagCollection
from lhf_torchrec.training.model import ModelConfig
from lhf_torchrec.training.trainer import TrainConfig, Trainer

MODEL = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16], over_arch_layer_sizes=[16, 1])
TRAIN = dict(batch_size=128, epochs=1, progress=False, sparse_lr=0.05, dense_lr=3e-3)


def make_trainer(split, compression, **config) -> Trainer:
    return Trainer(MODEL, TrainConfig(**{**TRAIN, **config}), split.tables, len(split.train.dense_names),
                        compression)


def train_and_validate(split, compression, **config):
    """(validation metrics before training, the training result) of one short run."""
    trainer = make_trainer(split, compression, **config)
    before = trainer.evaluate(split.validation)
    return trainer, before, trainer.fit(split.train, split.validation)


def run_on_rank(check: Callable[..., None], rank: int, world_size: int, **kwargs) -> None:
    """Runs ``check(rank, world_size, **kwargs)`` in a gloo process group (short timeout), then tears it down."""
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        check(rank, world_size, **kwargs)
    finally:
        dist.destroy_process_group()


def sharded_modules_match_unsharded(rank: int, world_size: int) -> None:
    """Every baseline, sharded over the ranks row-wise and table-wise, pools like its unsharded
    module, and its backward runs. The ranks' batches have other bag lengths: QR's one-bag-per-id
    batches then differ in size, and it must agree on one (row-wise output dists need the same on
    every rank). Table-wise, MCH's state lives on the rank that owns its table only (QR and CCE,
    which rewrite a table into several, keep their remap replicated)."""
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=300, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=5, feature_names=["c"]),
    ]
    remaps = {
        "qr": QRRemap(tables, {"big": qr_split(40, 300)}),
        "mch": MCHRemap(tables, {"big": FrozenMCH(torch.tensor([3, 8, 21, (1 << 63) - 1]),
                                                  torch.tensor([2, 0, 1, 3]))}),
        "cce": CCERemap(tables, {"big": CCEPointers(np.arange(0, 300, 3), columns=2, rows=6, seed=1)}),
    }
    rng = np.random.default_rng(rank)
    for sharding_type in ("row_wise", "table_wise"):
        for method, remap in remaps.items():
            label = f"{method} {sharding_type} rank {rank}"
            torch.manual_seed(0)
            reference = RemappedEmbeddingBagCollection(remap)
            model = RemappedEmbeddingBagCollection(remap, device=torch.device("meta"))
            apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
            constraints = {c.name: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=["fused"])
                           for c in model.embedding_bag_configs()}
            sharders = [RemappedEBCSharder()]
            planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                               constraints=constraints)
            plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
            dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders, plan=plan)
            for key, value in dmp.state_dict().items():
                if key.endswith(".weight"):
                    full = reference.ebc.embedding_bags[key.split(".")[-2]].weight.detach()
                    for shard in value.local_shards():
                        (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                        shard.tensor.copy_(full[r0:r0 + rows, c0:c0 + cols])
            batch = 4
            lengths = rng.integers(0, 3 + 3 * rank, 3 * batch)
            values = [rng.integers(0, 5 if key == "c" else 300, n)
                      for key, n in zip(np.repeat(list("abc"), batch), lengths)]
            features = KeyedJaggedTensor(keys=list("abc"), values=torch.from_numpy(np.concatenate(values)),
                                         lengths=torch.from_numpy(lengths))
            pooled = dmp(features)
            expected = reference(features)
            for key in "abc":
                torch.testing.assert_close(pooled[key], expected[key], msg=f"{label} feature {key}")
            pooled.values().sum().backward()

            held = {name for name, _ in dmp.module.remapper.named_buffers()}
            state = dmp.state_dict()
            owner = plan.plan[""]["big"].ranks[0] if sharding_type == "table_wise" and method == "mch" else rank
            for name, _ in remap.named_buffers():
                assert (name in held and f"remapper.{name}" in state) == (owner == rank), f"{label}: {name}"
