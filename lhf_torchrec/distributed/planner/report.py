"""``plan_report``: a model planned before and after compression, per-rank memory side by side.

Planning runs on the meta device, for any topology: planning a cuda topology needs no GPU.
"""

import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import (
    FixedPercentageStorageReservation,
    HeuristicalStorageReservation,
)
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    StorageReservation,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from lhf_torchrec.distributed.planner.cosharding import CoshardChoice, CoshardedTable, cosharding_choices
from lhf_torchrec.distributed.planner.memory import (
    GB,
    InsufficientMemoryError,
    RankMemory,
    format_bytes,
    mapping_bytes,
    memory_tier,
    table_mappings,
)
from lhf_torchrec.distributed.planner.planner import (
    UNIFORM_PROPOSER_FROM_RANKS,
    LearnedHashPlanner,
    PerTableUniformProposer,
)
from lhf_torchrec.distributed.planner.synthetic import (
    FULLEST_BUCKET_SIGMAS,
    MIN_COMPRESSED_IDS,
    synthetic_mappings,
)
from lhf_torchrec.distributed.sharder import LearnedHashEBCSharder
from lhf_torchrec.mapping.budget import OPTIMIZERS
from lhf_torchrec.mapping.buckets import MIN_ROWS_PER_BUCKET
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.learned_hash_ebc import LearnedHashEmbeddingBagCollection


@dataclass
class PlanMemory:
    """One planner run: the tables planned, per-rank memory, and the plan (or why none fits).

    When the model does not fit, ``error`` says why and ``ranks`` is the memory it would need
    (the plan found at ``error.required_capacity``), or empty. Cluster totals add up every rank,
    so a replicated mapping counts once per rank and a co-sharded one once in all.
    """

    label: str
    tables: List[EmbeddingBagConfig]
    ranks: List[RankMemory]
    sharding_types: Dict[str, str]
    seconds: float
    plan: Optional[ShardingPlan] = None
    error: Optional[InsufficientMemoryError] = None

    @property
    def fits(self) -> bool:
        return self.error is None

    @property
    def table_bytes(self) -> int:
        """fp32 weights of the planned tables (each counted once)."""
        return sum(t.num_embeddings * t.embedding_dim * 4 for t in self.tables)

    def _sum(self, term: str) -> Optional[int]:
        return sum(getattr(r, term) for r in self.ranks) if self.ranks else None

    @property
    def cluster_bytes(self) -> Optional[int]:
        """Weights, optimizer state and mappings summed over all ranks (None without a plan)."""
        return self._sum("model_bytes")

    @property
    def max_rank_bytes(self) -> Optional[int]:
        """The most loaded rank's total (buffers and reservation included)."""
        return max(r.total for r in self.ranks) if self.ranks else None

    @property
    def max_rank_mapping_bytes(self) -> Optional[int]:
        """The most mapping bytes on one rank, replicated and co-sharded together."""
        return max(r.mapping_bytes for r in self.ranks) if self.ranks else None

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready: the plan's totals in bytes (None without a plan) and every rank."""
        return {
            "fits": self.fits,
            "error": None if self.error is None else str(self.error),
            "seconds": round(self.seconds, 3),
            "sharding_types": dict(sorted(self.sharding_types.items())),
            "cluster_bytes": self.cluster_bytes,
            "table_bytes": self._sum("tables"),
            "optimizer_bytes": self._sum("optimizer"),
            "replicated_mapping_bytes": self._sum("mappings"),
            "cosharded_mapping_bytes": self._sum("cosharded_mappings"),
            "max_rank_bytes": self.max_rank_bytes,
            "max_rank_mapping_bytes": self.max_rank_mapping_bytes,
            "ranks": [dataclasses.asdict(r) for r in self.ranks],
        }


@dataclass
class PlanReport:
    """Per-rank memory of a model before and after compression, from real planner runs.

    ``choices`` says for each compressed table whether its mapping is co-sharded with the table's
    rows or replicated on every rank, and why. ``format()`` renders the report as text: one row per
    rank for small world sizes, else min / median / max per column and the most loaded ranks;
    ``as_dict()`` as one JSON-ready dict.
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
    choices: Dict[str, CoshardChoice] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the compressed model fits."""
        return self.after.fits

    @property
    def compression(self) -> Optional[float]:
        """Cluster-wide bytes before / after (weights, optimizer state, every mapping replica and shard)."""
        before, after = self.before.cluster_bytes, self.after.cluster_bytes
        return before / after if before and after else None

    def as_dict(self) -> Dict[str, Any]:
        """The report as one JSON-ready dict: bytes are integers, ratios floats."""
        rows = {t.name: t.num_embeddings for t in self.after.tables}
        tables = {}
        for table in self.before.tables:
            choice = self.choices.get(table.name)
            layout = choice.cosharded if choice else None
            tables[table.name] = {
                "num_embeddings": table.num_embeddings,
                "rows": rows.get(table.name, table.num_embeddings),
                "mapping": "none" if choice is None else "cosharded" if layout else "replicated",
                "reason": None if choice is None else choice.reason,
                "num_buckets": layout.num_buckets if layout else None,
                "cosharded_mapping_bytes": layout.nbytes if layout else None,
            }
        return {
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
            "compute_device": self.compute_device,
            "memory_tier": self.tier,
            "capacity_bytes": self.capacity,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "mapping_source": self.mapping_source,
            "notes": list(self.notes),
            "fits": self.fits,
            "compression": self.compression,
            "tables": tables,
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
        }

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
            *_format_choices(self.choices),
            f"memory in GB (2^30 bytes) of {self.tier.upper()}; tables / optimizer / io / co-sharded = the planner's "
            "estimate for the shards on a rank (io: input/output buffers; co-sharded: the rank's rows of the "
            "co-sharded mappings); replicated: the replicated mappings, on every rank; reserved: the base "
            "reservation (margin, dense, KJT)",
        ]
        for memory in (self.before, self.after):
            lines.append("")
            lines.extend(_format_plan(memory, max_rank_rows))
        lines.append("")
        lines.extend(self._format_totals())
        return "\n".join(lines)

    def _format_totals(self) -> List[str]:
        before, after = self.before, self.after
        if before.cluster_bytes is None or after.cluster_bytes is None:
            return ["cluster: no plan to count (see above)"]
        world = self.world_size
        replicated = after.ranks[0].mappings
        cosharded = sum(r.cosharded_mappings for r in after.ranks)
        lines = [
            f"cluster: {format_bytes(before.cluster_bytes)} -> {format_bytes(after.cluster_bytes)} of tables + "
            f"optimizer state + mappings, summed over {world} ranks ({self.compression:.2f}x; every mapping replica "
            f"and shard counted); tables {format_bytes(before.table_bytes)} -> {format_bytes(after.table_bytes)}, "
            f"mappings {format_bytes(after._sum('mapping_bytes'))} (co-sharded {format_bytes(cosharded)}, "
            f"replicated {format_bytes(replicated)} x {world} ranks)",
            f"mappings per rank: up to {format_bytes(after.max_rank_mapping_bytes)}; 1/{world} of the co-sharded "
            f"mappings ({format_bytes(cosharded / world)}) + the replicated remainder ({format_bytes(replicated)}) "
            f"= {format_bytes(cosharded / world + replicated)}",
        ]
        if before.fits and after.fits:
            lines.append(f"largest rank: {format_bytes(before.max_rank_bytes)} -> {format_bytes(after.max_rank_bytes)} "
                         f"of {format_bytes(self.capacity)}")
        return lines


def _format_choices(choices: Mapping[str, CoshardChoice]) -> List[str]:
    """Co-sharded tables grouped by reason; one line per replicated table, with its reason."""
    if not choices:
        return []
    lines = ["mapping per table: co-sharded (each rank holds the mapping of its rows) or replicated (every rank "
             "holds a copy)"]
    groups: Dict[str, List[str]] = {}
    for choice in choices.values():
        if choice.cosharded is not None:
            groups.setdefault(choice.reason, []).append(choice.table)
    for reason, names in groups.items():
        lines.append(f"  co-sharded, row_wise ({reason}): {len(names)} tables ({', '.join(names)})")
    lines.extend(f"  replicated: {c.table} ({c.reason})" for c in choices.values() if c.cosharded is None)
    return lines


_COLUMNS = ("tables", "optimizer", "io", "replicated", "co-sharded", "reserved", "total")


def _columns(rank: RankMemory) -> List[int]:
    return [rank.tables, rank.optimizer, rank.io, rank.mappings, rank.cosharded_mappings, rank.reserved, rank.total]


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
    model: nn.Module,
    topology: Topology,
    batch_size: int,
    base: StorageReservation,
    constraints: Optional[Dict[str, ParameterConstraints]],
    cosharded: Mapping[str, CoshardedTable],
) -> PlanMemory:
    planner = LearnedHashPlanner(
        topology, batch_size, base_reservation=base, constraints=constraints, cosharded=cosharded,
        proposer=[PerTableUniformProposer()] if topology.world_size >= UNIFORM_PROPOSER_FROM_RANKS else None,
        stats=[NoopEmbeddingStats()], debug=False,
    )
    start = time.perf_counter()
    tables = [config for ebc in _ebcs(model) for config in ebc.embedding_bag_configs()]
    try:
        plan = planner.plan(model, [LearnedHashEBCSharder()])
    except InsufficientMemoryError as error:
        return PlanMemory(label, tables, error.ranks, {}, time.perf_counter() - start, error=error)
    ranks = planner.rank_memory()
    kinds = {o.name: o.sharding_type for o in planner.get_selected_options()}
    return PlanMemory(label, tables, ranks, kinds, time.perf_counter() - start, plan=plan)


def _ebcs(model: nn.Module) -> List[nn.Module]:
    """The modules whose tables the planner shards: learned-hash EBCs (their compressed tables)."""
    return [m for m in model.modules() if isinstance(m, LearnedHashEmbeddingBagCollection)]


def _base_reservation(reserve_fraction: float) -> StorageReservation:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return HeuristicalStorageReservation(percentage=reserve_fraction)


def estimate_rank_memory(
    model: nn.Module,
    world_size: int,
    *,
    cosharding: bool = True,
    compute_device: str = "cpu",
    capacity_gb: float = 128.0,
    batch_size: int = BATCH_SIZE,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> PlanMemory:
    """The planner's per-rank estimate for ``model`` (with its learned-hash EBCs) on ``world_size`` ranks
    of one host, to hold against the bytes a sharded job allocates (``PlanMemory.ranks``, and ``plan``
    to shard with).

    With ``cosharding`` the tables :func:`cosharding_choices` allows have their mapping co-sharded
    with their rows (``RankMemory.cosharded_mappings``), the others replicated (``mappings``). No base
    reservation is kept (``reserved`` is 0) and the topology's memory is ``capacity_gb`` per rank.

    Example::

        memory = estimate_rank_memory(LearnedHashEmbeddingBagCollection(tables, mappings), world_size=2)
        memory.ranks[1].cosharded_mappings, memory.ranks[1].mappings
    """
    topology = _topology(world_size, world_size, compute_device, capacity_gb, capacity_gb)
    choices = cosharding_choices(table_mappings(model), world_size, constraints) if cosharding else {}
    cosharded = {name: c.cosharded for name, c in choices.items() if c.cosharded is not None}
    return _run_planner("estimate", model, topology, batch_size, FixedPercentageStorageReservation(0.0),
                        constraints, cosharded)


def _topology(world_size: int, local_world_size: int, compute_device: str, hbm_gb: float, ddr_gb: float) -> Topology:
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        HardwareConfig(hbm_cap_bytes=int(hbm_gb * GB), ddr_cap_bytes=int(ddr_gb * GB)),
        KernelConfig(compute_device=compute_device),
    )


def plan_report(
    tables: Sequence[EmbeddingBagConfig],
    *,
    world_size: int,
    compression: Optional[float] = None,
    mappings: Optional[Mapping[str, IdMapping]] = None,
    cosharding: bool = True,
    num_buckets: Optional[int] = None,
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
        cosharding: co-shard each mapping :func:`cosharding_choices` allows with its table's rows
            (else every mapping is replicated on every rank).
        num_buckets: synthetic mappings only: bucket them in B buckets (as ``lhf fit --num-buckets``)
            where a table holds 2 rows per bucket; default with ``cosharding``: B = ``world_size``,
            the fewest buckets that co-shard on this many ranks (the least padding of the co-sharded
            layout). Fit with a B that every world size you train on divides, and plan with it.
        compute_device: ``cuda`` (tables in ``hbm_gb`` per rank) or ``cpu`` (tables in ``ddr_gb``).
        optimizer: one of :data:`OPTIMIZERS`; its state is counted per table.
        reserve_fraction: the share of HBM kept free by TorchRec's heuristic reservation.
        constraints: per-table planner constraints; default: fused kernels only (tables stay in
            the compute device's memory, no UVM offload, no data-parallel replicas).

    From :data:`UNIFORM_PROPOSER_FROM_RANKS` ranks on, the planner makes one proposal per sharding
    type (:class:`PerTableUniformProposer`) instead of TorchRec's ~200: the 26 Criteo tables on 1024
    ranks then plan in about 15 s per model on a CPU core, the default proposers take minutes.

    Example::

        report = plan_report(preset_tables("criteo-1tb", 128), world_size=128, compression=10)
        print(report.format()); report.after.cluster_bytes; report.choices["C1"].reason
    """
    if (compression is None) == (mappings is None):
        raise ValueError("give exactly one of compression (synthetic mappings) or mappings")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of {sorted(OPTIMIZERS)}")
    if compute_device not in ("cuda", "cpu"):
        raise ValueError(f"compute_device must be 'cuda' or 'cpu', got '{compute_device}'")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_buckets is not None and (mappings is not None or not cosharding):
        raise ValueError("num_buckets is for synthetic mappings planned with co-sharding; fitted mappings "
                         "carry their own (lhf fit --num-buckets)")
    local_world_size = local_world_size or min(8, world_size)
    if world_size % local_world_size:
        raise ValueError(f"world_size {world_size} is not a multiple of local_world_size {local_world_size}")
    topology = _topology(world_size, local_world_size, compute_device, hbm_gb, ddr_gb)
    tier = memory_tier(topology)
    if constraints is None:
        constraints = {t.name: ParameterConstraints(compute_kernels=["fused"]) for t in tables}
    notes = []
    if mappings is None:
        if cosharding and num_buckets is None:
            num_buckets = world_size
        mappings = synthetic_mappings(tables, compression, optimizer=optimizer, entry_fraction=entry_fraction,
                                      num_buckets=num_buckets)
        full = [t.name for t in tables if t.name not in mappings]
        source = (
            f"synthetic for {compression:g}x: an entry for {entry_fraction:.0%} of the ids of each table "
            "(in the storage a fit would take, the cheapest of dense, perfect hash and sorted keys: "
            "IdMapping's storage_cost); rows fill the rest "
            f"of 1/{compression:g} of the table's weights + optimizer state"
        )
        if num_buckets is not None:
            source += (
                f"; bucketed into {num_buckets} buckets where a table has >= {MIN_ROWS_PER_BUCKET} rows per bucket "
                "(entries keyed by the 64-bit bucket hash in the cheapest sparse storage, 8 bytes/bucket), ids "
                f"spread uniformly over buckets, the fullest bucket assumed to hold the mean + "
                f"{FULLEST_BUCKET_SIGMAS:g} standard deviations of entries (the co-sharded layout pads every bucket "
                "to it)"
            )
        if full:
            notes.append(f"full size (fewer than {MIN_COMPRESSED_IDS} ids): {len(full)} tables ({', '.join(full)})")
    else:
        source = f"given, {len(mappings)} tables, {format_bytes(mapping_bytes(mappings))} in total"
    if cosharding:
        choices = cosharding_choices(mappings, world_size, constraints, num_buckets=num_buckets)
    else:
        choices = {name: CoshardChoice(name, None, "co-sharding off") for name in mappings}
    cosharded = {name: c.cosharded for name, c in choices.items() if c.cosharded is not None}
    base = _base_reservation(reserve_fraction)
    before = _run_planner("before (full tables)", _planning_model(tables, {}, optimizer), topology, batch_size,
                          base, constraints, {})
    after = _run_planner("after (learned hash)", _planning_model(tables, mappings, optimizer), topology, batch_size,
                         base, constraints, cosharded)
    return PlanReport(
        world_size=world_size, compute_device=compute_device, tier=tier,
        capacity=getattr(topology.devices[0].storage, tier), local_world_size=local_world_size,
        batch_size=batch_size, optimizer=optimizer, mapping_source=source, before=before, after=after,
        choices=choices, notes=notes,
    )
