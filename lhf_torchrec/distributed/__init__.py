"""Distributed pieces: the sharder of the remapped EBC (the learned hash's and every other method's)
and the planner's view of the mapping memory."""

from lhf_torchrec.distributed.planner import (
    InsufficientMemoryError,
    LearnedHashPlanner,
    MappingStorageReservation,
    PlanMemory,
    PlanReport,
    RankMemory,
    plan_report,
    synthetic_mappings,
)
from lhf_torchrec.distributed.sharder import (
    CoShardedEBCSharder,
    LearnedHashEBCSharder,
    RemappedEBCSharder,
    ShardedRemappedEBC,
    cosharding_world_sizes,
)

__all__ = [
    "CoShardedEBCSharder",
    "InsufficientMemoryError",
    "LearnedHashEBCSharder",
    "LearnedHashPlanner",
    "MappingStorageReservation",
    "PlanMemory",
    "PlanReport",
    "RankMemory",
    "RemappedEBCSharder",
    "ShardedRemappedEBC",
    "cosharding_world_sizes",
    "plan_report",
    "synthetic_mappings",
]
