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
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder, RemappedEBCSharder, ShardedRemappedEBC

__all__ = [
    "InsufficientMemoryError",
    "LearnedHashEBCSharder",
    "LearnedHashPlanner",
    "MappingStorageReservation",
    "PlanMemory",
    "PlanReport",
    "RankMemory",
    "RemappedEBCSharder",
    "ShardedRemappedEBC",
    "plan_report",
    "synthetic_mappings",
]
