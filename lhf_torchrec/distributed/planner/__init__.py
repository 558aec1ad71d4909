"""The sharding planner's view of learned-hash memory, and before/after capacity reports.

TorchRec's planner sees the compressed tables for free: a
:class:`~lhf_torchrec.modules.LearnedHashEmbeddingBagCollection` holds a stock EBC built from the
compressed configs. It does not see the mappings: they are buffers *inside* the shardable module.
Split by concern, as TorchRec's own planner package is:

* :mod:`~lhf_torchrec.distributed.planner.reservation`: :class:`MappingStorageReservation` takes
  the replicated mappings' bytes off every device (HBM on cuda topologies, DDR on cpu ones)
  before the planner places tables;
* :mod:`~lhf_torchrec.distributed.planner.cosharding`: :func:`cosharding_choices`, the rule for
  which mappings co-shard with their tables' rows, and :class:`CoshardedMappingEstimator`, which
  puts their bytes into each shard's storage (so the planner balances them);
* :mod:`~lhf_torchrec.distributed.planner.planner`: :class:`LearnedHashPlanner`, an
  ``EmbeddingShardingPlanner`` with that reservation and estimator; when a model does not fit it raises
  :class:`InsufficientMemoryError`, which says on which ranks and by how much, and after a plan it
  reports per-rank memory (:meth:`LearnedHashPlanner.rank_memory`);
* :mod:`~lhf_torchrec.distributed.planner.memory`: :class:`RankMemory`, the error, byte formatting;
* :mod:`~lhf_torchrec.distributed.planner.synthetic`: mappings of a given shape without data;
* :mod:`~lhf_torchrec.distributed.planner.report`: :func:`plan_report` plans a model before and
  after compression, on the meta device, for any topology: planning a cuda topology needs no GPU;
  :func:`estimate_rank_memory` gives the planner's per-rank estimate for a model on W ranks.

The planner counts optimizer state only for parameters that carry their optimizer class
(``apply_optimizer_in_backward``): SGD x0, Adam x2, Adagrad x1, row-wise Adagrad x1/dim of the
table bytes, the same as :func:`lhf_torchrec.mapping.row_bytes`. An optimizer given only through
the sharder's ``fused_params`` takes memory the planner does not count.
"""

from lhf_torchrec.distributed.planner.cosharding import (
    CoshardChoice,
    CoshardedMappingEstimator,
    CoshardedTable,
    cosharding_choices,
    model_cosharded_tables,
)
from lhf_torchrec.distributed.planner.memory import (
    GB,
    InsufficientMemoryError,
    RankMemory,
    format_bytes,
    mapping_bytes,
    memory_tier,
    table_mappings,
)
from lhf_torchrec.distributed.planner.planner import LearnedHashPlanner, PerTableUniformProposer
from lhf_torchrec.distributed.planner.report import PlanMemory, PlanReport, estimate_rank_memory, plan_report
from lhf_torchrec.distributed.planner.reservation import MappingStorageReservation
from lhf_torchrec.distributed.planner.synthetic import MIN_COMPRESSED_IDS, synthetic_mappings

__all__ = [
    "CoshardChoice",
    "CoshardedMappingEstimator",
    "CoshardedTable",
    "GB",
    "InsufficientMemoryError",
    "LearnedHashPlanner",
    "MIN_COMPRESSED_IDS",
    "MappingStorageReservation",
    "PerTableUniformProposer",
    "PlanMemory",
    "PlanReport",
    "RankMemory",
    "cosharding_choices",
    "estimate_rank_memory",
    "format_bytes",
    "mapping_bytes",
    "model_cosharded_tables",
    "memory_tier",
    "plan_report",
    "synthetic_mappings",
    "table_mappings",
]
