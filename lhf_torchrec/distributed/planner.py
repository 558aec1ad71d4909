"""The sharding planner's view of learned-hash memory, and before/after capacity reports.

TorchRec's planner sees the compressed tables for free: a
:class:`~lhf_torchrec.modules.LearnedHashEmbeddingBagCollection` holds a stock EBC built from the
compressed configs. It does not see the mappings: they are buffers *inside* the shardable module,
and ``HeuristicalStorageReservation`` (the planner's default) counts only what lies outside
shardable modules (dense parameters x6, buffers x1) plus KJT buffers. The sharder replicates the
mappings on every rank, so :class:`MappingStorageReservation` takes their bytes off every device
(HBM on cuda topologies, DDR on cpu ones) before the planner places tables.

:class:`LearnedHashPlanner` is an ``EmbeddingShardingPlanner`` with that reservation. When a model
does not fit it raises :class:`InsufficientMemoryError`, which says on which ranks and by how much,
and after a plan it reports per-rank memory (:meth:`LearnedHashPlanner.rank_memory`).
:func:`plan_report` plans a model before and after compression, on the meta device, for any
topology: planning a cuda topology needs no GPU.

The planner counts optimizer state only for parameters that carry their optimizer class
(``apply_optimizer_in_backward``): SGD x0, Adam x2, Adagrad x1, row-wise Adagrad x1/dim of the
table bytes, the same as :func:`lhf_torchrec.mapping.row_bytes`. An optimizer given only through
the sharder's ``fused_params`` takes memory the planner does not count.
"""

import copy
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Type, Union

import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.proposers import UniformProposer
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    StorageReservation,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.planner.utils import build_sharder_data_map, sharder_name
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping.budget import OPTIMIZERS, row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping, storage_cost
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection

logger = logging.getLogger(__name__)

GB = 1024**3  # the planner's unit (bytes_to_gb)

# The default proposers make ~200 proposals, each partitioned over every device: fine up to a few
# hundred ranks, minutes at 1024. Above this size, one proposal per sharding type.
UNIFORM_PROPOSER_FROM_RANKS = 256
# A capacity search for the smallest per-rank memory that fits stops at this precision.
_SEARCH_PRECISION = 0.02
_SEARCH_MAX_FACTOR = 2**12
# Synthetic mappings leave smaller tables at full size: they are a negligible share of the memory.
MIN_COMPRESSED_IDS = 10_000


def memory_tier(topology: Topology) -> str:
    """The memory the tables live in: ``hbm`` on cuda/mtia topologies, ``ddr`` on cpu ones."""
    return "hbm" if topology.compute_device in ("cuda", "mtia") else "ddr"


def mapping_bytes(source: Union[nn.Module, Mapping[str, IdMapping]]) -> int:
    """Bytes of the distinct :class:`IdMapping` buffers in a model, or in a dict table -> mapping."""
    candidates = source.values() if isinstance(source, Mapping) else source.modules()
    distinct = {id(m): m for m in candidates if isinstance(m, IdMapping)}
    return sum(m.nbytes for m in distinct.values())


@dataclass(frozen=True)
class RankMemory:
    """Memory of one rank in the planner's accounting, in bytes of the topology's memory tier.

    ``tables``, ``optimizer`` and ``io`` split the storage the planner estimated for the shards on
    the rank: the weights, the fused optimizer's state, and input/output buffers (proportional to
    the batch size). ``mappings`` are replicated on every rank; ``reserved`` is what the base
    reservation keeps (HBM margin, dense parameters, KJTs); ``offloaded`` is host memory that UVM
    kernels use on cuda topologies (not part of ``total``).
    """

    rank: int
    capacity: int
    tables: int
    optimizer: int
    io: int
    mappings: int
    reserved: int
    offloaded: int = 0

    @property
    def total(self) -> int:
        return self.tables + self.optimizer + self.io + self.mappings + self.reserved

    @property
    def shortfall(self) -> int:
        """Bytes beyond the capacity (0 when the rank fits)."""
        return max(0, self.total - self.capacity)


def format_bytes(nbytes: float) -> str:
    """``12.35 GB``, ``48.0 MB`` or ``2.1 KB`` (units of 2^30, 2^20, 2^10 bytes, as the planner's)."""
    if abs(nbytes) >= GB:
        return f"{nbytes / GB:.2f} GB"
    if abs(nbytes) >= 1024**2:
        return f"{nbytes / 1024**2:.1f} MB"
    return f"{nbytes / 1024:.1f} KB"


class InsufficientMemoryError(PlannerError):
    """The model does not fit: ``ranks`` is the per-rank memory it needs, ``required_capacity`` the
    smallest per-rank capacity at which the planner finds a plan (None if it found none)."""

    def __init__(self, message: str, ranks: Sequence[RankMemory] = (), required_capacity: Optional[int] = None):
        super().__init__(message, PlannerErrorType.INSUFFICIENT_STORAGE)
        self.ranks = list(ranks)
        self.required_capacity = required_capacity

    @property
    def short_ranks(self) -> List[RankMemory]:
        """Ranks that need more than their capacity, largest shortfall first."""
        return _over_capacity(self.ranks)


def _over_capacity(ranks: Sequence[RankMemory]) -> List[RankMemory]:
    return sorted((r for r in ranks if r.shortfall > 0), key=lambda r: (-r.shortfall, r.rank))


def _list_ranks(ranks: Sequence[RankMemory], limit: int = 8) -> str:
    shown = ", ".join(
        f"rank {r.rank} needs {format_bytes(r.total)} (short by {format_bytes(r.shortfall)})" for r in ranks[:limit]
    )
    return shown + (f", and {len(ranks) - limit} more" if len(ranks) > limit else "")


class MappingStorageReservation(StorageReservation):
    """Reserves the replicated mappings' bytes on every rank, on top of a base reservation.

    Args:
        base: the reservation for everything else (default: TorchRec's default,
            ``HeuristicalStorageReservation(percentage=0.15)``). It does not count buffers inside
            a shardable module, so the mappings are never counted twice.
        mapping_bytes: bytes to reserve per rank; default: the :class:`IdMapping` buffers found in
            the module being planned (:func:`mapping_bytes`).

    After ``reserve``: ``mapping_bytes`` and ``base_reserved`` (bytes per rank) hold what it took.

    Example::

        planner = EmbeddingShardingPlanner(topology, storage_reservation=MappingStorageReservation())
    """

    def __init__(self, base: Optional[StorageReservation] = None, mapping_bytes: Optional[int] = None) -> None:
        if base is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                base = HeuristicalStorageReservation(percentage=0.15)
        self.base = base
        self._fixed_bytes = mapping_bytes
        self.mapping_bytes = 0
        self.base_reserved: List[int] = []
        self._last_reserved: Optional[Topology] = None

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: List[ModuleSharder[nn.Module]],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
    ) -> Topology:
        tier = memory_tier(topology)
        self.mapping_bytes = self._fixed_bytes if self._fixed_bytes is not None else mapping_bytes(module)
        reserved = copy.deepcopy(self.base.reserve(topology, batch_size, module, sharders, constraints))
        self.base_reserved = [
            getattr(full.storage, tier) - getattr(left.storage, tier)
            for full, left in zip(topology.devices, reserved.devices)
        ]
        for device in reserved.devices:
            setattr(device.storage, tier, getattr(device.storage, tier) - self.mapping_bytes)
        self._last_reserved = reserved
        over = _over_capacity([
            RankMemory(rank=d.rank, capacity=getattr(d.storage, tier), tables=0, optimizer=0, io=0,
                       mappings=self.mapping_bytes, reserved=kept)
            for d, kept in zip(topology.devices, self.base_reserved)
        ])
        if over:
            raise InsufficientMemoryError(
                f"the replicated mappings ({format_bytes(self.mapping_bytes)} per rank) and the base reservation "
                f"({type(self.base).__name__}) leave no {tier.upper()} for tables on {len(over)} of "
                f"{topology.world_size} ranks: {_list_ranks(over)}",
                ranks=over,
            )
        return reserved

    @property
    def last_reserved_topology(self) -> Optional[Topology]:
        return copy.deepcopy(self._last_reserved)


def _rank_memory(
    options: List[ShardingOption],
    topology: Topology,
    reservation: MappingStorageReservation,
    sharders: List[ModuleSharder[nn.Module]],
    constraints: Optional[Dict[str, ParameterConstraints]],
) -> List[RankMemory]:
    """Per-rank memory of a placed plan, the planner's shard storage split into its terms.

    The split re-runs TorchRec's storage estimator on copies of the chosen options: once for
    inference (weights only), once at batch size 0 (weights and optimizer state, no buffers).
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
            io=planned[r] - static[r],
            mappings=reservation.mapping_bytes,
            reserved=reservation.base_reserved[r],
            offloaded=offloaded[r],
        )
        for r in range(world)
    ]


class LearnedHashPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` that reserves the learned-hash mappings on every rank.

    Args:
        topology: the topology to plan for (a cuda topology plans fine on a machine without GPU).
        batch_size: per-rank batch size (default TorchRec's 512).
        base_reservation: the reservation for everything but the mappings
            (see :class:`MappingStorageReservation`).
        mapping_bytes: overrides the mapping bytes found in the planned module.
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
        diagnose: bool = True,
        **kwargs,
    ) -> None:
        if "storage_reservation" in kwargs:
            raise TypeError("LearnedHashPlanner builds its own storage_reservation; pass base_reservation")
        self.topology = topology
        self.reservation = MappingStorageReservation(base_reservation, mapping_bytes)
        self._mapping_bytes = mapping_bytes
        self._diagnose = diagnose
        batch_size = batch_size or BATCH_SIZE
        constraints = kwargs.get("constraints")
        # One enumerator for this planner and the re-plans of a diagnosis: its search space
        # depends on the model, not on capacities, and TorchRec caches it per module.
        kwargs.setdefault("enumerator", EmbeddingEnumerator(topology, batch_size, constraints))
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
        return _rank_memory(options, self.topology, self.reservation, self._sharders, self._constraints_arg)

    def _replan(
        self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]], factor: float
    ) -> Optional[List[RankMemory]]:
        """Per-rank memory of a plan with every device's capacity scaled by ``factor`` (None if none fits),
        against the real capacities."""
        tier = memory_tier(self.topology)
        topology = copy.deepcopy(self.topology)
        for device in topology.devices:
            setattr(device.storage, tier, int(getattr(device.storage, tier) * factor))
        reservation = MappingStorageReservation(self.reservation.base, self._mapping_bytes)
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
        ranks = _rank_memory(planner.get_selected_options(), topology, reservation, sharders, self._constraints_arg)
        capacity = [getattr(d.storage, tier) for d in self.topology.devices]
        return [
            RankMemory(r.rank, capacity[r.rank], r.tables, r.optimizer, r.io, r.mappings, r.reserved, r.offloaded)
            for r in ranks
        ]

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
        short = _over_capacity(found)
        total_need = sum(r.total for r in found)
        total_have = capacity * self.topology.world_size
        need, have = format_bytes(required), format_bytes(capacity)
        lines = [
            f"{head}:",
            f"  the planner needs at least {need} per rank (short by {format_bytes(required - capacity)} per rank);",
            f"  in its plan at {need} per rank, {len(short)} of {self.topology.world_size} ranks need more than "
            f"{have}: {_list_ranks(short)};",
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


# ---------------------------------------------------------------------------------------- reports


def synthetic_mappings(
    tables: Sequence[EmbeddingBagConfig],
    compression: float,
    *,
    optimizer: str = "sgd",
    entry_fraction: float = 0.1,
    min_ids: int = MIN_COMPRESSED_IDS,
) -> Dict[str, IdMapping]:
    """Mappings with the byte cost and row count of a fitted mapping, for planning without data.

    Assumption: a fitted mapping stores an entry for ``entry_fraction`` of a table's ids (hot and
    well-observed ids; every other id is hashed and costs nothing), in the cheaper of sorted
    storage (int32 key + int32 row, 8 bytes per entry) and dense storage (4 bytes per id). The
    table keeps as many rows as fit in ``1 / compression`` of its full training bytes (weights and
    optimizer state) once the mapping is paid for. Tables with fewer than ``min_ids`` ids stay full
    size. The entries are zeros: these mappings are for the planner, never for lookups.
    """
    if not compression > 1:
        raise ValueError(f"compression must be > 1 (full bytes / compressed bytes), got {compression}")
    if not 0.0 <= entry_fraction <= 1.0:
        raise ValueError(f"entry_fraction must be in [0, 1], got {entry_fraction}")
    mappings: Dict[str, IdMapping] = {}
    for table in tables:
        ids = table.num_embeddings
        if ids < min_ids:
            continue
        per_row = row_bytes(table.embedding_dim, optimizer)
        entries = math.ceil(entry_fraction * ids)
        storage, nbytes = storage_cost(entries, ids)
        rows = int((ids * per_row / compression - nbytes) // per_row)
        if rows < 1:
            raise ValueError(
                f"table '{table.name}': {compression}x leaves {format_bytes(ids * per_row / compression)} for "
                f"this table, but its mapping alone needs {format_bytes(nbytes)} ({entries} entries, {storage} "
                "storage); lower the compression or the entry fraction"
            )
        if storage == "dense":
            tensors = {"table": torch.zeros(ids, dtype=torch.int32)}
        elif storage == "sorted":
            key_dtype = torch.int32 if nbytes == 8 * entries else torch.int64
            tensors = {"keys": torch.zeros(entries, dtype=key_dtype), "values": torch.zeros(entries, dtype=torch.int32)}
        else:
            tensors = {}
        mappings[table.name] = IdMapping(
            rows, storage=storage, tensors=tensors, num_entries=entries if tensors else 0, method="synthetic",
            params={"compression": compression, "entry_fraction": entry_fraction}, table_name=table.name,
        )
    return mappings


@dataclass
class PlanMemory:
    """One planner run: the tables planned, per-rank memory, and the plan (or why none fits).

    When the model does not fit, ``error`` says why and ``ranks`` is the memory it would need
    (the plan found at ``error.required_capacity``), or empty.
    """

    label: str
    tables: List[EmbeddingBagConfig]
    ranks: List[RankMemory]
    sharding_types: Dict[str, str]
    seconds: float
    plan: Optional[ShardingPlan] = None
    error: Optional[InsufficientMemoryError] = None
    mapping_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.error is None

    @property
    def table_bytes(self) -> int:
        """fp32 weights of the planned tables (each counted once)."""
        return sum(t.num_embeddings * t.embedding_dim * 4 for t in self.tables)

    def training_bytes(self, optimizer: str) -> int:
        """Weights, optimizer state and mappings, each counted once."""
        return sum(t.num_embeddings * row_bytes(t.embedding_dim, optimizer) for t in self.tables) + self.mapping_bytes


@dataclass
class PlanReport:
    """Per-rank memory of a model before and after compression, from real planner runs.

    ``format()`` renders it as text: one row per rank for small world sizes, else min / median /
    max per column and the most loaded ranks.
    """

    world_size: int
    compute_device: str
    tier: str
    capacity: int
    local_world_size: int
    batch_size: int
    optimizer: str
    mapping_source: str
    before: PlanMemory
    after: PlanMemory
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the compressed model fits."""
        return self.after.fits

    @property
    def compression(self) -> float:
        """Full training bytes / compressed training bytes (mappings counted)."""
        return self.before.training_bytes(self.optimizer) / self.after.training_bytes(self.optimizer)

    def format(self, max_rank_rows: int = 16) -> str:
        tables = self.before.tables
        dims = sorted({t.embedding_dim for t in tables})
        lines = [
            f"lhf plan: {len(tables)} tables, {sum(t.num_embeddings for t in tables):,} ids, dim "
            f"{'/'.join(map(str, dims))}, optimizer {self.optimizer}, batch {self.batch_size} per rank",
            f"topology: {self.world_size} ranks ({self.local_world_size} per host), {self.compute_device}, "
            f"{format_bytes(self.capacity)} {self.tier.upper()} per rank",
            f"mappings: {self.mapping_source}",
            *self.notes,
            f"memory in GB (2^30 bytes) of {self.tier.upper()}; tables / optimizer / io = the planner's estimate "
            "for the shards on a rank (io: input/output buffers); mappings: replicated on every rank; "
            "reserved: the base reservation (margin, dense, KJT)",
        ]
        for memory in (self.before, self.after):
            lines.append("")
            lines.extend(_format_plan(memory, max_rank_rows))
        lines.append("")
        before, after = self.before.training_bytes(self.optimizer), self.after.training_bytes(self.optimizer)
        lines.append(
            f"compression: {format_bytes(before)} -> {format_bytes(after)} of weights + optimizer state + mappings "
            f"({self.compression:.2f}x); tables {format_bytes(self.before.table_bytes)} -> "
            f"{format_bytes(self.after.table_bytes)}, mappings {format_bytes(self.after.mapping_bytes)} per rank"
        )
        if self.before.fits and self.after.fits:
            lines.append(
                f"largest rank: {format_bytes(max(r.total for r in self.before.ranks))} -> "
                f"{format_bytes(max(r.total for r in self.after.ranks))} of {format_bytes(self.capacity)}"
            )
        return "\n".join(lines)


_COLUMNS = ("tables", "optimizer", "io", "mappings", "reserved", "total")


def _columns(rank: RankMemory) -> List[int]:
    return [rank.tables, rank.optimizer, rank.io, rank.mappings, rank.reserved, rank.total]


def _row(name: str, values: Sequence[float], capacity: float) -> str:
    cells = "".join(f"{v / GB:>11.3f}" for v in values)
    return f"  {name:<14}{cells}{100 * values[-1] / capacity:>8.1f}%" if capacity else f"  {name:<14}{cells}"


def _format_plan(memory: PlanMemory, max_rank_rows: int) -> List[str]:
    kinds: Dict[str, int] = {}
    for kind in memory.sharding_types.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    placement = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))
    status = "fits" if memory.fits else "DOES NOT FIT"
    lines = [f"{memory.label}: {status}; planned in {memory.seconds:.1f} s" + (f"; {placement}" if placement else "")]
    if not memory.fits:
        lines.extend(f"  {line}" for line in str(memory.error).splitlines())
        return lines
    ranks = memory.ranks
    lines.append(f"  {'':<14}" + "".join(f"{c:>11}" for c in _COLUMNS) + f"{'use':>9}")
    capacity = ranks[0].capacity
    if len(ranks) <= max_rank_rows:
        lines.extend(_row(f"rank {r.rank}", _columns(r), capacity) for r in ranks)
    else:
        columns = list(zip(*(_columns(r) for r in ranks)))
        for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
            lines.append(_row(name, [pick(c) for c in columns], capacity))
        worst = sorted(ranks, key=lambda r: (-r.total, r.rank))[:3]
        lines.append("  most loaded:")
        lines.extend(_row(f"rank {r.rank}", _columns(r), capacity) for r in worst)
    lines.append(_row(f"sum ({len(ranks)})", [sum(c) for c in zip(*(_columns(r) for r in ranks))], 0))
    offloaded = max(r.offloaded for r in ranks)
    if offloaded:
        lines.append(f"  UVM kernels also use up to {format_bytes(offloaded)} of host memory per rank")
    return lines


def _planning_model(
    tables: Sequence[EmbeddingBagConfig], mappings: Mapping[str, IdMapping], optimizer: str
) -> LearnedHashEmbeddingBagCollection:
    model = LearnedHashEmbeddingBagCollection(list(tables), mappings, device=torch.device("meta"))
    apply_optimizer_in_backward(OPTIMIZERS[optimizer].cls, model.ebc.parameters(), {"lr": 0.01})
    return model


def _run_planner(
    label: str,
    model: LearnedHashEmbeddingBagCollection,
    topology: Topology,
    batch_size: int,
    reserve_fraction: float,
    constraints: Dict[str, ParameterConstraints],
) -> PlanMemory:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = HeuristicalStorageReservation(percentage=reserve_fraction)
    planner = LearnedHashPlanner(
        topology, batch_size, base_reservation=base, constraints=constraints,
        proposer=[UniformProposer()] if topology.world_size >= UNIFORM_PROPOSER_FROM_RANKS else None,
        stats=[NoopEmbeddingStats()], debug=False,
    )
    start = time.perf_counter()
    tables = model.embedding_bag_configs()
    try:
        plan = planner.plan(model, [LearnedHashEBCSharder()])
    except InsufficientMemoryError as error:
        return PlanMemory(label, tables, error.ranks, {}, time.perf_counter() - start, error=error,
                          mapping_bytes=mapping_bytes(model))
    ranks = planner.rank_memory()
    kinds = {o.name: o.sharding_type for o in planner.get_selected_options()}
    return PlanMemory(label, tables, ranks, kinds, time.perf_counter() - start, plan=plan,
                      mapping_bytes=mapping_bytes(model))


def plan_report(
    tables: Sequence[EmbeddingBagConfig],
    *,
    world_size: int,
    compression: Optional[float] = None,
    mappings: Optional[Mapping[str, IdMapping]] = None,
    compute_device: str = "cuda",
    hbm_gb: float = 80.0,
    ddr_gb: float = 128.0,
    local_world_size: Optional[int] = None,
    batch_size: int = BATCH_SIZE,
    optimizer: str = "rowwise_adagrad",
    entry_fraction: float = 0.1,
    reserve_fraction: float = 0.15,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> PlanReport:
    """Plans ``tables`` on ``world_size`` ranks before and after compression and reports per-rank memory.

    Both models are built on the meta device (no table is allocated) and planned by
    :class:`LearnedHashPlanner` with ``LearnedHashEBCSharder`` (which also offers row-wise
    shardings on cpu). The "after" model's mappings are ``mappings`` (e.g. from ``load_mappings``)
    or, given ``compression``, :func:`synthetic_mappings`.

    Args:
        world_size: number of ranks; ``local_world_size`` ranks per host (default min(8, world_size)).
        compute_device: ``cuda`` (tables in ``hbm_gb`` per rank) or ``cpu`` (tables in ``ddr_gb``).
        optimizer: one of :data:`OPTIMIZERS`; its state is counted per table.
        reserve_fraction: the share of HBM kept free by TorchRec's heuristic reservation.
        constraints: per-table planner constraints; default: fused kernels only (tables stay in
            the compute device's memory, no UVM offload, no data-parallel replicas).

    From :data:`UNIFORM_PROPOSER_FROM_RANKS` ranks on, the planner makes one proposal per sharding
    type (``UniformProposer``) instead of TorchRec's ~200: the 26 Criteo tables on 1024 ranks then
    plan in about 15 s per model on a CPU core, the default proposers take minutes.

    Example::

        report = plan_report(preset_tables("criteo-1tb", 128), world_size=128, compression=10)
        print(report.format())
    """
    if (compression is None) == (mappings is None):
        raise ValueError("give exactly one of compression (synthetic mappings) or mappings")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of {sorted(OPTIMIZERS)}")
    if compute_device not in ("cuda", "cpu"):
        raise ValueError(f"compute_device must be 'cuda' or 'cpu', got '{compute_device}'")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    local_world_size = local_world_size or min(8, world_size)
    if world_size % local_world_size:
        raise ValueError(f"world_size {world_size} is not a multiple of local_world_size {local_world_size}")
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        HardwareConfig(hbm_cap_bytes=int(hbm_gb * GB), ddr_cap_bytes=int(ddr_gb * GB)),
        KernelConfig(compute_device=compute_device),
    )
    tier = memory_tier(topology)
    if constraints is None:
        constraints = {t.name: ParameterConstraints(compute_kernels=["fused"]) for t in tables}
    notes = []
    if mappings is None:
        mappings = synthetic_mappings(tables, compression, optimizer=optimizer, entry_fraction=entry_fraction)
        full = [t.name for t in tables if t.name not in mappings]
        source = (
            f"synthetic for {compression:g}x: an entry for {entry_fraction:.0%} of the ids of each table "
            "(sorted int32 key + int32 row, 8 bytes/entry, or dense int32 when cheaper); rows fill the rest "
            f"of 1/{compression:g} of the table's weights + optimizer state"
        )
        if full:
            notes.append(f"full size (fewer than {MIN_COMPRESSED_IDS} ids): {len(full)} tables ({', '.join(full)})")
    else:
        source = f"given, {len(mappings)} tables, {format_bytes(mapping_bytes(mappings))} in total"
    before = _run_planner("before (full tables)", _planning_model(tables, {}, optimizer), topology, batch_size,
                          reserve_fraction, constraints)
    after_model = _planning_model(tables, mappings, optimizer)
    after = _run_planner("after (learned hash)", after_model, topology, batch_size, reserve_fraction, constraints)
    return PlanReport(
        world_size=world_size, compute_device=compute_device, tier=tier,
        capacity=getattr(topology.devices[0].storage, tier), local_world_size=local_world_size,
        batch_size=batch_size, optimizer=optimizer, mapping_source=source, before=before, after=after, notes=notes,
    )
