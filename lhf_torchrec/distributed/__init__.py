"""Distributed pieces: the sharder of the learned-hash EBC and the planner's view of its memory."""

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
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder, ShardedLearnedHashEBC

__all__ = [
    "InsufficientMemoryError",
    "LearnedHashEBCSharder",
    "LearnedHashPlanner",
    "MappingStorageReservation",
    "PlanMemory",
    "PlanReport",
    "RankMemory",
    "ShardedLearnedHashEBC",
    "plan_report",
    "synthetic_mappings",
]
