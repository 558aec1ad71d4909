"""lhf-torchrec: learned hash functions that compress TorchRec embedding tables.

The pieces, in the order a pipeline uses them (docs/architecture.md has the layers and their imports):

* :mod:`lhf_torchrec.data`: the synthetic Criteo-shaped data, Criteo TSV / npy, CSV and MovieLens
  readers, as ``CTRSource`` s that yield TorchRec batches.
* :mod:`lhf_torchrec.mapping`: profile id accesses (``IdProfile``), fit one table's mapping at a
  budget with a learned hash function (``fit_mapping`` -> ``IdMapping``, mapping bytes counted),
  and the budget rules every method shares (full rows, vocabularies, bytes per row per optimizer).
* :mod:`lhf_torchrec.modules`: ``LearnedHashEmbeddingBagCollection``, an ``EmbeddingBagCollection``
  behind the mappings (one kind of ``RemappedEmbeddingBagCollection``, the module every method
  uses), and ``apply_learned_hashing``, which swaps the EBCs of an existing model in place.
* :mod:`lhf_torchrec.distributed`: ``LearnedHashEBCSharder`` (the remap replicated in
  ``input_dist``, the tables sharded by TorchRec with any sharding type), ``LearnedHashPlanner``
  (TorchRec's planner, which also counts the mapping memory) and ``plan_report`` (per-rank memory
  before and after compression, without GPUs). For many ranks, bucketed mappings co-shard with
  their row-wise tables through TorchRec's managed-collision engine (``CoShardedLearnedHashEBC``,
  ``apply_cosharded_learned_hashing``, ``CoShardedEBCSharder``): each rank holds 1/W of them.
* :mod:`lhf_torchrec.training`: DLRM, the trainer (DMP, pipelined training, checkpoints).
* :mod:`lhf_torchrec.baselines`: QR, MCH and CCE, each a remap in front of a stock EBC.
* :mod:`lhf_torchrec.pipeline`: the steps profile -> learn -> fit -> train, the method registry
  (every method by name), the comparison of methods at equal total bytes, the demo.

Example::

    mappings = {"t_C1": fit_mapping(c1_history, method="frequency", total_bytes=10_000_000,
                                    embedding_dim=64, table="t_C1")}
    apply_learned_hashing(dlrm, mappings)      # the EBCs of a TorchRec model, in place
    model = DistributedModelParallel(dlrm, sharders=[LearnedHashEBCSharder()], ...)
"""

from lhf_torchrec.distributed.planner import LearnedHashPlanner, plan_report
from lhf_torchrec.distributed.sharder import CoShardedEBCSharder, LearnedHashEBCSharder
from lhf_torchrec.mapping import (
    IdEmbeddings,
    IdMapping,
    IdProfile,
    fit_mapping,
    load_mappings,
    plan_budget,
    save_mappings,
)
from lhf_torchrec.modules.cosharded import CoShardedLearnedHashEBC
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection
from lhf_torchrec.modules.swap import apply_cosharded_learned_hashing, apply_learned_hashing

__all__ = [
    "CoShardedEBCSharder",
    "CoShardedLearnedHashEBC",
    "IdEmbeddings",
    "IdMapping",
    "IdProfile",
    "LearnedHashEBCSharder",
    "LearnedHashEmbeddingBagCollection",
    "LearnedHashPlanner",
    "apply_cosharded_learned_hashing",
    "apply_learned_hashing",
    "fit_mapping",
    "load_mappings",
    "plan_budget",
    "plan_report",
    "save_mappings",
]
