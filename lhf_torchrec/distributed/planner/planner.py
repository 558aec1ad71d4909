"""``LearnedHashPlanner``: TorchRec's planner with the mapping memory (replicated mappings reserved on
every rank, co-sharded ones inside shard storage), per-rank memory after a plan, and a capacity
diagnosis when a model does not fit."""

import copy
import dataclasses
import logging
import math
from typing import Dict, List, Mapping, Optional

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE, DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.proposers import UniformProposer, _sharding_option_score
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.types import (
    Enumerator,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    StorageReservation,
)
from torchrec.distributed.planner.utils import build_sharder_data_map, sharder_name
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from lhf_torchrec.distributed.planner.cosharding import (
    CoshardedMappingEstimator,
    CoshardedTable,
    cosharded_constraints,
)
from lhf_torchrec.distributed.planner.memory import (
    InsufficientMemoryError,
    RankMemory,
    format_bytes,
    list_ranks,
    memory_tier,
    over_capacity,
)
from lhf_torchrec.distributed.planner.reservation import MappingStorageReservation

logger = logging.getLogger(__name__)


# The default proposers make ~200 proposals, each partitioned over every device: fine up to a few
# hundred ranks, minutes at 1024. Above this size, one proposal per sharding type.
UNIFORM_PROPOSER_FROM_RANKS = 256
# A capacity search for the smallest per-rank memory that fits stops at this precision.
_SEARCH_PRECISION = 0.02
_SEARCH_MAX_FACTOR = 2**12


class PerTableUniformProposer(UniformProposer):
    """One proposal per sharding type, as TorchRec's ``UniformProposer``, for tables that do not all
    allow every type (co-sharded tables are row-wise only): in the proposal of type T each table
    takes its best option of type T, or its best option of any type when it has none of type T.
    ``UniformProposer`` itself only proposes types that every table allows."""

    def load(self, search_space: List[ShardingOption], enumerator: Optional[Enumerator] = None) -> None:
        self._reset()
        by_fqn: Dict[str, List[ShardingOption]] = {}
        for option in search_space:
            by_fqn.setdefault(option.fqn, []).append(option)
        for options in by_fqn.values():
            options.sort(key=lambda o: _sharding_option_score(o, self._use_depth))
        seen = set()
        for kind in sorted({o.sharding_type for o in search_space}):
            proposal = [next((o for o in options if o.sharding_type == kind), options[0]) for options in by_fqn.values()]
            key = tuple(id(o) for o in proposal)
            if key not in seen:
                seen.add(key)
                self._grouped_sharding_options.append(proposal)


def _rank_memory(
    options: List[ShardingOption],
    topology: Topology,
    reservation: MappingStorageReservation,
    sharders: List[ModuleSharder[nn.Module]],
    constraints: Optional[Dict[str, ParameterConstraints]],
    cosharded_estimator: CoshardedMappingEstimator,
) -> List[RankMemory]:
    """Per-rank memory of a placed plan, the planner's shard storage split into its terms.

    The split re-runs TorchRec's storage estimator on copies of the chosen options: once for
    inference (weights only), once at batch size 0 (weights and optimizer state, no buffers); the
    co-sharded mappings' bytes come from their rows on each rank.
    """
    tier = memory_tier(topology)
    other = "ddr" if tier == "hbm" else "hbm"
    data_map = build_sharder_data_map({sharder_name(s.module_type): s for s in sharders})
    weights_only = copy.deepcopy(options)
    EmbeddingStorageEstimator(topology, constraints, is_inference=True).estimate(weights_only, data_map)
    no_buffers = copy.deepcopy(options)
    for option in no_buffers:
        option.batch_size = 0
    EmbeddingStorageEstimator(topology).estimate(no_buffers, data_map)
    world = topology.world_size
    in_shards = cosharded_estimator.rank_bytes(options, world)
    planned, tables, static, offloaded = [0] * world, [0] * world, [0] * world, [0] * world
    for option, weights, statics in zip(options, weights_only, no_buffers):
        for shard, w, s in zip(option.shards, weights.shards, statics.shards):
            planned[shard.rank] += getattr(shard.storage, tier)
            offloaded[shard.rank] += getattr(shard.storage, other)
            tables[shard.rank] += getattr(w.storage, tier)
            static[shard.rank] += getattr(s.storage, tier)
    return [
        RankMemory(
            rank=r,
            capacity=getattr(topology.devices[r].storage, tier),
            tables=tables[r],
            optimizer=static[r] - tables[r],
            io=planned[r] - static[r] - in_shards[r],
            mappings=reservation.mapping_bytes,
            reserved=reservation.base_reserved[r],
            offloaded=offloaded[r],
            cosharded_mappings=in_shards[r],
        )
        for r in range(world)
    ]


class LearnedHashPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` that counts the learned-hash mappings: replicated ones reserved on
    every rank, co-sharded ones inside their tables' shards.

    Args:
        topology: the topology to plan for (a cuda topology plans fine on a machine without GPU).
        batch_size: per-rank batch size (default TorchRec's 512).
        base_reservation: the reservation for everything but the mappings
            (see :class:`MappingStorageReservation`).
        mapping_bytes: overrides the replicated mapping bytes found in the planned module.
        cosharded: the tables whose mappings are co-sharded with their rows (their layouts, e.g.
            from :func:`~lhf_torchrec.distributed.planner.cosharding.cosharding_choices`): held to
            ``row_wise`` with fused kernels, their mapping bytes added to each shard's storage and
            left out of the replicated reservation. Default: none, every mapping replicated.
        diagnose: when the model does not fit, re-plan with larger capacities to find the smallest
            per-rank memory that fits, and name the ranks that need more than they have.
        **kwargs: as for ``EmbeddingShardingPlanner`` (constraints, proposer, partitioner, ...).

    Example::

        planner = LearnedHashPlanner(topology, batch_size=512)
        plan = planner.plan(model, [LearnedHashEBCSharder()])   # or InsufficientMemoryError
        planner.rank_memory()                                   # [RankMemory(rank=0, ...), ...]
    """

    def __init__(
        self,
        topology: Topology,
        batch_size: Optional[int] = None,
        *,
        base_reservation: Optional[StorageReservation] = None,
        mapping_bytes: Optional[int] = None,
        cosharded: Optional[Mapping[str, CoshardedTable]] = None,
        diagnose: bool = True,
        **kwargs,
    ) -> None:
        if "storage_reservation" in kwargs:
            raise TypeError("LearnedHashPlanner builds its own storage_reservation; pass base_reservation")
        if "enumerator" in kwargs:
            raise TypeError("LearnedHashPlanner builds its own enumerator (with the co-sharded mapping estimator)")
        self.topology = topology
        self.cosharded = dict(cosharded or {})
        self.reservation = MappingStorageReservation(base_reservation, mapping_bytes, cosharded=self.cosharded)
        self._mapping_bytes = mapping_bytes
        self._diagnose = diagnose
        batch_size = batch_size or BATCH_SIZE
        constraints = kwargs.get("constraints")
        if self.cosharded:
            constraints = kwargs["constraints"] = cosharded_constraints(constraints, self.cosharded)
        self.cosharded_estimator = CoshardedMappingEstimator(topology, self.cosharded)
        # One enumerator for this planner and the re-plans of a diagnosis: its search space
        # depends on the model, not on capacities, and TorchRec caches it per module. The
        # co-sharded estimator runs last: it adds to the storage TorchRec's estimator filled.
        kwargs["enumerator"] = EmbeddingEnumerator(topology, batch_size, constraints, estimator=[
            EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints),
            EmbeddingStorageEstimator(topology=topology, constraints=constraints),
            self.cosharded_estimator,
        ])
        self._replan_kwargs = {
            k: v for k, v in kwargs.items()
            if k in ("enumerator", "constraints", "proposer", "partitioner", "performance_model")
        }
        self._batch = batch_size
        self._constraints_arg = constraints
        self._sharders: List[ModuleSharder[nn.Module]] = []
        super().__init__(topology=topology, batch_size=batch_size, storage_reservation=self.reservation, **kwargs)

    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        self._sharders = sharders
        try:
            return super().plan(module, sharders)
        except PlannerError as error:
            if error.error_type != PlannerErrorType.INSUFFICIENT_STORAGE or not self._diagnose:
                raise
            raise self._does_not_fit(module, sharders, error) from error

    def rank_memory(self) -> List[RankMemory]:
        """Per-rank memory of the last plan (only on the process that ran ``plan``)."""
        options = self.get_selected_options()
        if not options:
            raise RuntimeError("no plan yet: call plan() first (collective_plan keeps options on rank 0 only)")
        return _rank_memory(options, self.topology, self.reservation, self._sharders, self._constraints_arg,
                            self.cosharded_estimator)

    def _replan(
        self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]], factor: float
    ) -> Optional[List[RankMemory]]:
        """Per-rank memory of a plan with every device's capacity scaled by ``factor`` (None if none fits),
        against the real capacities."""
        tier = memory_tier(self.topology)
        topology = copy.deepcopy(self.topology)
        for device in topology.devices:
            setattr(device.storage, tier, int(getattr(device.storage, tier) * factor))
        reservation = MappingStorageReservation(self.reservation.base, self._mapping_bytes, cosharded=self.cosharded)
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=self._batch, storage_reservation=reservation,
            stats=[NoopEmbeddingStats()], debug=False, **self._replan_kwargs,
        )
        try:
            planner.plan(module, sharders)
        except PlannerError as error:
            if error.error_type != PlannerErrorType.INSUFFICIENT_STORAGE:
                raise
            return None
        ranks = _rank_memory(planner.get_selected_options(), topology, reservation, sharders, self._constraints_arg,
                             self.cosharded_estimator)
        return [dataclasses.replace(r, capacity=getattr(self.topology.devices[r.rank].storage, tier)) for r in ranks]

    def _does_not_fit(
        self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]], error: PlannerError
    ) -> InsufficientMemoryError:
        tier = memory_tier(self.topology)
        capacity = getattr(self.topology.devices[0].storage, tier)
        head = (
            f"the model does not fit in {format_bytes(capacity)} of {tier.upper()} per rank on "
            f"{self.topology.world_size} ranks"
        )
        logger.info("%s; searching the smallest per-rank capacity that fits", head)
        low, high, found = 1.0, 2.0, None
        while high <= _SEARCH_MAX_FACTOR:
            found = self._replan(module, sharders, high)
            if found is not None:
                break
            low, high = high, high * 2
        if found is None:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            ranks = error.ranks if isinstance(error, InsufficientMemoryError) else []
            return InsufficientMemoryError(
                f"{head}, nor in {_SEARCH_MAX_FACTOR}x that memory ({detail})", ranks=ranks
            )
        while high / low > 1 + _SEARCH_PRECISION:
            middle = math.sqrt(low * high)
            ranks = self._replan(module, sharders, middle)
            if ranks is None:
                low = middle
            else:
                high, found = middle, ranks
        required = int(capacity * high)
        short = over_capacity(found)
        total_need = sum(r.total for r in found)
        total_have = capacity * self.topology.world_size
        need, have = format_bytes(required), format_bytes(capacity)
        lines = [
            f"{head}:",
            f"  the planner needs at least {need} per rank (short by {format_bytes(required - capacity)} per rank);",
            f"  in its plan at {need} per rank, {len(short)} of {self.topology.world_size} ranks need more than "
            f"{have}: {list_ranks(short)};",
            f"  in total the ranks need {format_bytes(total_need)} and have {format_bytes(total_have)} "
            f"(short by {format_bytes(max(0, total_need - total_have))});",
            f"  every rank reserves {format_bytes(found[0].mappings)} for the replicated mappings and up to "
            f"{format_bytes(max(r.reserved for r in found))} for the base reservation (at {need} per rank)"
            if found[0].mappings
            else f"  every rank reserves up to {format_bytes(max(r.reserved for r in found))} for the base "
            f"reservation (at {need} per rank)",
        ]
        message = "\n".join(lines)
        return InsufficientMemoryError(message, ranks=found, required_capacity=required)
