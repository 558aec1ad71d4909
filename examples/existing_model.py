"""Adding learned hashing to an existing TorchRec model, end to end (docs/existing_model.md).

A stock ``torchrec.models.dlrm.DLRM`` whose tables are too large: profile a sample of the training
data, learn nothing new about the model (frequency mappings need only counts; see the comment for
the learned methods), fit one mapping per large table at a tenth of its bytes, swap the tables,
then shard and train exactly as before. Runs on CPU in one process or under torchrun:

    python examples/existing_model.py
    torchrun --nproc_per_node 2 examples/existing_model.py
"""

import itertools
import os

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lhf_torchrec import apply_learned_hashing, fit_mapping
from lhf_torchrec.data import SyntheticCriteoConfig, make_synthetic_criteo
from lhf_torchrec.distributed import LearnedHashEBCSharder, LearnedHashPlanner
from lhf_torchrec.mapping import profile_batches, row_bytes

DIM = 16


def main() -> None:
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # a plain `python` run: a one-process group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = make_synthetic_criteo(40_000, SyntheticCriteoConfig(scale=0.002, seed=0), progress=False).data
    sizes = data.num_embeddings_per_feature()

    # 1. The model as it is today: one full-size table per feature, built on meta for DMP.
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=max(n, 1), feature_names=[f])
              for f, n in zip(data.feature_names, sizes)]
    dlrm = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                dense_in_features=len(data.dense_names), dense_arch_layer_sizes=[64, DIM],
                over_arch_layer_sizes=[64, 1], dense_device=torch.device("cpu"))

    # 2. Access counts from (a sample of) history; batches are TorchRec Batch/KJT as in training.
    profiles = profile_batches(data.batches(8192))
    # 3. One mapping per large table at 1/10 of its bytes, mapping included. The learned methods
    #    ("learned", "combination") also take embeddings=: e.g. a trained table reduced by PCA,
    #    lhf_torchrec.embeddings_from_table(weight, 8), or lhf_torchrec.pipeline.steps.learn_model.
    mappings = {
        t.name: fit_mapping(profiles[t.feature_names[0]], method="frequency", table=t.name, embedding_dim=DIM,
                            total_bytes=t.num_embeddings * row_bytes(DIM, "rowwise_adagrad") // 10,
                            optimizer="rowwise_adagrad")
        for t in tables if t.num_embeddings >= 1000
    }
    # 4. Swap, then everything below is the usual TorchRec training code.
    apply_learned_hashing(dlrm, mappings)
    model = DLRMTrain(dlrm)
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.05})
    sharders = [LearnedHashEBCSharder()]
    planner = LearnedHashPlanner(Topology(world_size=world, compute_device="cpu"), batch_size=512)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(model, plan=plan, sharders=sharders, device=torch.device("cpu"))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    pipeline = TrainPipelineSparseDist(model, CombinedOptimizer([model.fused_optimizer, dense]), torch.device("cpu"))
    batches = itertools.islice(data.batches(512, shuffle=True, rank=rank, world_size=world, drop_last=True), 60)
    losses = []
    while True:
        try:
            loss, _, _ = pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(loss.item())
    if rank == 0:
        rows = sum(mappings[t.name].num_rows if t.name in mappings else t.num_embeddings for t in tables)
        saved = sum(t.num_embeddings for t in tables) / rows
        print(f"{len(mappings)} tables compressed ({saved:.1f}x fewer rows overall); "
              f"loss {sum(losses[:10]) / 10:.4f} -> {sum(losses[-10:]) / 10:.4f} over {len(losses)} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
