"""Per-rank memory in the planner's accounting, and the error that says which ranks do not fit."""

from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

from lhf_torchrec.mapping.fused import runtime_bytes
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.learned_hash_ebc import IdRemapper


GB = 1024**3  # the planner's unit (bytes_to_gb)


def memory_tier(topology: Topology) -> str:
    """The memory the tables live in: ``hbm`` on cuda/mtia topologies, ``ddr`` on cpu ones."""
    return "hbm" if topology.compute_device in ("cuda", "mtia") else "ddr"


def table_mappings(module: nn.Module) -> Dict[str, IdMapping]:
    """The :class:`IdMapping` of each table in a model (the learned-hash remaps' ``mappings``)."""
    found: Dict[str, IdMapping] = {}
    for child in module.modules():
        if isinstance(child, IdRemapper):
            found.update(child.mappings.items())
    return found


def mapping_bytes(source: Union[nn.Module, Mapping[str, IdMapping]], exclude: Collection[str] = ()) -> int:
    """Bytes of the distinct :class:`IdMapping` buffers in a model, or in a dict table -> mapping,
    leaving out the mappings of the tables in ``exclude`` (e.g. co-sharded ones), with what a
    learned-hash remap adds to apply them together (:func:`~lhf_torchrec.mapping.fused.runtime_bytes`;
    the mappings of a dict are counted as a learned-hash remap's)."""
    named = source if isinstance(source, Mapping) else table_mappings(source)
    left_out = {id(m) for name, m in named.items() if name in exclude}
    candidates = source.values() if isinstance(source, Mapping) else source.modules()
    distinct = {id(m): m for m in candidates if isinstance(m, IdMapping) and id(m) not in left_out}
    remapped = {id(m) for m in named.values()}
    return sum(m.nbytes + (runtime_bytes(m) if id(m) in remapped else 0) for m in distinct.values())


@dataclass(frozen=True)
class RankMemory:
    """Memory of one rank in the planner's accounting, in bytes of the topology's memory tier.

    ``tables``, ``optimizer``, ``io`` and ``cosharded_mappings`` split the storage the planner
    estimated for the shards on the rank: the weights, the fused optimizer's state, input/output
    buffers (proportional to the batch size), and the rank's rows of the co-sharded mappings.
    ``mappings`` are the replicated mappings, a copy on every rank; ``reserved`` is what the base
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
    cosharded_mappings: int = 0

    @property
    def mapping_bytes(self) -> int:
        """Replicated and co-sharded mapping bytes on the rank."""
        return self.mappings + self.cosharded_mappings

    @property
    def model_bytes(self) -> int:
        """Weights, optimizer state and mappings on the rank (no buffers, no reservation)."""
        return self.tables + self.optimizer + self.mapping_bytes

    @property
    def total(self) -> int:
        return self.tables + self.optimizer + self.io + self.mapping_bytes + self.reserved

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
        return over_capacity(self.ranks)


def over_capacity(ranks: Sequence[RankMemory]) -> List[RankMemory]:
    return sorted((r for r in ranks if r.shortfall > 0), key=lambda r: (-r.shortfall, r.rank))


def list_ranks(ranks: Sequence[RankMemory], limit: int = 8) -> str:
    shown = ", ".join(
        f"rank {r.rank} needs {format_bytes(r.total)} (short by {format_bytes(r.shortfall)})" for r in ranks[:limit]
    )
    return shown + (f", and {len(ranks) - limit} more" if len(ranks) > limit else "")
