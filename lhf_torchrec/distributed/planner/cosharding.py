"""Mappings co-sharded with their tables: which tables co-shard, and their bytes inside shard storage.

A co-sharded mapping (:mod:`lhf_torchrec.modules.cosharded`) lives with its table's rows: TorchRec
shards the table row-wise, each rank holds the mapping of the buckets whose rows it owns
(:func:`~lhf_torchrec.mapping.buckets.cosharded_bytes`: 12 K + 4 bytes per row). So its bytes are
part of each shard's storage, which :class:`CoshardedMappingEstimator` adds after TorchRec's storage
estimator: the planner then balances them like the table's own bytes. Replicated mappings stay a
reservation on every rank (:class:`~lhf_torchrec.distributed.planner.reservation.MappingStorageReservation`).

:func:`cosharding_choices` is the one rule for which tables co-shard: a bucketed mapping, one probe,
a world size that divides the bucket count, at least two rows per bucket, and constraints that allow
``row_wise`` with a fused kernel (the managed-collision engine shards row-wise only).
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from torch import nn
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.types import ShardEstimator, ShardingOption, Storage
from torchrec.distributed.types import ShardingType

from lhf_torchrec.distributed.planner.memory import memory_tier
from lhf_torchrec.mapping.buckets import MIN_ROWS_PER_BUCKET, cosharded_bytes, cosharded_slots
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.cosharded import CoShardedLearnedHashEBC, cosharding_refusal

ROW_WISE = ShardingType.ROW_WISE.value
FUSED = "fused"


@dataclass(frozen=True)
class CoshardedTable:
    """The shape of one table's co-sharded mapping: M rows in B buckets, the fullest holding
    ``max_bucket_entries`` entries (every bucket is padded to it, K slots per row)."""

    name: str
    num_rows: int
    num_buckets: int
    max_bucket_entries: int

    @classmethod
    def of(cls, name: str, mapping: IdMapping) -> "CoshardedTable":
        """The co-sharded layout of a bucketed mapping (its fullest bucket counted from its entries)."""
        return cls(name, mapping.num_rows, mapping.num_buckets, int(mapping.bucket_entry_counts().max()))

    @property
    def slots(self) -> int:
        """K, entries each row has room for."""
        return cosharded_slots(self.num_rows, self.num_buckets, self.max_bucket_entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole co-sharded mapping, all ranks together."""
        return cosharded_bytes(self.num_rows, self.num_buckets, self.max_bucket_entries)

    @property
    def bytes_per_row(self) -> int:
        return self.nbytes // self.num_rows


@dataclass(frozen=True)
class CoshardChoice:
    """Where one table's mapping lives: ``cosharded`` (its layout) or None (replicated), and why."""

    table: str
    cosharded: Optional[CoshardedTable]
    reason: str


def cosharding_choices(
    mappings: Mapping[str, IdMapping],
    world_size: int,
    constraints: Optional[Mapping[str, ParameterConstraints]] = None,
    num_buckets: Optional[int] = None,
) -> Dict[str, CoshardChoice]:
    """Per table: co-shard its mapping with the table's rows, or replicate it on every rank, and why.

    A table co-shards when its mapping is bucketed (B buckets), has one probe (a double-hashed id
    takes two rows, possibly on two ranks), ``world_size`` divides B (each rank then owns whole
    buckets: TorchRec's row-wise blocks of M / W rows are B / W buckets), the table has at least
    ``MIN_ROWS_PER_BUCKET`` rows per bucket, and ``constraints`` (if any for the table) allow
    ``row_wise`` with the ``fused`` kernel. ``num_buckets``, the B unbucketed mappings were fitted
    for, only makes their reason more precise (too few rows for B buckets).

    Example::

        choices = cosharding_choices(mappings, world_size=128)
        [c.table for c in choices.values() if c.cosharded]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    choices = {}
    for name, mapping in mappings.items():
        buckets = mapping.num_buckets
        constraint = (constraints or {}).get(name)
        reason = None
        intrinsic = cosharding_refusal(mapping)
        if intrinsic is not None:
            reason = intrinsic
            if buckets is None and num_buckets is not None and mapping.num_rows < MIN_ROWS_PER_BUCKET * num_buckets:
                reason = f"not bucketed: {mapping.num_rows} rows < {MIN_ROWS_PER_BUCKET} x {num_buckets} buckets"
        elif buckets % world_size:
            reason = f"{world_size} ranks do not divide {buckets} buckets"
        elif mapping.num_rows < MIN_ROWS_PER_BUCKET * buckets:
            reason = f"{mapping.num_rows} rows < {MIN_ROWS_PER_BUCKET} x {buckets} buckets"
        elif constraint is not None and constraint.sharding_types is not None and ROW_WISE not in constraint.sharding_types:
            reason = f"constraints exclude {ROW_WISE} (allowed: {', '.join(constraint.sharding_types)})"
        elif constraint is not None and constraint.compute_kernels is not None and FUSED not in constraint.compute_kernels:
            reason = f"constraints exclude the {FUSED} kernel (allowed: {', '.join(constraint.compute_kernels)})"
        if reason is None:
            choices[name] = CoshardChoice(name, CoshardedTable.of(name, mapping),
                                          f"{buckets} buckets, {buckets // world_size} per rank")
        else:
            choices[name] = CoshardChoice(name, None, reason)
    return choices


def cosharded_constraints(
    constraints: Optional[Mapping[str, ParameterConstraints]], cosharded: Mapping[str, CoshardedTable]
) -> Dict[str, ParameterConstraints]:
    """``constraints`` with every co-sharded table held to ``row_wise`` and the ``fused`` kernel
    (the managed-collision engine shards row-wise only); raises if a constraint excludes that."""
    merged = dict(constraints or {})
    for name in cosharded:
        given = merged.get(name)
        if given is None:
            merged[name] = ParameterConstraints(sharding_types=[ROW_WISE], compute_kernels=[FUSED])
            continue
        for field, value in (("sharding_types", ROW_WISE), ("compute_kernels", FUSED)):
            allowed = getattr(given, field)
            if allowed is not None and value not in allowed:
                raise ValueError(f"table '{name}': its mapping is co-sharded, which needs {field} to allow "
                                 f"'{value}', but the constraints allow only {allowed}")
        merged[name] = dataclasses.replace(given, sharding_types=[ROW_WISE], compute_kernels=[FUSED])
    return merged


class CoshardedMappingEstimator(ShardEstimator):
    """Adds each co-sharded mapping's bytes to its table's shards: a shard of r rows holds r x the
    mapping's bytes per row. Runs after TorchRec's ``EmbeddingStorageEstimator`` (which fills
    ``shard.storage``), in the topology's memory tier.

    Example::

        EmbeddingEnumerator(topology, batch_size, constraints, estimator=[
            EmbeddingPerfEstimator(topology, constraints), EmbeddingStorageEstimator(topology, constraints),
            CoshardedMappingEstimator(topology, {"t": CoshardedTable("t", 4096, 64, 80)})])
    """

    def __init__(self, topology: Topology, tables: Mapping[str, CoshardedTable]) -> None:
        self._tier = memory_tier(topology)
        self.tables = dict(tables)

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:
        for option in sharding_options:
            table = self.tables.get(option.name)
            if table is None:
                continue
            if option.sharding_type != ROW_WISE:
                raise ValueError(f"table '{option.name}': its mapping is co-sharded, which needs {ROW_WISE} "
                                 f"sharding; the planner was offered {option.sharding_type}")
            rows_per_bucket = table.num_rows // table.num_buckets
            for shard in option.shards:
                rows = shard.size[0]
                if rows % rows_per_bucket:
                    raise ValueError(f"table '{option.name}': a shard of {rows} rows cuts a bucket of "
                                     f"{rows_per_bucket} rows; co-sharding needs whole buckets per rank")
                extra = rows * table.bytes_per_row
                shard.storage = shard.storage + Storage(hbm=extra if self._tier == "hbm" else 0,
                                                        ddr=extra if self._tier == "ddr" else 0)

    def rank_bytes(self, options: List[ShardingOption], world_size: int) -> List[int]:
        """Co-sharded mapping bytes on each rank of a placed plan."""
        per_rank = [0] * world_size
        for option in options:
            table = self.tables.get(option.name)
            if table is not None:
                for shard in option.shards:
                    per_rank[shard.rank] += shard.size[0] * table.bytes_per_row
        return per_rank


def model_cosharded_tables(module: nn.Module) -> Dict[str, CoshardedTable]:
    """The co-sharded layout of every table a model keeps in a :class:`CoShardedLearnedHashEBC`'s
    managed-collision part: what the planner must place row-wise with its mapping in its shards."""
    found: Dict[str, CoshardedTable] = {}
    for child in module.modules():
        if isinstance(child, CoShardedLearnedHashEBC) and child.cosharded is not None:
            remaps = child.cosharded._managed_collision_collection._managed_collision_modules
            found.update({name: CoshardedTable.of(name, remap.to_mapping()) for name, remap in remaps.items()})
    return found
