"""``plan_report``: a model planned before and after compression, per-rank memory side by side.

Planning runs on the meta device, for any topology: planning a cuda topology needs no GPU.
"""

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.proposers import UniformProposer
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lhf_torchrec.distributed.planner.memory import (
    GB,
    InsufficientMemoryError,
    RankMemory,
    format_bytes,
    mapping_bytes,
    memory_tier,
)
from lhf_torchrec.distributed.planner.planner import LearnedHashPlanner, UNIFORM_PROPOSER_FROM_RANKS
from lhf_torchrec.distributed.planner.synthetic import MIN_COMPRESSED_IDS, synthetic_mappings
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping.budget import OPTIMIZERS, row_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection


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
