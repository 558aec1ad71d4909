"""Distributed pieces: the sharder of the learned-hash EBC and the planner's view of its memory."""

from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder, ShardedLearnedHashEBC

__all__ = ["LearnedHashEBCSharder", "ShardedLearnedHashEBC"]
