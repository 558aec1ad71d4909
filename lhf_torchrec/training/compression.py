"""How a model's tables are compressed, as the trainer sees it: swap modules in, shard them, hooks.

Every method is a :class:`Compression`: :class:`LearnedHashing` (this project's mappings in front
of smaller tables) or :class:`RemapCompression` (any other :class:`EmbeddingRemap`, e.g. QR, MCH,
CCE). The base class gives the optional hooks no-op defaults, so the trainer calls them all
unconditionally and every method trains through the same DMP, planner, optimizer and checkpoints.
A fitted method is a :class:`FittedTables`: its compression and what every table costs.
"""

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Collection, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.types import ModuleSharder

from lhf_torchrec.distributed.planner.cosharding import cosharding_choices
from lhf_torchrec.distributed.sharder import CoShardedEBCSharder, LearnedHashEBCSharder, RemappedEBCSharder
from lhf_torchrec.mapping.id_mapping import IdMapping
from lhf_torchrec.modules.remapped_ebc import EmbeddingRemap
from lhf_torchrec.modules.swap import apply_cosharded_learned_hashing, apply_learned_hashing, apply_remap

if TYPE_CHECKING:
    from lhf_torchrec.training.trainer import Trainer

# A table's weight in a (sharded) model's state dict: ``...embedding_bags.<table>.weight``.
TABLE_WEIGHT_KEY = re.compile(r"embedding_bags\.([^.]+)\.weight$")


class Compression:
    """A method's compression of a model's tables (subclasses implement the first three)."""

    def apply(self, model: nn.Module) -> None:
        """Swaps the model's EmbeddingBagCollections (built on meta) for compressed modules, in place."""
        raise NotImplementedError

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        """Sharders for the modules ``apply`` puts in (the stock EBC sharder is always added)."""
        raise NotImplementedError

    def fingerprint(self) -> Dict[str, str]:
        """What must match for a checkpoint to load: e.g. table name -> mapping fingerprint."""
        raise NotImplementedError

    def initialize(self, trainer: "Trainer") -> None:
        """Called once on every rank after sharding, before training (a resumed run then loads its
        checkpoint over it)."""

    def callback_steps(self, steps_per_epoch: int) -> Iterable[int]:
        """Global steps after which :meth:`on_callback` runs (methods that rewrite their state
        during training, e.g. CCE's clustering rounds)."""
        return ()

    def on_callback(self, trainer: "Trainer") -> None:
        """Called on every rank after each of :meth:`callback_steps`, with the training pipeline
        drained, before that step's validation and checkpoint."""


@dataclass
class LearnedHashing(Compression):
    """Learned-hash EBCs with these mappings (table name -> :class:`IdMapping`).

    ``initial_weights`` (table name -> rows x dim), when given, replace TorchRec's random init of
    those compressed tables (see :func:`lhf_torchrec.pipeline.steps.warm_start_rows`).

    ``cosharded_world_size`` (W), when given: the tables whose mapping can co-shard on W ranks (the
    planner's rule, :func:`~lhf_torchrec.distributed.planner.cosharding.cosharding_choices`) keep
    their mapping with their rows, sharded row-wise by :class:`CoShardedEBCSharder`; the other tables
    keep a replicated remap.
    """

    mappings: Mapping[str, IdMapping]
    initial_weights: Optional[Mapping[str, torch.Tensor]] = None
    cosharded_world_size: Optional[int] = None

    @cached_property
    def cosharded_tables(self) -> List[str]:
        """The tables that co-shard with their mappings on ``cosharded_world_size`` ranks (decided once:
        the rule counts every bucket's entries of every mapping)."""
        if self.cosharded_world_size is None:
            return []
        choices = cosharding_choices(self.mappings, self.cosharded_world_size)
        return sorted(name for name, choice in choices.items() if choice.cosharded is not None)

    def apply(self, model: nn.Module) -> None:
        if self.cosharded_tables:
            apply_cosharded_learned_hashing(model, dict(self.mappings), cosharded_tables=self.cosharded_tables)
        elif self.mappings:
            apply_learned_hashing(model, dict(self.mappings))

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        return [CoShardedEBCSharder(), LearnedHashEBCSharder()] if self.cosharded_tables else [LearnedHashEBCSharder()]

    def fingerprint(self) -> Dict[str, str]:
        return {name: m.fingerprint for name, m in sorted(self.mappings.items())}

    def initialize(self, trainer: "Trainer") -> None:
        if self.initial_weights:
            trainer.write_table_weights(self.initial_weights)


@dataclass
class RemapCompression(Compression):
    """A fitted :class:`EmbeddingRemap` in front of a stock EBC of its tables (QR, MCH, CCE)."""

    remapper: EmbeddingRemap

    def apply(self, model: nn.Module) -> None:
        apply_remap(model, self.remapper)

    def sharders(self) -> List[ModuleSharder[nn.Module]]:
        return [RemappedEBCSharder()]

    def fingerprint(self) -> Dict[str, str]:
        return {name: f"{self.remapper.method}:{fp}" for name, fp in self.remapper.fingerprint().items()}


@dataclass(frozen=True)
class FittedTables:
    """A method fitted at a budget: the compression to train with and what every table costs.

    ``rows``: rows of every table (a table a method splits: the rows of all its parts);
    ``table_bytes``: weights + optimizer state; ``mapping_bytes``: mappings, vocabularies and any
    other state a method keeps (MCH's slot ids, CCE's pointers); ``budgets``: the byte budget of each
    compressed table; ``per_table_bytes``: everything a table costs.
    """

    method: str
    compression: Compression
    rows: Dict[str, int]
    table_bytes: int
    mapping_bytes: int
    budgets: Dict[str, int] = field(default_factory=dict)
    per_table_bytes: Dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.mapping_bytes


@torch.no_grad()
def write_table_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Writes full table weights (table name -> rows x dim) into the local shards of a (sharded) model."""
    found = set()
    for key, value in model.state_dict().items():
        match = TABLE_WEIGHT_KEY.search(key)
        if not match or match.group(1) not in weights:
            continue
        full = weights[match.group(1)]
        if tuple(full.shape) != tuple(value.shape):
            raise ValueError(f"table '{match.group(1)}': weights of shape {tuple(full.shape)} for a "
                             f"table of shape {tuple(value.shape)}")
        shards = ([(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
                  if isinstance(value, ShardedTensor) else [((0, 0), value)])
        for (row, col), local in shards:
            local.copy_(full[row:row + local.shape[0], col:col + local.shape[1]].to(local.dtype))
        found.add(match.group(1))
    missing = sorted(set(weights) - found)
    if missing:
        raise ValueError(f"weights given for tables {missing}, which the model does not have")


@torch.no_grad()
def reset_table_optimizer_state(model: nn.Module, tables: Collection[str]) -> None:
    """Zeros the fused table optimizer's state (e.g. row-wise Adagrad's sums) of ``tables`` of a DMP model."""
    for param_state in model.fused_optimizer.state_dict()["state"].values():
        for name, value in param_state.items():
            if name.split(".")[0] not in tables or not isinstance(value, (torch.Tensor, ShardedTensor)):
                continue
            for tensor in ([s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]):
                tensor.zero_()
