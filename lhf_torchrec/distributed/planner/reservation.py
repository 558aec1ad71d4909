"""``MappingStorageReservation``: the replicated mappings' bytes taken off every device before planning.

TorchRec's planner sees the compressed tables for free (they are a stock EBC's), but not the
mappings: they are buffers *inside* the shardable module, and ``HeuristicalStorageReservation``
counts only what lies outside shardable modules plus KJT buffers. The sharder replicates the
mappings on every rank, so this reservation takes their bytes off every device (HBM on cuda
topologies, DDR on cpu ones) before the planner places tables. Mappings co-sharded with their
tables are not replicated: their bytes go into shard storage
(:class:`~lhf_torchrec.distributed.planner.cosharding.CoshardedMappingEstimator`) and are left out here.
"""

import copy
import warnings
from typing import Collection, Dict, List, Optional

from torch import nn
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import StorageReservation
from torchrec.distributed.types import ModuleSharder

from lhf_torchrec.distributed.planner.memory import (
    InsufficientMemoryError,
    RankMemory,
    format_bytes,
    list_ranks,
    mapping_bytes,
    memory_tier,
    over_capacity,
)


class MappingStorageReservation(StorageReservation):
    """Reserves the replicated mappings' bytes on every rank, on top of a base reservation.

    Args:
        base: the reservation for everything else (default: TorchRec's default,
            ``HeuristicalStorageReservation(percentage=0.15)``). It does not count buffers inside
            a shardable module, so the mappings are never counted twice.
        mapping_bytes: bytes to reserve per rank; default: the :class:`IdMapping` buffers found in
            the module being planned (:func:`mapping_bytes`), but those of ``cosharded`` tables.
        cosharded: names of the tables whose mappings are co-sharded, not replicated.

    After ``reserve``: ``mapping_bytes`` and ``base_reserved`` (bytes per rank) hold what it took.

    Example::

        planner = EmbeddingShardingPlanner(topology, storage_reservation=MappingStorageReservation())
    """

    def __init__(
        self,
        base: Optional[StorageReservation] = None,
        mapping_bytes: Optional[int] = None,
        cosharded: Collection[str] = (),
    ) -> None:
        if base is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                base = HeuristicalStorageReservation(percentage=0.15)
        self.base = base
        self._fixed_bytes = mapping_bytes
        self.cosharded = frozenset(cosharded)
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
        self.mapping_bytes = (
            self._fixed_bytes if self._fixed_bytes is not None else mapping_bytes(module, exclude=self.cosharded)
        )
        reserved = copy.deepcopy(self.base.reserve(topology, batch_size, module, sharders, constraints))
        self.base_reserved = [
            getattr(full.storage, tier) - getattr(left.storage, tier)
            for full, left in zip(topology.devices, reserved.devices)
        ]
        for device in reserved.devices:
            setattr(device.storage, tier, getattr(device.storage, tier) - self.mapping_bytes)
        self._last_reserved = reserved
        over = over_capacity([
            RankMemory(rank=d.rank, capacity=getattr(d.storage, tier), tables=0, optimizer=0, io=0,
                       mappings=self.mapping_bytes, reserved=kept)
            for d, kept in zip(topology.devices, self.base_reserved)
        ])
        if over:
            raise InsufficientMemoryError(
                f"the replicated mappings ({format_bytes(self.mapping_bytes)} per rank) and the base reservation "
                f"({type(self.base).__name__}) leave no {tier.upper()} for tables on {len(over)} of "
                f"{topology.world_size} ranks: {list_ranks(over)}",
                ranks=over,
            )
        return reserved

    @property
    def last_reserved_topology(self) -> Optional[Topology]:
        return copy.deepcopy(self._last_reserved)
